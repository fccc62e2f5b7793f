"""`flowsim report`: figures and a table of headline numbers from a sweep store.

Figures (PNG, matplotlib Agg) go to `OUT/report/`:

- `drift.png`: |change of each layer gap| since t = 0 vs time, GD (solid) and flow (dashed),
  one panel per pair of adjacent layers, one colour per grid point, median over seeds with a
  10-90 % band;
- `discretization.png`: ||theta_GD(t_k) - theta_flow(t_k)|| vs time and vs the step size eta_k;
- `loss.png`: loss vs time, GD and flow, median with seed band;
- `summary.md`, `summary.csv`: one row per grid point.
"""

import csv
import json
import pathlib

import numpy as np

from ._store import load


def _points(ds):
    """(label, sub-dataset) for every finished grid point, in grid order."""
    axes = json.loads(ds.attrs.get("grid_axes", "[]"))
    if not axes:
        return [("all", ds)] if bool(ds["finished"]) else []
    out = []
    idx = np.ndindex(*(ds.sizes[a] for a in axes))
    for i in idx:
        sel = {a: ds[a].values[j] for a, j in zip(axes, i)}
        sub = ds.sel(sel)
        if not bool(sub["finished"]):
            continue
        label = ", ".join(f"{_sym(a)}={_num(v)}" for a, v in sel.items())
        out.append((label, sub))
    return out


_SYMBOLS = {"delta": "δ", "eta0": "η₀", "variance": "σ²"}


def _sym(axis: str) -> str:
    return _SYMBOLS.get(axis, axis)


def _num(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{float(v):g}"
    return str(v)


def _band(ax, t, values, color, label, style="-", log=True, lw=1.6, alpha=1.0):
    """Median over seeds (axis 0) with a 10-90 % band."""
    v = np.asarray(values, dtype=float)
    if log:
        v = np.where(v > 0, v, np.nan)
    ok = np.isfinite(v).any(axis=0)
    if not ok.any():
        return
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(v[:, ok], axis=0)
            lo = np.nanquantile(v[:, ok], 0.1, axis=0)
            hi = np.nanquantile(v[:, ok], 0.9, axis=0)
    t = np.asarray(t)[ok]
    ax.plot(t, med, style, color=color, label=label, lw=lw, alpha=alpha)
    if v.shape[0] > 1:
        ax.fill_between(t, lo, hi, color=color, alpha=0.18, lw=0)


def _colors(n):
    import matplotlib

    cmap = matplotlib.colormaps["viridis" if n > 6 else "tab10"]
    return [cmap(i / max(n - 1, 1)) if n > 6 else cmap(i) for i in range(n)]


def _time(sub, which):
    name = "t_gd" if which == "gd" and "t_gd" in sub else "t_flow"
    return np.asarray(sub[name].values, dtype=float)


def _finish(fig, axes, path, legend_title=None):
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside right upper",
            title=legend_title,
            fontsize=9,
            title_fontsize=9,
            frameon=False,
        )
    fig.savefig(path, dpi=130)


def _fig_drift(points, path, seeds):
    import matplotlib.pyplot as plt

    first = points[0][1]
    layers = first.sizes["layer"]
    has_k = "step" in first
    rows = 2 if has_k else 1
    fig, axes = plt.subplots(
        rows, layers, figsize=(4.6 * layers + 2.6, 3.4 * rows), squeeze=False, layout="constrained"
    )
    colors = _colors(len(points))
    for (label, sub), c in zip(points, colors):
        for h in range(layers):
            for r in range(rows):
                ax = axes[r, h]
                x_gd = np.asarray(sub["step"].values, float) if r == 1 else _time(sub, "gd")
                x_fl = x_gd if r == 1 else _time(sub, "flow")
                if "drift_gd" in sub:
                    _band(ax, x_gd, np.abs(sub["drift_gd"].isel(layer=h).values), c, f"{label} GD")
                if "drift_flow" in sub:
                    _band(
                        ax,
                        x_fl,
                        np.abs(sub["drift_flow"].isel(layer=h).values),
                        c,
                        f"{label} flow",
                        style="--",
                    )
    for h in range(layers):
        axes[0, h].set_title(
            rf"$|\Delta(\|W_{h + 1}\|_F^2 - \|W_{h + 2}\|_F^2)|$ since $t = 0$", fontsize=10
        )
        axes[0, h].set_xlabel(r"time $t$   (GD iterate $k$ at $t_k = \sum_{i<k} \eta_i$)")
        if has_k:
            axes[1, h].set_xscale("log")
            axes[1, h].set_xlabel(r"GD iteration $k$ (flow at the matching $t_k$)")
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    for r in range(rows):
        axes[r, 0].set_ylabel("|drift|: median, 10–90 % band")
    fig.suptitle(
        f"Layer-gap drift, GD (solid) vs gradient flow (dashed); {seeds} seeds per point",
        fontsize=11,
    )
    _finish(fig, list(axes.flat), path)
    plt.close(fig)


