"""`flowsim sweep` with `[problem] kind`: every family end to end, a problem of the user's own,
one compilation per solve across a sweep, and every bad input of the new kinds in one line."""

import copy
import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.monitoring
import numpy as np
import pytest

import flowsim
from flowsim import sweep
from flowsim.sweep import _run
from flowsim.sweep._schema import INIT_SCHEMES, PROBLEM_FIELDS

from .test_bad_inputs import _cli, _dry_run_fails, _one_error_line, _write

ROOT = pathlib.Path(__file__).parent.parent
USER = "tests.user_problem:make_problem"

# The smallest instance of each family, with one sweep axis that keeps the shapes (each solve
# compiles once per family).
PROBLEMS = {
    "mlp": {"kind": "mlp", "sizes": [3, 4, 2], "n": 8, "activation": "tanh",
            "data_seed": [0, 1]},
    "factorization": {"kind": "factorization", "shape": [4, 3], "rank": 2,
                      "spectrum": [1.0, 0.5]},
    "conv": {"kind": "conv", "in_shape": [1, 5, 5], "channels": [2, 2], "out_features": 1,
             "n": 4, "noise": [0.0, 0.1]},
    "two_layer_relu": {"kind": "two_layer_relu", "dim": 4, "width": 4,
                       "labels": [[1.0, -0.5, 0.3], [0.5, 0.5, -1.0]]},
    "deep_linear_logistic": {"kind": "deep_linear_logistic", "sizes": [3, 3, 1], "n": 8,
                             "margin": [0.1, 0.2]},
}
AXIS = {"mlp": "data_seed", "factorization": "delta", "conv": "noise", "two_layer_relu": "labels",
        "deep_linear_logistic": "margin"}
# The family's own metrics (`problem.metrics`), recorded along GD and the flow.
OWN_METRICS = {
    "mlp": (),
    "factorization": ("gram_gap", "gram_drift", "param_norm", "relative_error"),
    "conv": (),
    "two_layer_relu": ("variation_norm", "min_variation_norm"),
    "deep_linear_logistic": ("margin_angle", "margin_ratio"),
}
DELTAS = [0.0, 0.1, 0.25, 0.5]


def _config(problem, **sections):
    """A tiny sweep: 2 seeds, 20 GD steps saved every 5, the flow at a loose tolerance."""
    cfg = {
        "problem": copy.deepcopy(problem),
        "init": {"seeds": 2},
        "gd": {"eta0": 0.05, "steps": 20, "save_every": 5},
        "flow": {"solver": "tsit5", "rtol": 1e-5, "atol": 1e-5, "kinks": "smooth"},
    }
    if isinstance(problem.get("kind"), str) and problem["kind"] in PROBLEM_FIELDS:
        cfg["init"]["variance"] = 0.1
    for name, value in sections.items():
        if value is None:
            cfg.pop(name, None)
        else:
            cfg[name] = value
    return cfg


# --- compilations --------------------------------------------------------------------------------

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class _Compiles:
    """Every XLA compilation (jax.monitoring's backend-compile event), tagged with the grid
    point being run (-1: before the first point: validation, problem, memory check)."""

    def __init__(self):
        self.events: list[tuple[int, str]] = []
        self.point = -1

    def __call__(self, event, duration, **kwargs):
        del duration
        if event == BACKEND_COMPILE:
            self.events.append((self.point, str(kwargs.get("fun_name"))))

    def count(self, name):
        return sum(1 for _, n in self.events if n == name)


def _run_counting(cfg, out, monkeypatch):
    counter = _Compiles()
    original = _run._run_point

    def tagged(point, *args, **kwargs):
        counter.point = point.index
        return original(point, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_run, "_run_point", tagged)
        jax.monitoring.register_event_duration_secs_listener(counter)
        try:
            sweep.run(cfg, out, progress=False)
        finally:
            jax.monitoring.unregister_event_duration_listener(counter)
    return counter


