"""Every user mistake ends in one line naming the cause and the fix: exit status 2 from the
command line, a typed exception from the library, before any work is done where it can be
known before. Each case runs under a timeout and must not print a traceback.

Library cases of the solvers themselves are in tests/test_bad_inputs_lib.py.
"""

import copy
import os

import pytest

from flowsim import sweep
from flowsim.cli import main as cli_main
from flowsim.sweep import _memory, _store
from flowsim.sweep._config import SCHEMA, default_save_every
from flowsim.sweep._store import to_toml

pytestmark = pytest.mark.timeout(60)

BASE = {
    "problem": {"sizes": [3, 4, 2], "n": 8},
    "init": {"seeds": 2},
    "gd": {"eta0": 0.1, "steps": 20},
    "flow": {"kinks": "smooth", "solver": "tsit5"},
}


def _cfg(**changes):
    """BASE with `section__key=value` changes (None deletes; a bare section name replaces it)."""
    cfg = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if not key:
            cfg.pop(section, None) if value is None else cfg.__setitem__(section, value)
        elif value is None:
            cfg[section].pop(key, None)
        else:
            cfg.setdefault(section, {})[key] = value
    return cfg


def _cli(argv, capsys):
    """Runs the CLI in-process: (exit status, stdout, stderr)."""
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("flowsim ")]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, err
    return errors[0]


def _write(tmp_path, cfg, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(to_toml(cfg) if isinstance(cfg, dict) else cfg)
    return path


def _dry_run_fails(tmp_path, capsys, cfg, *needles):
    rc, _, err = _cli(["sweep", _write(tmp_path, cfg), "--dry-run", "--out", tmp_path / "o"],
                      capsys)
    assert rc == 2, err
    line = _one_error_line(err)
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "o").exists()
    return line


# --- every key of the schema: a value of the wrong type ------------------------------------------

_WRONG = {"int": "many", "float": "big", "str": 3, "bool": "yes", "int_list": "wide",
          "str_set": 3, "int_or_all": 0}
_KEY_CASES = [(s, k, _WRONG[f.kind]) for s, fields in SCHEMA.items() for k, f in fields.items()]


@pytest.mark.parametrize(("section", "key", "value"), _KEY_CASES,
                         ids=[f"{s}.{k}" for s, k, _ in _KEY_CASES])
def test_wrong_type_of_every_key(tmp_path, capsys, section, key, value):
    _dry_run_fails(tmp_path, capsys, _cfg(**{f"{section}__{key}": value}), f"[{section}].{key}",
                   "must be")


# --- values out of range, and combinations that cannot run ---------------------------------------

