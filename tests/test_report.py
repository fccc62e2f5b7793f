"""`flowsim report`: seeds whose GD diverged or whose flow failed are left out of every aggregate
of their grid point, and the report counts them."""

import csv

import numpy as np
import pytest

from flowsim import sweep
from flowsim.sweep import _report

# A deep linear net at initial variance 0.9: at eta0 = 0.3 the largest of the four initialisations
# (seed 2) diverges in GD at step 7, the other three converge; at eta0 = 0.1 none diverges.
# A diverged seed holds its last finite iterate, ~1e100 and more, in every GD metric.
CFG = {
    "problem": {"sizes": [3, 4, 4, 2], "activation": "linear", "n": 8},
    "init": {"scheme": "balanced", "variance": 0.9, "seeds": 4},
    "gd": {"eta0": [0.1, 0.3], "delta": 0.0, "steps": 40, "save_every": 10},
    "flow": {"solver": "tsit5", "rtol": 1e-7, "atol": 1e-7, "max_steps": 20000, "kinks": "smooth"},
    "metrics": {
        "record": ["loss", "invariants", "drift", "ledger", "discretization", "solver_stats"]
    },
}

# The same with a flow step budget of 25: at eta0 = 0.1 the flow of seed 2 needs 25 steps or more
# (the others 19-22) and fails; at eta0 = 0.3 every flow needs more (27-49) and every seed fails.
CFG_FLOW_FAILS = {**CFG, "flow": {**CFG["flow"], "max_steps": 25}}

COUNTS = ("eta0", "seeds", "excluded seeds", "GD diverged", "flow failed", "wall s")


def _expected(ds, eta0):
    """The point's aggregates over its good seeds, computed here with plain numpy."""
    p = ds.sel(eta0=eta0)
    keep = (p["gd_diverged_at"].values < 0) & (p["flow_result"].values == 0)
    cols = {
        "final loss GD (median)": lambda v: np.median(np.abs(v["loss_gd"][:, -1])),
        "final loss flow (median)": lambda v: np.median(np.abs(v["loss_flow"][:, -1])),
        "max abs drift GD (median)": lambda v: np.median(np.abs(v["drift_gd"]).max(axis=(1, 2))),
        "max abs drift flow (median)": lambda v: np.median(
            np.abs(v["drift_flow"]).max(axis=(1, 2))
        ),
        "ledger error (max)": lambda v: np.max(v["ledger_error"]),
        "max ‖θ_GD − θ_flow‖ (median)": lambda v: np.median(
            np.abs(v["disc_parameter"]).max(axis=1)
        ),
        "flow steps (mean)": lambda v: np.mean(v["flow_num_steps"]),
    }
    if not keep.any():
        return keep, dict.fromkeys(cols, np.nan)
    names = (
        "loss_gd",
        "loss_flow",
        "drift_gd",
        "drift_flow",
        "ledger_error",
        "disc_parameter",
        "flow_num_steps",
    )
    v = {n: np.asarray(p[n].values, float)[keep] for n in names}
    for n, a in v.items():
        assert np.isfinite(a).all(), n  # the good seeds: no NaN for nan-aware reductions to skip
    return keep, {c: float(f(v)) for c, f in cols.items()}


def _rows(dest):
    with open(dest / "summary.csv", newline="") as f:
        return {float(r["eta0"]): r for r in csv.DictReader(f)}


def _check_aggregates(ds, rows):
    for eta0, row in rows.items():
        keep, want = _expected(ds, eta0)
        for col, value in want.items():
            np.testing.assert_allclose(
                float(row[col]), value, rtol=1e-12, atol=0, err_msg=f"eta0={eta0}: {col}"
            )
        assert int(row["seeds"]) == keep.size
    for eta0, row in rows.items():
        keep, want = _expected(ds, eta0)
        assert int(row["excluded seeds"]) == keep.size - keep.sum()
        # Every column is either a count (checked by the caller) or one checked here.
        assert set(row) == set(COUNTS) | set(want), sorted(set(row) ^ (set(COUNTS) | set(want)))


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "diverged"
    sweep.run(CFG, out, progress=False)
    dest = out / "rep"
    written = sweep.report(out, dest=dest)
    return sweep.load(out), dest, written


