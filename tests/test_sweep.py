"""flowsim.sweep, `flowsim sweep` and `flowsim report`: validation, grid, store, resume, shards."""

import copy
import pathlib

import jax
import numpy as np
import pytest

import flowsim
from flowsim import sweep
from flowsim.cli import main as cli_main

# A tiny problem: each point compiles once and runs in well under a second.
TINY = {
    "problem": {"sizes": [3, 4, 4, 2], "activation": "relu", "n": 8},
    "init": {"scheme": "balanced", "variance": 0.2, "seeds": 6},
    "gd": {"eta0": 0.1, "delta": [0.0, 0.5], "steps": 40, "save_every": 10},
    # Smooth kinks: these tests are about the sweep, and this compiles fastest.
    "flow": {"solver": "tsit5", "rtol": 1e-7, "atol": 1e-7, "max_steps": 20000, "kinks": "smooth"},
    "metrics": {
        "record": ["loss", "invariants", "drift", "ledger", "discretization", "solver_stats"]
    },
}


def _with(**changes):
    """TINY with `section.key=value` changes (value None deletes the key)."""
    cfg = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if not key:
            if value is None:
                cfg.pop(section)
            else:
                cfg[section] = value
            continue
        if value is None:
            cfg[section].pop(key)
        else:
            cfg[section][key] = value
    return cfg


def _toml(cfg) -> str:
    from flowsim.sweep._store import to_toml

    return to_toml(cfg)


# --- validation --------------------------------------------------------------------------------

MALFORMED = [
    (_with(gd__delta=0.7), "[gd].delta = 0.7: must be in [0, 1/2]"),
    (_with(gd__delta=[0.25, 0.9]), "[gd].delta[1] = 0.9: must be in [0, 1/2]"),
    (_with(gd__eta0="fast"), '[gd].eta0 = "fast": must be a number'),
    (_with(gd__eta0=-0.1), "[gd].eta0 = -0.1: must be positive"),
    (_with(gd__steps=10.5), "[gd].steps = 10.5: must be an integer"),
    (_with(gd__steps=True), "[gd].steps = true: must be an integer"),
    (_with(gd__save_every=7), "[gd].save_every = 7: must divide [gd].steps = 40"),
    (_with(gd__lr=0.1), "[gd].lr: unknown key"),
    (_with(optimiser={"name": "adam"}), "[optimiser]: unknown section"),
    (_with(init__seeds=0), "[init].seeds = 0: must be positive"),
    (_with(init__seeds=[4, 8]), "[init].seeds = [4, 8]: cannot be swept"),
    (_with(init__seeds=None), "[init].seeds: missing"),
    (_with(init__scheme="xavier"), '[init].scheme = "xavier": must be one of'),
    (_with(problem__activation="gelu"), '[problem].activation = "gelu": must be one of'),
    (_with(problem__sizes=[3, 2]), "[problem].sizes = [3, 2]: must list at least three widths"),
    (_with(problem__sizes=[3, 0, 2]), "[problem].sizes = [3, 0, 2]: widths must be positive"),
    (_with(problem__loss="logistic"), "[problem].sizes = [3, 4, 4, 2]: the logistic loss needs"),
    (_with(problem__n=None), "[problem].n: missing"),
    (_with(problem=None), "[problem]: missing section"),
    (_with(gd=None, flow=None), "nothing to run"),
    (_with(gd=None), "[flow].t1: missing"),
    (_with(flow__t1=3.0), "[flow].t1: not allowed with [gd]"),
    (_with(flow__solver="rk4"), '[flow].solver = "rk4": must be one of'),
    (_with(flow__rtol=0.0), "[flow].rtol = 0.0: must be positive"),
    (_with(gd__delta=[]), "[gd].delta = []: an empty sweep axis"),
    (_with(gd__delta=[0.25, 0.25]), "[gd].delta = [0.25, 0.25]: repeats a value"),
    (_with(metrics__record=["loss", "energy"]), 'unknown metric "energy"'),
    (_with(flow=None, metrics__record=["discretization"]), '"discretization" compares GD'),
    (_with(run={"devices": 0}), '[run].devices = 0: must be a positive integer or "all"'),
    (_with(gd="fast"), '[gd] = "fast": must be a table'),
    (_with(flow__error_estimate="yes"), '[flow].error_estimate = "yes": must be true or false'),
    (_with(flow__error_estimate=[True, False]),
     "[flow].error_estimate = [true, false]: cannot be swept"),
]