@pytest.fixture(scope="module")
def factorization_sweep(tmp_path_factory):
    """A 4-point delta sweep of the factorization, GD and flow, from empty JAX caches; then a
    second one with other deltas into a fresh store. Returns the first store and both counts."""
    base = tmp_path_factory.mktemp("fact")
    monkeypatch = pytest.MonkeyPatch()
    try:
        jax.clear_caches()
        cfg = _config(PROBLEMS["factorization"], gd={"eta0": 0.1, "delta": DELTAS,
                                                        "steps": 20, "save_every": 5})
        first = _run_counting(cfg, base / "a", monkeypatch)
        cfg["gd"]["delta"] = [0.05, 0.15, 0.3, 0.4]
        second = _run_counting(cfg, base / "b", monkeypatch)
    finally:
        monkeypatch.undo()
    return base / "a", first, second


def test_factorization_sweep_compiles_each_solve_once(factorization_sweep):
    _, first, second = factorization_sweep
    names = {n for _, n in first.events}
    assert {"jit(_gd_solve)", "jit(_flow_solve)"} <= names, sorted(names)
    # The GD solve and the flow's solve: exactly once over the 4 points.
    assert first.count("jit(_gd_solve)") == 1, first.events
    assert first.count("jit(_flow_solve)") == 1, first.events
    # Every function is compiled at most once per shape: the points share every shape, so
    # after the first point nothing compiles at all. (Within the first point a name may
    # compile twice for different static arguments: _traj_metrics of the GD and of the flow
    # trajectory, jr.normal of two shapes.)
    later = [(p, n) for p, n in first.events if p >= 1]
    assert later == [], later
    assert {p for p, _ in first.events} <= {-1, 0}
    # Other delta values, a fresh store: nothing new to compile (the deltas are arrays).
    assert second.count("jit(_gd_solve)") == 0 and second.count("jit(_flow_solve)") == 0
    assert second.events == [], second.events


# --- every family end to end ---------------------------------------------------------------------

def _check_store(out, kind, axis, n_axis):
    ds = sweep.load(out)
    assert bool(ds["finished"].all())
    assert sweep.load_config(out / "config.toml").kind == kind
    want = (axis, "seed", "time")
    names = ["loss_gd", "loss_flow", "disc_parameter", "disc_loss_gap"]
    if kind == "factorization":  # no inputs: the function distance is NaN (documented)
        assert np.isnan(ds["disc_function"].values).all()
    else:
        names.append("disc_function")
    names += [f"{m}_{w}" for m in OWN_METRICS[kind] for w in ("gd", "flow")]
    for name in names:
        assert name in ds, (name, sorted(ds.data_vars))
        assert ds[name].dims == want, (name, ds[name].dims)
        assert ds[name].shape == (n_axis, 2, 5), (name, ds[name].shape)
        assert np.isfinite(ds[name].values).all(), name
    assert int((ds["flow_result"] != 0).sum()) == 0
    assert int((ds["gd_diverged_at"] >= 0).sum()) == 0
    for name in ("drift_gd", "drift_flow", "layer_gap_gd", "ledger_predicted"):
        assert ds[name].dims == (*want, "layer") and np.isfinite(ds[name].values).all(), name
    return ds


def _check_report(out):
    written = sweep.report(out)
    assert written, "report wrote nothing"
    for path in written:
        assert path.is_file() and path.stat().st_size > 0, path
    suffixes = {path.suffix for path in written}
    assert ".png" in suffixes and ".md" in suffixes, written


@pytest.fixture(scope="module")
def mlp_sweep(tmp_path_factory):
    """The mlp family's sweep (2 grid points, sharded over the 4 host devices, a tanh network:
    its balance gaps are recorded though not conserved); also the layout a user problem's
    store is compared with. Returns the store and the warnings the run emitted."""
    out = tmp_path_factory.mktemp("mlp") / "mlp"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sweep.run(_config(PROBLEMS["mlp"]), out, progress=False)
    assert (res.total, res.ran) == (2, 2)
    return out, caught