_VALUE_CASES = [
    (_cfg(gd__eta0=0.0), "[gd].eta0 = 0.0: must be positive"),
    (_cfg(gd__eta0=-1), "[gd].eta0 = -1.0: must be positive"),
    (_cfg(gd__delta=0.75), "[gd].delta = 0.75: must be in [0, 1/2]"),
    (_cfg(gd__delta=[0.0, -0.1]), "[gd].delta[1] = -0.1: must be in [0, 1/2]"),
    (_cfg(gd__steps=0), "[gd].steps = 0: must be positive"),
    (_cfg(gd__steps=1e11), "[gd].steps = 100000000000.0: must be an integer"),
    (_cfg(gd__save_every=3), "[gd].save_every = 3: must divide [gd].steps = 20"),
    (_cfg(gd__save_every=-1), "[gd].save_every = -1: must be non-negative"),
    (_cfg(init__seeds=1e9), "[init].seeds = 1000000000.0: must be an integer"),
    (_cfg(init__seeds=-2), "[init].seeds = -2: must be positive"),
    (_cfg(init__variance=0.0), "[init].variance = 0.0: must be positive"),
    (_cfg(problem__n=0), "[problem].n = 0: must be positive"),
    (_cfg(problem__sizes=[3, 0, 2]), "[problem].sizes = [3, 0, 2]: widths must be positive"),
    (_cfg(problem__sizes=[[3, 4, 2], [3, 2]]), "[problem].sizes[1] = [3, 2]: must list"),
    (_cfg(problem__noise=-1.0), "[problem].noise = -1.0: must be non-negative"),
    (_cfg(flow__rtol=-1e-8), "[flow].rtol = -1e-08: must be positive"),
    (_cfg(flow__max_steps=0), "[flow].max_steps = 0: must be positive"),
    (_cfg(flow__max_events=0), "[flow].max_events = 0: must be positive"),
    (_cfg(flow__kinks="exactly"), '[flow].kinks = "exactly": must be one of'),
    (_cfg(run={"batch_size": -1}), "[run].batch_size = -1: must be non-negative"),
    (_cfg(run={"devices": "some"}), '[run].devices = "some": must be a positive integer'),
    (_cfg(gd__delta=[0.0, 0.0]), "[gd].delta = [0.0, 0.0]: repeats a value"),
    (_cfg(gd__eta0=[]), "[gd].eta0 = []: an empty sweep axis"),
    (_cfg(init__seeds=[2, 4]), "[init].seeds = [2, 4]: cannot be swept"),
    (_cfg(problem__colour="red"), "[problem].colour: unknown key"),
    (_cfg(solver={"name": "rk4"}), "[solver]: unknown section"),
    (_cfg(problem=None), "[problem]: missing section"),
    (_cfg(init=None), "[init]: missing section"),
    (_cfg(problem__n=None), "[problem].n: missing"),
    (_cfg(problem__sizes=None), "[problem].sizes: missing"),
    (_cfg(gd__eta0=None), "[gd].eta0: missing"),
    (_cfg(gd=None, flow=None), "nothing to run"),
    (_cfg(gd=None), "[flow].t1: missing"),
    (_cfg(flow__t1=2.0), "[flow].t1: not allowed with [gd]"),
    (_cfg(problem__loss="logistic", problem__sizes=[3, 4, 1]),
     '[problem].loss = "logistic": needs labels'),
    (_cfg(problem__loss="logistic", problem__data="separable"),
     "[problem].sizes = [3, 4, 2]: the logistic loss needs one output"),
    (_cfg(flow=None, metrics={"record": ["discretization"]}), '"discretization" compares GD'),
    (_cfg(gd=None, flow__t1=1.0, metrics={"record": ["ledger"]}), '"ledger" is the GD drift'),
    (_cfg(metrics={"record": ["loss", "entropy"]}), 'unknown metric "entropy"'),
    (_cfg(problem__activation="tanh", flow__kinks="exact"),
     '[flow].kinks = "exact": needs a ReLU or leaky-ReLU network'),
    (_cfg(problem__activation=["relu", "linear"], flow__kinks="exact"),
     '[problem].activation = "linear" has no kinks'),
    (_cfg(gd__schedule="constant", gd__delta=[0.0, 0.25]),
     '[gd].delta is a sweep axis, but schedule = "constant" ignores it'),
    (_cfg(gd__schedule=["power", "constant"], gd__delta=[0.0, 0.25]),
     '[gd].delta is a sweep axis, but schedule = "constant"'),
]


@pytest.mark.parametrize(("cfg", "needle"), _VALUE_CASES, ids=[n for _, n in _VALUE_CASES])
def test_bad_value_or_combination(tmp_path, capsys, cfg, needle):
    _dry_run_fails(tmp_path, capsys, cfg, needle)


@pytest.mark.parametrize(("cfg", "needle"), _VALUE_CASES[:6], ids=[n for _, n in _VALUE_CASES[:6]])
def test_library_raises_config_error(cfg, needle):
    with pytest.raises(sweep.ConfigError, match=None) as info:
        sweep.load_config(cfg)
    assert needle in str(info.value)


# --- the config file itself ----------------------------------------------------------------------

_FILE_CASES = [
    ("missing", None, "no such config file"),
    ("directory", "dir", "is a directory; give the config's TOML file"),
    ("not utf-8", b"\xff\xfe[problem]\n", "not a text file in UTF-8"),
    ("latin-1", "[problem]\nname = 'caf\xe9'\n".encode("latin-1"), "save the config as UTF-8"),
    ("not toml", b"[problem\nsizes = 3", "not valid TOML"),
    ("empty", b"", "[problem]: missing section"),
    ("duplicate key", b"[problem]\nn = 1\nn = 2\n", "not valid TOML"),
]


@pytest.mark.parametrize(("what", "content", "needle"), _FILE_CASES,
                         ids=[c[0] for c in _FILE_CASES])