@pytest.mark.parametrize(("cfg", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_config_names_key(cfg, message):
    with pytest.raises(sweep.ConfigError) as info:
        sweep.load_config(cfg)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_cli_validation_error_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(_toml(_with(gd__delta=0.7)))
    assert cli_main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flowsim sweep: error: {bad}: [gd].delta = 0.7: must be in [0, 1/2]"
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_cli_bad_toml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "broken.toml"
    bad.write_text("[gd\neta0 = 1\n")
    assert cli_main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid TOML" in err[0]
    assert cli_main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_valid_toml_file_roundtrip(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(_toml(TINY))
    cfg = sweep.load_config(path)
    assert cfg.axis_names == ("delta",)
    assert cfg.seeds == 6
    assert sweep.load_config(_toml(cfg.to_dict())).digest() == cfg.digest()


@pytest.mark.parametrize("name", ["quickstart.toml", "fig2_gpu.toml"])
def test_examples_are_valid(name):
    root = pathlib.Path(__file__).parent.parent / "examples"
    cfg = sweep.load_config(root / name)
    assert cfg.has_gd and cfg.has_flow
    assert "drift" in cfg.metrics and "discretization" in cfg.metrics


# --- grid expansion ----------------------------------------------------------------------------


def test_grid_is_product_in_axis_order():
    cfg = sweep.load_config(
        _with(
            gd__delta=[0.0, 0.25, 0.5],
            gd__eta0=[0.1, 0.05],
            problem__sizes=[[3, 4, 2], [3, 5, 5, 2]],
        )
    )
    assert cfg.axis_names == ("sizes", "eta0", "delta")
    points = cfg.points()
    assert len(points) == 2 * 2 * 3
    assert [p.index for p in points] == list(range(12))
    first, last = points[0], points[-1]
    assert first.coords == {"sizes": "3-4-2", "eta0": 0.1, "delta": 0.0}
    assert last.coords == {"sizes": "3-5-5-2", "eta0": 0.05, "delta": 0.5}
    assert last.params["problem"]["sizes"] == [3, 5, 5, 2]
    assert last.params["gd"]["eta0"] == 0.05
    combos = {(p.coords["sizes"], p.coords["eta0"], p.coords["delta"]) for p in points}
    assert len(combos) == 12
    assert len({p.key for p in points}) == 12
    # Keys depend on the point, not on its position or on run-only settings.
    other = sweep.load_config(_with(gd__delta=[0.5, 0.0], run={"devices": 1})).points()
    mine = sweep.load_config(_with(gd__delta=[0.0, 0.5])).points()
    assert {p.key for p in other} == {p.key for p in mine}


def test_no_axes_is_one_point_and_defaults_resolve():
    cfg = sweep.load_config(_with(gd__delta=0.25, gd__save_every=None, gd__steps=1000))
    (point,) = cfg.points()
    assert point.coords == {}
    assert point.params["gd"]["save_every"] == 10  # ~100 saved iterates
    assert point.params["init"]["base_seed"] == 0


# --- running, the store, resume ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    res = sweep.run(TINY, out, progress=False)
    return out, res


def test_store_layout_and_load(tiny_run):
    out, res = tiny_run
    assert (res.total, res.ran, res.skipped) == (2, 2, 0)
    files = sorted((out / "points").iterdir())
    assert len(files) == 2 and all(f.suffix == ".nc" for f in files)
    ds = sweep.load(out)
    assert dict(ds.sizes) == {"delta": 2, "seed": 6, "time": 5, "layer": 2}
    assert list(ds["loss_gd"].dims) == ["delta", "seed", "time"]
    assert list(ds["drift_gd"].dims) == ["delta", "seed", "time", "layer"]
    assert list(ds["delta"].values) == [0.0, 0.5]
    for name in (
        "loss_flow",
        "drift_flow",
        "ledger_predicted",
        "ledger_error",
        "flow_num_steps",
        "flow_result",
        "gd_diverged_at",
        "t_gd",
        "wall_seconds",
        "gd_seconds",
        "disc_parameter",
        "disc_function",
        "disc_loss_gap",
    ):
        assert name in ds, name
    # GD and the flow start together and part at rate O(eta): larger steps, larger error.
    assert float(abs(ds["disc_parameter"].isel(time=0)).max()) == 0.0
    err = ds["disc_parameter"].isel(time=-1).median("seed")
    assert 0 < float(err.sel(delta=0.5)) < float(err.sel(delta=0.0))
    assert ds["gd_diverged_at"].dtype.kind == "i"
    assert bool(ds["finished"].all())
    assert "jax" in ds.attrs["flowsim_versions"] and "[gd]" in ds.attrs["config_toml"]
    assert ds.attrs["device"].startswith("4 x")
    # The GD drift ledger predicts the measured drift to rounding.
    assert float(ds["ledger_error"].max()) < 1e-13
    np.testing.assert_allclose(ds["drift_gd"], ds["ledger_predicted"], rtol=0, atol=1e-13)
    # The flow (rtol 1e-7) conserves the layer gaps far better than GD: 100x at the least.
    assert float(abs(ds["drift_flow"]).max()) < 1e-2 * float(abs(ds["drift_gd"]).max())
    assert int((ds["flow_result"] != 0).sum()) == 0


def test_flow_error_estimate_recorded_and_reported(tmp_path):
    # Off by default and then absent from the point's parameters, so the stores (and point
    # keys) of configs without it are unchanged; on, every seed's estimate is stored and the
    # summary table shows the largest. Flow only (no GD, no figures), 5 saves like the tiny run,
    # whose compiled flow it reuses.
    from flowsim.sweep import _report

    assert "error_estimate" not in sweep.load_config(TINY).points()[0].params["flow"]
    cfg = _with(gd=None, flow__error_estimate=True, flow__t1=0.5, flow__saves=5,
                metrics__record=["loss", "solver_stats"])
    out = tmp_path / "est"
    sweep.run(cfg, out, progress=False)
    ds = sweep.load(out)
    est = ds["flow_error_estimate"]
    assert est.dims == ("seed",)
    # rtol 1e-7 through ReLU kinks: up to ~3e-5, far below the solution's scale. A seed whose
    # solve the tolerance never binds (a few steps, none rejected) takes the same steps at
    # 1e-8, and its estimate is 0 (documented); most differ.
    assert bool((est < 1e-3).all()) and int((est > 1e-9).sum()) >= 4, est.values
    (row,) = _report._table(_report._points(ds), ds)
    assert row["flow error estimate (max)"] == float(est.max())


def test_rerun_skips_finished_points(tiny_run):
    out, _ = tiny_run
    before = {f.name: f.stat().st_mtime_ns for f in (out / "points").iterdir()}
    res = sweep.run(TINY, out, resume=True, progress=False)
    assert (res.ran, res.skipped) == (0, 2)
    after = {f.name: f.stat().st_mtime_ns for f in (out / "points").iterdir()}
    assert before == after


def test_other_config_refuses_store(tiny_run):
    out, _ = tiny_run
    with pytest.raises(sweep.ConfigError, match="different config"):
        sweep.run(_with(gd__eta0=0.2), out, progress=False)


def test_resume_needs_store(tmp_path):
    with pytest.raises(sweep.ConfigError, match="nothing to resume"):
        sweep.run(TINY, tmp_path / "fresh", resume=True, progress=False)


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert (
        cli_main(["sweep", _write(tmp_path, TINY), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "2 points over axes delta" in out
    assert not (tmp_path / "o").exists()


def _write(tmp_path, cfg, name="cfg.toml") -> str:
    path = tmp_path / name
    path.write_text(_toml(cfg))
    return str(path)


def test_partial_store_loads_with_nan(tmp_path):
    out = tmp_path / "partial"
    res = sweep.run(TINY, out, progress=False, max_points=1)
    assert res.ran == 1
    ds = sweep.load(out)
    assert list(ds["finished"].values) == [True, False]
    assert np.isnan(ds["loss_gd"].sel(delta=0.5)).all()
    assert np.isfinite(ds["loss_gd"].sel(delta=0.0)).all()
    with pytest.raises(sweep.ConfigError, match="not finished"):
        sweep.load(out, allow_partial=False)


def _assert_same(a, b):
    """Identical results: every metric bitwise equal (timings excluded)."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        if name.endswith("_seconds"):
            continue
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_sharded_equals_unsharded(tmp_path):
    assert len(jax.devices()) == 4
    cfg = _with(init__seeds=6, gd__delta=0.25)  # 6 seeds: padded to 8 over 4 devices
    one = sweep.load(sweep.run(cfg, tmp_path / "one", devices=1, progress=False).out)
    four = sweep.load(sweep.run(cfg, tmp_path / "four", devices=4, progress=False).out)
    assert one.attrs["device"].startswith("1 x") and four.attrs["device"].startswith("4 x")
    assert four.sizes["seed"] == 6
    # Each seed's computation is independent of the batch layout: equal to rounding.
    for name in one.data_vars:
        if name.endswith("_seconds"):
            continue
        np.testing.assert_allclose(
            four[name].values, one[name].values, rtol=1e-12, atol=1e-15, err_msg=name
        )


# Kills at random moments and resume: tests/test_store.py.


# --- report ------------------------------------------------------------------------------------


def test_report_writes_figures_and_table(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    dest = tmp_path / "rep"
    assert cli_main(["report", str(out), "--dest", str(dest)]) == 0
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["discretization.png", "drift.png", "loss.png", "summary.csv", "summary.md"]
    md = (dest / "summary.md").read_text()
    assert "| delta | seeds |" in md
    assert md.count("\n| 0 |") == 1 and md.count("\n| 0.5 |") == 1
    import matplotlib.image

    img = matplotlib.image.imread(dest / "drift.png")
    assert img.shape[0] > 400 and img.shape[1] > 800


def test_report_on_empty_dir_is_usage_error(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_public_api_exports():
    assert flowsim.sweep.run is sweep.run
    for name in sweep.__all__:
        assert hasattr(sweep, name)