def _fig_disc(points, ds, path, seeds):
    import matplotlib.pyplot as plt

    axes_names = json.loads(ds.attrs.get("grid_axes", "[]"))
    by_eta0 = "eta0" in axes_names and ds.sizes["eta0"] > 1
    if by_eta0:
        fig, grid = plt.subplots(2, 2, figsize=(12.5, 7.8), layout="constrained")
        axes = list(grid.flat)
    else:
        fig, grid = plt.subplots(1, 3, figsize=(16.2, 3.9), layout="constrained")
        axes = list(grid)
    colors = _colors(len(points))
    for (label, sub), c in zip(points, colors):
        t = _time(sub, "gd")
        par = np.asarray(sub["disc_parameter"].values)
        _band(axes[0], t, par, c, label)
        if "eta_sq_sum" in sub:
            _band(axes[1], np.asarray(sub["eta_sq_sum"].values, float), par, c, label)
        if "disc_function" in sub and np.isfinite(sub["disc_function"].values).any():
            _band(axes[2], t, np.asarray(sub["disc_function"].values), c, label)
    axes[0].set_xlabel(r"time $t_k$")
    axes[0].set_ylabel(r"$\|\theta_{GD}(t_k) - \theta_{flow}(t_k)\|_2$")
    axes[0].set_title("parameter error vs time", fontsize=10)
    axes[1].set_xscale("log")
    axes[1].set_xlabel(r"accumulated squared step $\sum_{i<k} \eta_i^2$")
    axes[1].set_ylabel(r"$\|\theta_{GD} - \theta_{flow}\|_2$")
    axes[1].set_title(r"parameter error vs $\sum\eta^2$ (local error $O(\eta_k^2)$)", fontsize=10)
    axes[2].set_xlabel(r"time $t_k$")
    axes[2].set_ylabel(r"RMS$_x\ \|f_{GD}(x) - f_{flow}(x)\|$")
    axes[2].set_title("function error vs time", fontsize=10)
    if by_eta0:
        _disc_vs_eta0(axes[3], ds, axes_names)
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(
        f"Discretization error GD ↔ gradient flow at matched times "
        f"(median, 10–90 % over {seeds} seeds)",
        fontsize=11,
    )
    _finish(fig, axes, path)
    plt.close(fig)