def test_mlp_end_to_end(mlp_sweep):
    out, _ = mlp_sweep
    ds = _check_store(out, "mlp", "data_seed", 2)
    assert "alignment_gd" in ds and not [v for v in ds.data_vars if v.startswith("margin")]
    assert ds.attrs["device"].startswith("4 x")
    _check_report(out)


def test_sweep_of_a_tanh_network_does_not_warn(mlp_sweep):
    _, caught = mlp_sweep
    assert not [str(w.message) for w in caught
                if issubclass(w.category, flowsim.invariants.NotConservedWarning)]


@pytest.mark.parametrize("kind", ["conv", "two_layer_relu", "deep_linear_logistic"])
def test_family_end_to_end(tmp_path, kind):
    # On one device: compiling for 4 sharded devices costs more, and the sharded path is run by
    # the mlp and factorization sweeps and by test_conv_sharded_over_devices.
    # two_layer_relu: its non-default scheme, whose draw is traced in the sweep's batched init.
    init = {"seeds": 2, "variance": 0.1, "scheme": "gaussian"} if kind == "two_layer_relu" \
        else None
    out = tmp_path / kind
    cfg = _config(PROBLEMS[kind], run={"devices": 1})
    cfg["init"] = init or cfg["init"]
    res = sweep.run(cfg, out, progress=False)
    assert (res.total, res.ran) == (2, 2)
    ds = _check_store(out, kind, AXIS[kind], 2)
    alignment = "alignment_gd" in ds
    # record "all": alignment where the network has two adjacent matrix layers; conv and the
    # two-layer ReLU network (W, a) silently not (documented).
    assert alignment == (kind == "deep_linear_logistic"), sorted(ds.data_vars)
    if kind == "two_layer_relu":
        # min_variation_norm is the closed form of each grid point's labels, constant in time.
        v = ds["min_variation_norm_gd"].values
        assert np.all(v == v[:, :1, :1])
        assert v[0, 0, 0] != v[1, 0, 0]
    if kind == "deep_linear_logistic":
        assert np.all(ds["margin_angle_gd"].values >= 0)
        assert np.all(ds["margin_angle_gd"].values <= np.pi)
    _check_report(out)


def test_factorization_end_to_end(factorization_sweep):
    out, _, _ = factorization_sweep
    ds = _check_store(out, "factorization", "delta", 4)
    assert list(ds["delta"].values) == DELTAS
    assert ds["ledger_bound"].dims == ("delta", "seed", "time")
    # Thm 3.1 along the sweep's own GD: the Gram-gap drift within the stored ledger bound.
    drift, bound = ds["gram_drift_gd"].values, ds["ledger_bound"].values
    assert np.all(drift <= bound * (1 + 1e-12)), float(np.max(drift - bound))
    assert np.all(bound[..., -1] > 0)
    # A larger delta: smaller steps, a smaller bound.
    last = ds["ledger_bound"].isel(time=-1).median("seed").values
    assert np.all(np.diff(last) < 0), last
    # The flow conserves the Gram gap far better than GD drifts it.
    assert float(ds["gram_drift_flow"].max()) < 1e-2 * float(ds["gram_drift_gd"].max())
    _check_report(out)


def test_conv_sharded_over_devices(tmp_path):
    """A vmapped convolution with batched filters compiles sharded over devices (ConvNet
    convolves by patches times filters, not a grouped convolution)."""
    assert len(jax.devices()) == 4
    cfg = _config({**PROBLEMS["conv"], "noise": 0.0}, flow=None, run={"devices": "all"})
    res = sweep.run(cfg, tmp_path / "conv4", progress=False)
    ds = sweep.load(res.out)
    assert ds.attrs["device"].startswith("4 x") and res.ran == res.total
    assert np.isfinite(ds["loss_gd"].values).all()


