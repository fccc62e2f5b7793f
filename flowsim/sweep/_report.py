"""`flowsim report`: figures and a table of headline numbers from a sweep store.

Figures (PNG, matplotlib Agg) go to `OUT/report/`:

- `drift.png`: |change of each layer gap| since t = 0 vs time, GD (solid) and flow (dashed),
  one panel per pair of adjacent layers, one colour per grid point, median over seeds with a
  10-90 % band;
- `discretization.png`: ||theta_GD(t_k) - theta_flow(t_k)|| vs time and vs the step size eta_k;
- `loss.png`: loss vs time, GD and flow, median with seed band;
- `problem.png`: the problem family's own quantities (`flowsim.problems.Panel`), e.g. for
  factorization the Gram-gap drift next to its ledger bound, the size of the iterates and the
  relative error; for the two-layer ReLU net the variation norm against its minimum;
- `summary.md`, `summary.csv`: one row per grid point.

Every aggregate (medians, bands, maxima, means) is over the seeds of a grid point that neither
diverged in GD (`gd_diverged_at >= 0`) nor failed in the flow (`flow_result != 0`): a diverged
seed holds its last finite iterate, often 1e100 and more, which would swamp a maximum and the
GD-flow distance. The table counts the excluded seeds per point ("excluded seeds", next to
"GD diverged" and "flow failed"); a point whose seeds are all excluded has NaN aggregates.
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


def _kept(sub) -> np.ndarray:
    """Boolean per seed: True where GD did not diverge and the flow did not fail."""
    if "seed" not in sub.dims:
        return np.ones(0, bool)
    ok = np.ones(sub.sizes["seed"], bool)
    if "gd_diverged_at" in sub:
        ok &= np.asarray(sub["gd_diverged_at"].values, float) < 0
    if "flow_result" in sub:
        ok &= np.asarray(sub["flow_result"].values, float) == 0
    return ok


def _kept_points(points):
    """(label, the point's kept seeds only, number of seeds excluded) for each point."""
    out = []
    for label, sub in points:
        ok = _kept(sub)
        if "seed" in sub.dims:
            n_out = int(ok.size - ok.sum())
            if n_out:
                sub = sub.isel(seed=np.flatnonzero(ok))
                label = f"{label} ({int(ok.sum())} of {ok.size} seeds)"
        else:
            n_out = 0
        out.append((label, sub, n_out))
    return out


def _excluded_note(points, kept) -> str:
    """For the figures' titles: how many seeds they leave out in all, and the points left with
    none ('' when no seed is excluded)."""
    excluded = sum(n for _, _, n in kept)
    if not excluded:
        return ""
    note = f"{excluded} diverged/failed seed{'s' if excluded > 1 else ''} excluded"
    empty = [label for (label, _), (_, sub, n) in zip(points, kept) if n and not sub.sizes["seed"]]
    if empty:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        note += "; none left at " + "; ".join(empty[:3]) + more
    return note


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
    """The save times of GD or the flow (a sweep that ran only one has only its own)."""
    name = f"t_{which}" if f"t_{which}" in sub else ("t_flow" if which == "gd" else "t_gd")
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


def _fig_drift(points, path, seeds, note=""):
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
        f"Layer-gap drift, GD (solid) vs gradient flow (dashed); {seeds} seeds per point"
        + (f"\n({note})" if note else ""),
        fontsize=11,
    )
    _finish(fig, list(axes.flat), path)
    plt.close(fig)


def _fig_disc(points, ds, path, seeds, note=""):
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
        f"(median, 10–90 % over {seeds} seeds" + (f")\n({note})" if note else ")"),
        fontsize=11,
    )
    _finish(fig, axes, path)
    plt.close(fig)


def _disc_vs_eta0(ax, ds, axes_names):
    """Final parameter error against eta0, one line per combination of the other axes."""
    import warnings

    others = [a for a in axes_names if a != "eta0"]
    final = ds["disc_parameter"].isel(time=-1)
    if "gd_diverged_at" in ds:
        final = final.where(ds["gd_diverged_at"] < 0)
    if "flow_result" in ds:
        final = final.where(ds["flow_result"] == 0)
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


def _fig_loss(points, path, seeds, note=""):
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
        f"Loss: GD (solid) vs gradient flow (dashed); median, 10–90 % over {seeds} seeds"
        + (f"\n({note})" if note else ""),
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    _finish(fig, [ax], path)
    plt.close(fig)