def test_bad_config_file(tmp_path, capsys, what, content, needle):
    path = tmp_path / "c.toml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    rc, _, err = _cli(["sweep", path, "--dry-run"], capsys)
    assert rc == 2
    assert needle in _one_error_line(err) and str(path) in err


# --- command-line flags --------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "needle"), [
    (["--devices", "0"], "--devices = 0: must be a positive integer"),
    (["--devices", "-3"], "--devices = -3: must be a positive integer"),
    (["--max-points", "0"], "--max-points = 0: must be a positive integer"),
])
def test_bad_sweep_flags(tmp_path, capsys, flags, needle):
    rc, _, err = _cli(["sweep", _write(tmp_path, BASE), *flags], capsys)
    assert rc == 2 and needle in _one_error_line(err)


@pytest.mark.parametrize(("argv", "needle"), [
    (["reproduce", "no-such-paper", "--quick"], "unknown reproduction"),
    (["reproduce", "du2018-thm32", "--seeds", "0"], "--seeds = 0"),
    (["reproduce"], "give a reproduction NAME or --list"),
])
def test_bad_reproduce_arguments(capsys, argv, needle):
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and needle in _one_error_line(err)


@pytest.mark.parametrize("argv", [["sweep"], ["sweep", "a.toml", "--devices", "x"],
                                  ["sweep", "a.toml", "--bogus"], ["frobnicate"]])
def test_argparse_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    _, err = capsys.readouterr()
    assert info.value.code == 2 and "error:" in err and "Traceback" not in err


# --- the output directory ------------------------------------------------------------------------

def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out, needle in ((tmp_path / "f", "is a file"),
                        (tmp_path / "f" / "sub", "cannot be created: ")):
        rc, _, err = _cli(["sweep", _write(tmp_path, BASE), "--out", out], capsys)
        assert rc == 2 and str(out) in err and needle in _one_error_line(err)
        rc, _, err = _cli(["sweep", _write(tmp_path, BASE), "--out", out, "--dry-run"], capsys)
        assert rc == 2 and needle in err