def test_record_all_on_conv_skips_alignment():
    cfg = sweep.load_config(_config(PROBLEMS["conv"]))
    assert "alignment" not in cfg.metrics
    assert set(cfg.metrics) == {"loss", "invariants", "drift", "ledger", "discretization",
                                "solver_stats"}


# --- a problem of the user's own -----------------------------------------------------------------

def _layout(out: pathlib.Path, keys) -> set[str]:
    """Relative file names of a store, point keys replaced by KEY."""
    names = set()
    for path in out.rglob("*"):
        if path.is_file() and "report" not in path.relative_to(out).parts:
            rel = str(path.relative_to(out))
            for key in keys:
                rel = rel.replace(key, "KEY")
            names.add(rel)
    return names


INVARIANT_VARS = re.compile(r"^(layer_gap|layer_norm|drift|unit_drift_max|alignment)_(gd|flow)$"
                            r"|^ledger_|^flow_layer_gap_drift$")
BASIC_VARS = {"loss_gd", "loss_flow", "disc_parameter", "disc_function", "disc_loss_gap", "t_gd",
              "t_flow", "step", "eta", "eta_sq_sum", "flow_result", "gd_diverged_at",
              "flow_num_steps", "finished", "wall_seconds"}


def test_user_factory_validates():
    cfg = sweep.load_config(_config({"kind": USER, "width": [4, 6]}))
    assert cfg.kind == USER and cfg.axis_names == ("width",)
    assert [p.params["problem"]["width"] for p in cfg.points()] == [4, 6]
    assert "init" not in cfg.sections["init"] and "scheme" not in cfg.sections["init"]


def test_user_factory_store_has_the_mlp_layout(tmp_path, mlp_sweep):
    reference, _ = mlp_sweep
    out = tmp_path / "user"
    # One device (the mlp store is sharded over 4: the layout does not depend on it).
    res = sweep.run(_config({"kind": USER, "width": [4, 6]}, run={"devices": 1}), out,
                    progress=False)
    assert (res.total, res.ran) == (2, 2)
    cfg_user = sweep.load_config(out / "config.toml")
    cfg_mlp = sweep.load_config(reference / "config.toml")
    user_layout = _layout(out, [p.key for p in cfg_user.points()])
    mlp_layout = _layout(reference, [p.key for p in cfg_mlp.points()])
    assert user_layout == mlp_layout
    assert {"config.toml", "manifest.json", "points/KEY.nc"} <= user_layout
    ds, ref = sweep.load(out), sweep.load(reference)
    assert list(ds["width"].values) == [4, 6]
    assert BASIC_VARS <= set(ds.data_vars), sorted(BASIC_VARS - set(ds.data_vars))
    # The variables that apply are the mlp's; the balance invariants do not apply (record
    # "all": left out, not an error).
    assert set(ds.data_vars) <= set(ref.data_vars), sorted(set(ds.data_vars) - set(ref.data_vars))
    assert not [v for v in ds.data_vars if INVARIANT_VARS.search(v)]
    assert {v for v in ref.data_vars if not INVARIANT_VARS.search(v)} == set(ds.data_vars)
    for name in ("loss_gd", "loss_flow", "disc_parameter"):
        assert ds[name].dims == ("width", "seed", "time") and np.isfinite(ds[name]).all()
    _check_report(out)