@pytest.fixture(scope="module")
def flow_fails(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "flow_fails"
    sweep.run(CFG_FLOW_FAILS, out, progress=False)
    dest = out / "rep"
    sweep.report(out, dest=dest)
    return sweep.load(out), dest


def test_diverged_seed_excluded_from_aggregates(diverged):
    ds, dest, _ = diverged
    div = ds["gd_diverged_at"]
    assert div.sel(eta0=0.1).values.tolist() == [-1, -1, -1, -1]
    assert (div.sel(eta0=0.3).values >= 0).tolist() == [False, False, True, False]
    assert int((ds["flow_result"] != 0).sum()) == 0
    # What the diverged seed would do to the aggregates if it were not left out.
    assert float(ds["ledger_error"].sel(eta0=0.3).max()) > 1e100
    assert float(ds["disc_parameter"].sel(eta0=0.3).max()) > 1e50

    rows = _rows(dest)
    assert sorted(rows) == [0.1, 0.3]
    _check_aggregates(ds, rows)
    assert rows[0.3]["excluded seeds"] == "1" and rows[0.3]["GD diverged"] == "1"
    assert rows[0.1]["excluded seeds"] == "0" and rows[0.1]["GD diverged"] == "0"
    assert rows[0.3]["flow failed"] == "0"
    assert float(rows[0.3]["ledger error (max)"]) < 1e-12

    md = (dest / "summary.md").read_text()
    assert "1 of 8 seeds excluded from the aggregates" in md
    assert "| eta0 | seeds | excluded seeds |" in md
    assert "\n| 0.3 | 4 | 1 |" in md and "\n| 0.1 | 4 | 0 |" in md
    assert "all 4 seeds excluded" not in md


def test_figures_written_and_final_error_panel_masked(diverged):
    import matplotlib
    import matplotlib.image
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    ds, dest, written = diverged
    names = sorted(p.name for p in written)
    assert names == ["discretization.png", "drift.png", "loss.png", "summary.csv", "summary.md"]
    for name in ("discretization.png", "drift.png", "loss.png"):
        img = matplotlib.image.imread(dest / name)
        assert img.shape[0] > 400 and img.shape[1] > 800, name
        assert np.ptp(img[..., :3]) > 0.5, name  # something is drawn
    # The final-error-vs-eta0 panel: the median over the good seeds, not 1e50 from seed 2.
    fig, ax = plt.subplots()
    try:
        _report._disc_vs_eta0(ax, ds, ["eta0"])
        (line,) = ax.get_lines()
        y = np.asarray(line.get_ydata(), float)
    finally:
        plt.close(fig)
    final = ds["disc_parameter"].isel(time=-1).values
    want = [np.median(final[0]), np.median(final[1, [0, 1, 3]])]
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=0)


def test_failed_flows_excluded_and_empty_point_is_nan(flow_fails):
    ds, dest = flow_fails
    res = ds["flow_result"]
    assert (res.sel(eta0=0.1).values != 0).tolist() == [False, False, True, False]
    assert bool((res.sel(eta0=0.3) != 0).all())

    rows = _rows(dest)
    _check_aggregates(ds, rows)
    assert rows[0.1]["excluded seeds"] == "1" and rows[0.1]["flow failed"] == "1"
    assert rows[0.3]["excluded seeds"] == "4" and rows[0.3]["flow failed"] == "4"
    assert rows[0.3]["GD diverged"] == "1"  # counted, though the flow already excluded it
    empty = [c for c in rows[0.3] if c not in COUNTS]
    assert empty and all(np.isnan(float(rows[0.3][c])) for c in empty)

    md = (dest / "summary.md").read_text()
    assert "5 of 8 seeds excluded from the aggregates" in md
    assert "η₀=0.3: all 4 seeds excluded, no aggregates (nan)." in md
    assert "\n| 0.3 | 4 | 4 | nan |" in md