@pytest.mark.parametrize("target", ["new", "existing", "points"])
def test_out_not_writable(tmp_path, capsys, monkeypatch, target):
    """Permissions are simulated (os.access), so that the case holds for root too."""
    out = tmp_path / "o" / ("new" if target == "new" else "")
    denied = {"new": tmp_path / "o", "existing": tmp_path / "o", "points": out / "points"}[target]
    (tmp_path / "o").mkdir()
    if target == "points":
        (out / "points").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(denied) else real(p, m))
    rc, _, err = _cli(["sweep", _write(tmp_path, BASE), "--out", out], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "not writable" in line and "--out" in line
    assert not (out / "config.toml").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_out_read_only_for_real(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    rc, _, err = _cli(["sweep", _write(tmp_path, BASE), "--out", ro / "o"], capsys)
    assert rc == 2 and "not writable" in err


def test_store_of_another_config_and_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = _cli(["sweep", _write(tmp_path, BASE), "--out", out, "--resume"], capsys)
    assert rc == 2 and "nothing to resume" in _one_error_line(err)
    out.mkdir()
    (out / "config.toml").write_text(to_toml(_cfg(gd__eta0=0.2)))
    rc, _, err = _cli(["sweep", _write(tmp_path, BASE), "--out", out], capsys)
    assert rc == 2 and "holds results of a different config" in _one_error_line(err)


def test_store_held_by_another_sweep(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    held = _store.StoreLock(out)  # a live writer (this process) holds the store
    try:
        rc, _, err = _cli(["sweep", _write(tmp_path, BASE), "--out", out], capsys)
        line = _one_error_line(err)
        assert rc == 2 and "another sweep is writing to this store" in line
        assert f"pid {os.getpid()}" in line
        assert not (out / "config.toml").exists()
    finally:
        held.release()


# --- memory and grid size: known before anything runs --------------------------------------------

@pytest.mark.parametrize(("cfg", "needle"), [
    (_cfg(gd__steps=100_000_000_000), "fewer [gd].steps"),
    (_cfg(problem__sizes=[3, 100_000_000, 2]), "smaller [problem].sizes"),
    (_cfg(init__seeds=1_000_000_000), "set [run] batch_size = "),
    (_cfg(init__seeds=1_000_000_000, run={"batch_size": 500_000_000}), "set [run] batch_size = "),
])
def test_memory_refused_before_work(tmp_path, capsys, cfg, needle):
    have = _memory.available_bytes()
    for extra in (["--dry-run"], []):
        rc, out, err = _cli(["sweep", _write(tmp_path, cfg), "--out", tmp_path / "o", *extra],
                            capsys)
        line = _one_error_line(err)
        assert rc == 2 and needle in line and "a compiled call needs ~" in line
        assert f"has {_memory._gb(have)[:2]}" in line  # both numbers are named
        assert not (tmp_path / "o").exists()


def test_memory_estimate_grows_with_the_problem():
    small = _memory.estimate(sweep.load_config(BASE))
    wide = _memory.estimate(sweep.load_config(_cfg(problem__sizes=[3, 400, 2])))
    seeds = _memory.estimate(sweep.load_config(_cfg(init__seeds=20)))
    assert wide[0] > 50 * small[0] and seeds[2] == 10 * small[2] and seeds[0] == small[0]
    batched = _memory.estimate(sweep.load_config(_cfg(init__seeds=20, run={"batch_size": 4})))
    assert batched[2] == 4


@pytest.mark.timeout(20)
def test_dry_run_of_a_million_points_prints_at_once(tmp_path, capsys):
    ten = [0.1 * (i + 1) for i in range(10)]
    cfg = _cfg(gd__eta0=ten, gd__delta=[0.05 * i for i in range(10)], init__variance=ten,
               gd__steps=[10 * (i + 1) for i in range(10)], flow__rtol=[10.0**-i for i in
                                                                       range(1, 11)],
               flow__atol=[10.0**-i for i in range(1, 11)])
    rc, out, _ = _cli(["sweep", _write(tmp_path, cfg), "--dry-run"], capsys)
    assert rc == 0
    assert "grid: 1,000,000 points" in out and "memory: ~" in out
    assert "... and 999,950 more" in out


@pytest.mark.timeout(10)
def test_default_save_interval_without_a_linear_scan(tmp_path, capsys):
    assert default_save_every(1_000_000_007) == 1_000_000_007  # a prime: two saves
    assert default_save_every(10**11) == 10**9
    assert [default_save_every(n) for n in (1, 100, 101, 200, 1000)] == [1, 1, 101, 2, 10]
    rc, out, _ = _cli(["sweep", _write(tmp_path, _cfg(gd__steps=100_000_007)), "--dry-run"],
                      capsys)
    assert rc == 0 and "grid: 1 point" in out


# --- report and load on a damaged or foreign directory -------------------------------------------

@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "o"
    sweep.run(_cfg(flow=None), out, progress=False)
    return out


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_report_and_load_name_a_bad_point_file(tmp_path, capsys, finished_store, damage):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(finished_store, out)
    (point,) = (out / "points").glob("*.nc")
    data = point.read_bytes()
    point.write_bytes({"empty": b"", "garbage": b"not a netcdf file\n",
                       "truncated": data[: len(data) // 2]}[damage])
    rc, _, err = _cli(["report", out], capsys)
    line = _one_error_line(err)
    assert rc == 2 and str(point) in line and "--resume" in line
    with pytest.raises(sweep.ConfigError, match="cannot be opened"):
        sweep.load(out)


@pytest.mark.parametrize(("setup", "needle"), [
    ("missing", "not a sweep directory"),
    ("empty", "not a sweep directory"),
    ("file", "not a sweep directory"),
    ("unfinished", "no finished grid point"),
])
def test_report_on_a_directory_without_results(tmp_path, capsys, setup, needle):
    d = tmp_path / "d"
    if setup == "empty":
        d.mkdir()
    elif setup == "file":
        d.write_text("x")
    elif setup == "unfinished":
        d.mkdir()
        (d / "config.toml").write_text(to_toml(BASE))
    rc, _, err = _cli(["report", d], capsys)
    assert rc == 2 and needle in _one_error_line(err)


def test_report_dest_is_a_file(tmp_path, capsys, finished_store):
    (tmp_path / "f").write_text("x")
    rc, _, err = _cli(["report", finished_store, "--dest", tmp_path / "f"], capsys)
    assert rc == 2 and "--dest" in _one_error_line(err)