@pytest.mark.parametrize("metric", ["drift", "invariants", "ledger", "alignment"])
def test_user_factory_refuses_invariant_metrics(tmp_path, capsys, metric):
    cfg = _config({"kind": USER, "width": [4, 6]}, metrics={"record": ["loss", metric]})
    rc, _, err = _cli(["sweep", _write(tmp_path, cfg), "--dry-run", "--out", tmp_path / "o"],
                      capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert f'"{metric}"' in line and "Regressor" in line, line
    out = tmp_path / "lib"
    with pytest.raises(sweep.ConfigError, match=f'"{metric}"'):
        sweep.run(cfg, out, progress=False)
    assert not out.exists()  # refused before any work


# --- bad inputs: one line naming the key, exit status 2 ------------------------------------------

_WRONG = {"int": "many", "float": "big", "str": 3, "int_list": "wide", "float_list": "loud"}
_FIELD_CASES = [(kind, key, _WRONG[f.kind]) for kind, fields in PROBLEM_FIELDS.items()
                for key, f in fields.items()]


@pytest.mark.parametrize(("kind", "key", "value"), _FIELD_CASES,
                         ids=[f"{k}.{f}" for k, f, _ in _FIELD_CASES])
def test_wrong_type_of_every_family_field(tmp_path, capsys, kind, key, value):
    problem = {k: (v[0] if k == AXIS[kind] else v) for k, v in PROBLEMS[kind].items()}
    problem[key] = value
    _dry_run_fails(tmp_path, capsys, _config(problem), f"[problem].{key} = ", "must be")


def _other_scheme(kind):
    return next(s for k in INIT_SCHEMES for s in INIT_SCHEMES[k] if s not in INIT_SCHEMES[kind])


_FACT = {k: v for k, v in PROBLEMS["factorization"].items()}
_TWO = {**PROBLEMS["two_layer_relu"], "labels": [1.0, -0.5, 0.3]}
_CASES = [
    ("kind unknown", _config({"kind": "resnet", "n": 8}),
     '[problem].kind = "resnet": must be one of "mlp", "factorization"'),
    ("kind a list", _config({"kind": ["mlp", "conv"], "n": 8}),
     '[problem].kind = ["mlp", "conv"]: cannot be swept'),
    ("kind a number", _config({"kind": 3}), "[problem].kind = 3: must be a string"),
    ("kind a module without function", _config({"kind": "tests.user_problem"}),
     '[problem].kind = "tests.user_problem": must be one of'),
    ("factory does not import", _config({"kind": "no_such_pkg.problems:make"}),
     "cannot import module 'no_such_pkg.problems'"),
    ("factory has no such function", _config({"kind": "tests.user_problem:nope"}),
     "module 'tests.user_problem' has no 'nope'"),
    ("factory does not take a key", _config({"kind": USER, "depth": 3}),
     "cannot take these [problem] keys", "depth"),
    ("factory axis value it does not take", _config({"kind": USER, "depth": [1, 2]}),
     "cannot take these [problem] keys", "depth"),
    ("factory returns no problem", _config({"kind": "tests.user_problem:not_a_problem"}),
     "returned a dict, not a flowsim.problems.AbstractProblem"),
    ("scheme given to a factory",
     _config({"kind": USER}, init={"seeds": 2, "scheme": "balanced"}),
     "[init].scheme: a problem of your own draws its models in init(key)"),
    ("variance given to a factory", _config({"kind": USER}, init={"seeds": 2, "variance": 0.1}),
     "[init].variance: a problem of your own"),
    ("field of another family", _config({**_FACT, "sizes": [3, 4, 2]}),
     "[problem].sizes: unknown key; [problem] takes kind, shape, rank, spectrum, data_seed"),
    ("required field missing", _config({"kind": "factorization", "shape": [4, 3], "rank": 2}),
     "[problem].spectrum: missing; singular values of M"),
    ("spectrum longer than min(shape)", _config({**_FACT, "spectrum": [1.0, 1.0, 1.0, 1.0]}),
     "[problem].spectrum = [1.0, 1.0, 1.0, 1.0]: a 4 x 3 target has at most 3 singular values"),
    ("spectrum too long for one shape of an axis",
     _config({**_FACT, "shape": [[4, 3], [2, 2]], "spectrum": [1.0, 1.0, 1.0]}),
     "[problem].spectrum = [1.0, 1.0, 1.0]: a 2 x 2 target has at most 2"),
    ("shape of three", _config({**_FACT, "shape": [4, 3, 2]}),
     "[problem].shape = [4, 3, 2]: must list 2 integers"),
    ("rank 0", _config({**_FACT, "rank": 0}), "[problem].rank = 0: must be positive"),
    ("more labels than dim", _config({**_TWO, "dim": 2}),
     "[problem].labels = [1.0, -0.5, 0.3]: one label per orthogonal input, and R^2 holds at "
     "most 2"),
    ("no labels", _config({**_TWO, "labels": []}),
     "[problem].labels = []: must list at least one value"),
    ("one conv layer", _config({**PROBLEMS["conv"], "channels": [2], "noise": 0.0}),
     "[problem].channels = [2]: must list at least two convolutions"),
    ("logistic network with two outputs",
     _config({**PROBLEMS["deep_linear_logistic"], "sizes": [3, 3, 2], "margin": 0.1}),
     "[problem].sizes = [3, 3, 2]: must end with one output"),
    ("exact kinks on factorization", _config(_FACT, flow={"kinks": "exact"}),
     '[flow].kinks = "exact": needs a ReLU or leaky-ReLU network, but kind = "factorization" '
     "has no kinks"),
    ("exact kinks on deep linear logistic",
     _config({**PROBLEMS["deep_linear_logistic"], "margin": 0.1}, flow={"kinks": "exact"}),
     'kind = "deep_linear_logistic" has no kinks'),
    ("exact kinks on a tanh conv",
     _config({**PROBLEMS["conv"], "activation": "tanh"}, flow={"kinks": "exact"}),
     '[problem].activation = "tanh" has no kinks'),
    ("alignment on conv", _config(PROBLEMS["conv"], metrics={"record": ["alignment"]}),
     '[metrics].record: "alignment" does not apply to kind = "conv"'),
    ("alignment on two_layer_relu", _config(_TWO, metrics={"record": ["loss", "alignment"]}),
     '"alignment" does not apply to kind = "two_layer_relu"'),
    ("problem metrics on mlp", _config(PROBLEMS["mlp"], metrics={"record": ["problem"]}),
     '"problem" does not apply to kind = "mlp"'),
]


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_bad_problem_input(tmp_path, capsys, case):
    _, cfg, *needles = case
    _dry_run_fails(tmp_path, capsys, cfg, *needles)


@pytest.mark.parametrize("kind", sorted(INIT_SCHEMES))
def test_scheme_of_another_family(tmp_path, capsys, kind):
    scheme = _other_scheme(kind)
    cfg = _config(PROBLEMS[kind], init={"seeds": 2, "scheme": scheme})
    choices = ", ".join(f'"{s}"' for s in INIT_SCHEMES[kind])
    _dry_run_fails(tmp_path, capsys, cfg, f'[init].scheme = "{scheme}": must be one of {choices}')


@pytest.mark.parametrize("problem", [{"kind": "tests.user_problem:not_a_problem"},
                                     {"kind": USER, "width": "wide"}])
def test_factory_build_error_names_the_config(tmp_path, capsys, problem):
    path = _write(tmp_path, _config(problem))
    rc, _, err = _cli(["sweep", path, "--dry-run"], capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert line.startswith(f"flowsim sweep: error: {path}: [problem].kind = "), line


def test_python_m_flowsim_dry_run(tmp_path):
    """The module entry point as a user runs it from the repository: a factory found on the
    working directory is validated and its grid listed."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    good = _write(tmp_path, _config({"kind": USER, "width": [4, 6]}), "good.toml")
    ok = subprocess.run([sys.executable, "-m", "flowsim", "sweep", str(good), "--dry-run",
                         "--out", str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "2 points over axes width" in ok.stdout
    assert not (tmp_path / "o").exists()