def _disc_vs_eta0(ax, ds, axes_names):
    """Final parameter error against eta0, one line per combination of the other axes."""
    import warnings

    others = [a for a in axes_names if a != "eta0"]
    final = ds["disc_parameter"].isel(time=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = final.median("seed")
    combos = list(np.ndindex(*(ds.sizes[a] for a in others))) if others else [()]
    colors = _colors(len(combos))
    for i, c in zip(combos, colors):
        sel = {a: ds[a].values[j] for a, j in zip(others, i)}
        y = np.asarray(med.sel(sel).values, float)
        label = ", ".join(f"{_sym(a)}={_num(v)}" for a, v in sel.items()) or "final error"
        ax.plot(ds["eta0"].values, y, "o-", color=c, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(r"$\eta_0$")
    ax.set_ylabel(r"final $\|\theta_{GD} - \theta_{flow}\|_2$ (median)")
    ax.set_title(r"final parameter error vs $\eta_0$", fontsize=10)
    ax.legend(fontsize=8, frameon=False)


def _fig_loss(points, path, seeds):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.2, 4.2), layout="constrained")
    colors = _colors(len(points))
    lo, hi = np.inf, 0.0
    for (label, sub), c in zip(points, colors):
        # GD wide and pale, flow thin and dashed on top: both stay visible where they coincide.
        if "loss_gd" in sub:
            _band(ax, _time(sub, "gd"), sub["loss_gd"].values, c, f"{label} GD", lw=3.2, alpha=0.55)
        if "loss_flow" in sub:
            _band(
                ax,
                _time(sub, "flow"),
                sub["loss_flow"].values,
                c,
                f"{label} flow",
                style="--",
                lw=1.3,
            )
        for name in ("loss_gd", "loss_flow"):
            if name in sub:
                v = np.asarray(sub[name].values, float)
                v = v[np.isfinite(v) & (v > 0)]
                if v.size:
                    lo, hi = min(lo, v.min()), max(hi, v.max())
    if hi > 0 and hi / lo > 20:
        ax.set_yscale("log")
    ax.set_xlabel(r"time $t$   (GD iterate $k$ at $t_k = \sum_{i<k} \eta_i$)")
    ax.set_ylabel("training loss")
    ax.set_title(
        f"Loss: GD (solid) vs gradient flow (dashed); median, 10–90 % over {seeds} seeds",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    _finish(fig, [ax], path)
    plt.close(fig)


def _nanmax_seedmedian(a, reduce_axes):
    a = np.abs(np.asarray(a, dtype=float))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_seed = np.nanmax(a, axis=reduce_axes) if reduce_axes else a
            return float(np.nanmedian(per_seed))


def _table(points, ds):
    rows = []
    axes = json.loads(ds.attrs.get("grid_axes", "[]"))
    for _label, sub in points:
        row = {a: _num(sub[a].values.item()) for a in axes}
        row["seeds"] = int(sub.sizes.get("seed", 0))
        if "loss_gd" in sub:
            row["final loss GD (median)"] = _nanmax_seedmedian(sub["loss_gd"].values[:, -1:], (1,))
        if "loss_flow" in sub:
            row["final loss flow (median)"] = _nanmax_seedmedian(
                sub["loss_flow"].values[:, -1:], (1,)
            )
        if "drift_gd" in sub:
            row["max abs drift GD (median)"] = _nanmax_seedmedian(sub["drift_gd"].values, (1, 2))
        if "drift_flow" in sub:
            row["max abs drift flow (median)"] = _nanmax_seedmedian(
                sub["drift_flow"].values, (1, 2)
            )
        if "ledger_error" in sub:
            row["ledger error (max)"] = float(np.nanmax(np.asarray(sub["ledger_error"].values)))
        if "disc_parameter" in sub:
            row["max ‖θ_GD − θ_flow‖ (median)"] = _nanmax_seedmedian(
                sub["disc_parameter"].values, (1,)
            )
        if "gd_diverged_at" in sub:
            row["GD diverged"] = int(np.sum(np.asarray(sub["gd_diverged_at"].values) >= 0))
        if "flow_result" in sub:
            row["flow failed"] = int(np.sum(np.asarray(sub["flow_result"].values) != 0))
        if "flow_error_estimate" in sub:
            est = np.asarray(sub["flow_error_estimate"].values)
            row["flow error estimate (max)"] = (
                float(np.nanmax(est)) if np.any(~np.isnan(est)) else float("nan")
            )
        if "flow_num_steps" in sub:
            row["flow steps (mean)"] = float(np.mean(sub["flow_num_steps"].values))
        if "wall_seconds" in sub:
            row["wall s"] = float(sub["wall_seconds"].values)
        rows.append(row)
    return rows


def _fmt_cell(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def report(out, *, dest=None) -> list[pathlib.Path]:
    """Writes figures (`drift.png`, `discretization.png`, `loss.png`) and `summary.md` /
    `summary.csv` for the sweep in `out` to `out/report/` (or `dest`).

    Works on an unfinished sweep too (plots the finished points).

    **Returns:** the paths written.

    **Raises:** `ConfigError` if `out` is not a sweep directory or holds no finished point.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from ._config import ConfigError

    out = pathlib.Path(out)
    ds = load(out)
    points = _points(ds)
    if not points:
        raise ConfigError(f"{out}: no finished grid point to report on yet")
    dest = pathlib.Path(dest) if dest is not None else out / "report"
    dest.mkdir(parents=True, exist_ok=True)
    seeds = int(ds.sizes.get("seed", 0))
    written = []
    first = points[0][1]
    if "drift_gd" in first or "drift_flow" in first:
        _fig_drift(points, dest / "drift.png", seeds)
        written.append(dest / "drift.png")
    if "disc_parameter" in first:
        _fig_disc(points, ds, dest / "discretization.png", seeds)
        written.append(dest / "discretization.png")
    if "loss_gd" in first or "loss_flow" in first:
        _fig_loss(points, dest / "loss.png", seeds)
        written.append(dest / "loss.png")
    rows = _table(points, ds)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(dest / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Sweep report: {out}",
        "",
        f"{ds.attrs.get('points_finished')} of {ds.attrs.get('points_total')} grid points "
        f"finished; {seeds} seeds each; device: {ds.attrs.get('device', '?')}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    lines += ["", "Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in written), ""]
    (dest / "summary.md").write_text("\n".join(lines))
    written += [dest / "summary.md", dest / "summary.csv"]
    return written