def _panels(ds) -> list[dict]:
    """The problem family's report panels (`flowsim.problems.Panel`), as stored by the sweep."""
    return json.loads(ds.attrs.get("problem_panels", "[]") or "[]")


def _fig_problem(points, panels, path, seeds, note=""):
    """One panel per `Panel` of the problem family: its metrics along GD (solid, wide) and the
    flow (dashed), a stored bound dotted, a closed-form reference in black."""
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols + 2.6, 3.8 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    colors = _colors(len(points))
    times = [_time(sub, w) for _, sub in points for w in ("gd", "flow")]
    pos = np.concatenate([t[np.isfinite(t) & (t > 0)] for t in times])
    logx = pos.size > 0 and pos.max() / pos.min() > 10

    def band(ax, sub, which, values, *args, **kwargs):
        t, v = _time(sub, which), np.asarray(values, float)
        v = v if v.ndim > 1 else v[None]
        keep = t > 0 if logx else np.ones(t.shape, bool)  # t = 0 is off a log axis
        _band(ax, t[keep], v[:, keep], *args, **kwargs)

    for ax, panel in zip(axes.flat, panels):
        log = panel["logy"]
        for (label, sub), c in zip(points, colors):
            for m in panel["metrics"]:
                if f"{m}_gd" in sub:
                    band(ax, sub, "gd", sub[f"{m}_gd"].values, c, f"{label} GD", lw=3.2,
                         alpha=0.55, log=log)
                if f"{m}_flow" in sub:
                    band(ax, sub, "flow", sub[f"{m}_flow"].values, c, f"{label} flow",
                         style="--", lw=1.3, log=log)
            bound = panel.get("bound")
            if bound and bound in sub:
                band(ax, sub, "gd", sub[bound].values, c, f"{label} {bound}", style=":", lw=1.6,
                     log=log)
            ref = panel.get("reference")
            for which in ("gd", "flow"):
                if ref and f"{ref}_{which}" in sub:
                    v = np.asarray(sub[f"{ref}_{which}"].values, float)
                    if np.isfinite(v).any():
                        ax.axhline(float(np.nanmedian(v)), color="k", lw=0.9)
                    break
        if logx:
            ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_title(panel["title"], fontsize=9.5)
        ax.set_xlabel(r"time $t$   (GD iterate $k$ at $t_k = \sum_{i<k} \eta_i$)")
        ax.grid(True, which="major", alpha=0.3)
    for r in range(rows):
        axes[r, 0].set_ylabel("median, 10–90 % band over seeds")
    fig.suptitle(
        f"{points[0][1].attrs.get('problem_kind', 'problem')}: GD (solid) vs gradient flow "
        f"(dashed); {seeds} seeds per point" + (f"\n({note})" if note else ""),
        fontsize=11,
    )
    _finish(fig, list(axes.flat), path)
    plt.close(fig)


def _problem_columns(row, sub, panels) -> None:
    """Table cells of the family's metrics: final values (median over seeds) and, where a
    panel has a bound, the largest ratio of the GD metric to it."""
    for panel in panels:
        for m in panel["metrics"]:
            for which, name in (("gd", "GD"), ("flow", "flow")):
                if f"{m}_{which}" in sub:
                    row[f"final {m} {name} (median)"] = _nanmax_seedmedian(
                        sub[f"{m}_{which}"].values[:, -1:], (1,))
            bound = panel.get("bound")
            if bound and bound in sub and f"{m}_gd" in sub:
                v = np.asarray(sub[f"{m}_gd"].values, float)[:, 1:]
                b = np.asarray(sub[bound].values, float)[:, 1:]
                with np.errstate(all="ignore"):
                    row[f"{m} / {bound} (max)"] = _nanmax(np.where(b > 0, v / b, np.nan))


def _nanmax_seedmedian(a, reduce_axes):
    """Median over seeds (axis 0) of each seed's largest |value| over `reduce_axes`; NaN when
    there is no seed or no finite value."""
    a = np.abs(np.asarray(a, dtype=float))
    if a.size == 0:
        return float("nan")
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_seed = np.nanmax(a, axis=reduce_axes) if reduce_axes else a
            return float(np.nanmedian(per_seed))


def _nanmax(a) -> float:
    a = np.asarray(a, dtype=float)
    return float(np.nanmax(a)) if np.any(~np.isnan(a)) else float("nan")


def _table(points, ds):
    """One row per grid point. Aggregates are over the point's kept seeds (see `_kept`);
    "excluded seeds", "GD diverged" and "flow failed" count over all its seeds."""
    rows = []
    panels = _panels(ds)
    axes = json.loads(ds.attrs.get("grid_axes", "[]"))
    for _label, full in points:
        row = {a: _num(full[a].values.item()) for a in axes}
        row["seeds"] = int(full.sizes.get("seed", 0))
        ok = _kept(full)
        row["excluded seeds"] = int(ok.size - ok.sum())
        sub = full.isel(seed=np.flatnonzero(ok)) if "seed" in full.dims else full
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
            row["ledger error (max)"] = _nanmax(sub["ledger_error"].values)
        _problem_columns(row, sub, panels)
        if "disc_parameter" in sub:
            row["max ‖θ_GD − θ_flow‖ (median)"] = _nanmax_seedmedian(
                sub["disc_parameter"].values, (1,)
            )
        if "gd_diverged_at" in full:
            row["GD diverged"] = int(np.sum(np.asarray(full["gd_diverged_at"].values) >= 0))
        if "flow_result" in full:
            row["flow failed"] = int(np.sum(np.asarray(full["flow_result"].values) != 0))
        if "flow_error_estimate" in sub:
            row["flow error estimate (max)"] = _nanmax(sub["flow_error_estimate"].values)
        if "flow_num_steps" in sub:
            steps = np.asarray(sub["flow_num_steps"].values, float)
            row["flow steps (mean)"] = float(np.mean(steps)) if steps.size else float("nan")
        if "wall_seconds" in full:
            row["wall s"] = float(full["wall_seconds"].values)
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
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{dest}: cannot hold the report ({e.strerror}); give a writable directory as "
            f"`dest` (--dest)"
        ) from None
    seeds = int(ds.sizes.get("seed", 0))
    kept = _kept_points(points)
    excluded = sum(n for _, _, n in kept)
    note = _excluded_note(points, kept)
    shown = [(label, sub) for label, sub, _ in kept]
    written = []
    first = points[0][1]
    if "drift_gd" in first or "drift_flow" in first:
        _fig_drift(shown, dest / "drift.png", seeds, note)
        written.append(dest / "drift.png")
    if "disc_parameter" in first:
        _fig_disc(shown, ds, dest / "discretization.png", seeds, note)
        written.append(dest / "discretization.png")
    if "loss_gd" in first or "loss_flow" in first:
        _fig_loss(shown, dest / "loss.png", seeds, note)
        written.append(dest / "loss.png")
    panels = [p for p in _panels(ds)
              if any(f"{m}_{w}" in first for m in p["metrics"] for w in ("gd", "flow"))
              or p.get("bound") in first]
    if panels:
        _fig_problem(shown, panels, dest / "problem.png", seeds, note)
        written.append(dest / "problem.png")
    rows = _table(points, ds)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(dest / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    header = (
        f"{ds.attrs.get('points_finished')} of {ds.attrs.get('points_total')} grid points "
        f"finished; {seeds} seeds each; device: {ds.attrs.get('device', '?')}."
    )
    if excluded:
        total = seeds * len(points)
        header += (
            f" {excluded} of {total} seeds excluded from the aggregates "
            f"(GD diverged or flow failed; see the columns)."
        )
    lines = [
        f"# Sweep report: {out}",
        "",
        header,
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    empty = [
        (label, r)
        for (label, _), r in zip(points, rows)
        if r["seeds"] and r["excluded seeds"] == r["seeds"]
    ]
    if excluded:
        lines += [
            "",
            "Medians, maxima and means are over the seeds that neither diverged in GD nor "
            'failed in the flow; the excluded seeds are counted in "excluded seeds".',
        ]
    for label, r in empty:
        lines += [
            "",
            f"{label}: all {r['seeds']} seeds excluded, no aggregates (nan).",
        ]
    lines += ["", "Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in written), ""]
    (dest / "summary.md").write_text("\n".join(lines))
    written += [dest / "summary.md", dest / "summary.csv"]
    return written
