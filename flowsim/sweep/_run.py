"""`flowsim.sweep.run`: every grid point of a config, seeds batched and sharded, into a store."""

import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from . import _families, _memory, _point, _store
from ._config import Config, ConfigError, Point, load_config


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What `run` did. `out` is the store; load it with `flowsim.sweep.load(out)`."""

    out: pathlib.Path
    total: int
    skipped: int
    ran: int
    seconds: float


def _versions() -> dict[str, str]:
    out = {}
    for pkg in (
        "flowsim",
        "jax",
        "jaxlib",
        "diffrax",
        "equinox",
        "optax",
        "lineax",
        "numpy",
        "xarray",
    ):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    out["python"] = platform.python_version()
    return out


def _device_description(devices) -> str:
    kinds = sorted({d.device_kind for d in devices})
    return f"{len(devices)} x {', '.join(kinds)} ({devices[0].platform})"


def _mesh(devices):
    if len(devices) <= 1:
        return None
    return jax.sharding.Mesh(
        np.asarray(devices), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def _to_dataset(point: Point, arrays, timings: dict, meta: dict):
    import xarray as xr

    data_vars = {name: (dims, a) for name, (dims, a) in arrays.items()}
    for k, v in timings.items():
        data_vars[k] = ((), np.float64(v))
    ds = xr.Dataset(data_vars)
    n_seed = next((a.shape[0] for dims, a in arrays.values() if dims and dims[0] == "seed"), 0)
    ds = ds.assign_coords(seed=np.arange(n_seed), time=np.arange(ds.sizes.get("time", 0)))
    if "layer" in ds.dims:
        ds = ds.assign_coords(layer=np.arange(1, ds.sizes["layer"] + 1))
    if "pair" in ds.dims:
        ds = ds.assign_coords(pair=np.arange(1, ds.sizes["pair"] + 1))
    ds.attrs.update(meta)
    ds.attrs["point_key"] = point.key
    ds.attrs["point_label"] = point.label
    ds.attrs["point_params"] = json.dumps(point.params, sort_keys=True)
    _describe(ds)
    return ds


_LONG_NAMES = {
    "t_gd": "GD time t_k = sum_{i<k} eta_i",
    "t_flow": "flow time",
    "step": "GD iteration k",
    "eta": "GD step size eta_k",
    "eta_sq_sum": "sum_{i<k} eta_i^2: the scale of the accumulated local error of GD",
    "loss_gd": "loss along GD",
    "loss_flow": "loss along the flow",
    "layer_gap_gd": "||W_h||_F^2 - ||W_{h+1}||_F^2 along GD",
    "layer_gap_flow": "||W_h||_F^2 - ||W_{h+1}||_F^2 along the flow",
    "layer_norm_gd": "||W_h||_F^2 + ||W_{h+1}||_F^2 along GD",
    "layer_norm_flow": "||W_h||_F^2 + ||W_{h+1}||_F^2 along the flow",
    "drift_gd": "change of the layer gap since t = 0, GD",
    "drift_flow": "change of the layer gap since t = 0, flow",
    "unit_drift_max_gd": "max over units of |change of the unit gap|, GD",
    "unit_drift_max_flow": "max over units of |change of the unit gap|, flow",
    "ledger_predicted": "GD layer-gap drift predicted by sum eta_k^2 (|g_in|^2 - |g_out|^2)",
    "ledger_error": "max |measured - predicted| unit-gap drift over the GD run",
    "alignment_gd": "|v_{h+1}^T u_h| of top singular vectors, GD",
    "alignment_flow": "|v_{h+1}^T u_h| of top singular vectors, flow",
    "disc_parameter": "||theta_GD(t_k) - theta_flow(t_k)||_2",
    "disc_function": "RMS over inputs of f_GD - f_flow",
    "disc_loss_gap": "L(GD) - L(flow) at t_k",
    "gd_diverged_at": "first non-finite GD step, -1 if none",
    "flow_result": "flowsim.RESULTS code, 0 = successful",
}


def _describe(ds) -> None:
    for name, text in _LONG_NAMES.items():
        if name in ds:
            ds[name].attrs["long_name"] = text


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    config: "str | os.PathLike | Mapping | Config",
    out: "str | os.PathLike | None" = None,
    *,
    resume: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
    progress: bool = True,
    devices: int | None = None,
    max_points: int | None = None,
    smoke: bool = False,
) -> SweepResult:
    """Runs a sweep: every grid point of `config`, its seeds as one batched call sharded over
    the devices, each finished point written atomically to the store `out`.

    **Arguments:**

    - `config`: a TOML path, a TOML string, a dict shaped like the TOML, or a `Config`.
    - `out`: output directory; default `runs/<config file stem>` (or `runs/sweep`).
    - `resume`: require an existing store to continue. Without it a rerun still skips the
      finished points (a store is never overwritten).
    - `dry_run`: validate and print the grid; run nothing, write nothing.
    - `quiet`: one plain line per point instead of a progress bar (for logs).
    - `progress`: False prints nothing at all.
    - `devices`: number of local devices to shard the seeds over (default: `[run].devices`,
      "all" = every visible device).
    - `max_points`: stop after running this many points (the rest stay for a later run).
    - `smoke`: run the config cut to seconds (`Config.smoke`: 2 seeds, 20 GD steps, 11 flow
      saves), into `runs/<config file stem>-smoke` by default: checks a config end to end.

    **Returns:** a `SweepResult`; load the store with `flowsim.sweep.load(result.out)`.

    **Raises:** `ConfigError` (one line) before any work for an invalid config, an output
    directory that cannot hold the store, a store made from another config or held by another
    running sweep, or a compiled call that would not fit in memory (`flowsim.sweep._memory`).

    **Example:**

    ```python
    res = flowsim.sweep.run("examples/quickstart.toml", "runs/qs")
    ds = flowsim.sweep.load(res.out)
    ```
    """
    t_start = time.perf_counter()
    cfg = load_config(config)
    if smoke:
        cfg = cfg.smoke()
    if out is None:
        stem = (
            pathlib.Path(os.fspath(config)).stem
            if isinstance(config, str | os.PathLike) and "\n" not in os.fspath(config)
            else "sweep"
        )
        out = pathlib.Path("runs") / (stem + ("-smoke" if smoke else ""))
    out = pathlib.Path(out)
    n_proc, proc = jax.process_count(), jax.process_index()
    leader = proc == 0
    say = _log if (leader and progress) else (lambda _msg: None)
    local = jax.local_devices()
    want = devices if devices is not None else cfg.sections["run"]["devices"]
    n_dev = len(local) if want == "all" else min(int(want), len(local))
    used = local[:n_dev]
    if dry_run:
        if progress:
            _print_plan(cfg, out, n_dev)
        _check_metrics_supported(cfg)
        _memory.check(cfg, used)
        _store.check_out_dir(out)
        return SweepResult(out, cfg.num_points, 0, 0, 0.0)
    _check_metrics_supported(cfg)
    _memory.check(cfg, used)
    points = cfg.points()
    lock = _store.open_store(out, cfg, resume=resume) if leader else None
    try:
        return _run_points(cfg, points, out, used, n_proc, leader, say, progress, quiet,
                           max_points, t_start)
    finally:
        if lock is not None:
            lock.release()


def _check_metrics_supported(cfg: Config) -> None:
    """A problem of the user's own whose model cannot give an asked-for metric: refused before
    any work (with `record = "all"` the sweep records what it can)."""
    if not cfg.explicit_metrics:
        return
    problem = _point.build_problem(next(cfg.iter_points()).params, cfg.path)
    can = _families.supported_metrics(problem)
    bad = [m for m in cfg.metrics if m not in can]
    if bad:
        raise ConfigError(
            f"{cfg.path}: [metrics].record: {json.dumps(bad[0])} needs a "
            f"flowsim.models.AbstractModel (alignment: two adjacent matrix layers); "
            f"{type(_families.model_template(problem)).__name__} is not; remove it"
        )


def _run_points(cfg, points, out, used, n_proc, leader, say, progress, quiet, max_points,
                t_start) -> SweepResult:
    done = _store.verify_finished(out, points, say) if leader else [False] * len(points)
    if n_proc > 1:
        from jax.experimental import multihost_utils

        done = [bool(x) for x in multihost_utils.broadcast_one_to_all(np.asarray(done))]
    todo = [p for p, d in zip(points, done) if not d]
    if max_points is not None:
        todo = todo[:max_points]

    n_dev = len(used)
    mesh = _mesh(used)
    meta = {
        "flowsim_versions": json.dumps(_versions()),
        "device": _device_description(used),
        "processes": n_proc,
        "host": platform.node(),
    }
    skipped = len(points) - len([d for d in done if not d])
    say(
        f"flowsim sweep: {len(points)} grid points x {cfg.seeds} seeds "
        f"({skipped} already finished) on {meta['device']}"
        + (f" x {n_proc} processes" if n_proc > 1 else "")
        + f" -> {out}"
    )

    bar = None
    if leader and progress and not quiet and todo:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(points),
            initial=skipped,
            unit="pt",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} pts [{elapsed}<{remaining}]{postfix}",
        )
    ran = 0
    try:
        for point in todo:
            t0 = time.perf_counter()
            if bar is not None:
                bar.set_description(point.label)
                bar.set_postfix_str(f"{cfg.seeds} seeds")
            ds, summary = _run_point(point, n_dev, mesh, meta, cfg.path)
            wall = time.perf_counter() - t0
            if leader:
                ds["wall_seconds"] = ((), np.float64(wall))
                try:
                    _store.write_point(out, point, ds)
                except OSError as e:
                    raise ConfigError(
                        f"{_store.point_path(out, point)}: cannot be written ({e.strerror}); the "
                        f"finished points are kept, rerun with --resume once it can"
                    ) from None
                with contextlib.suppress(OSError):
                    _store.update_manifest(out, cfg, points)
            ran += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{cfg.seeds} seeds, last {wall:.1f}s{summary}")
            elif quiet and leader and progress:
                print(
                    f"[{skipped + ran}/{len(points)}] {point.label}: {cfg.seeds} seeds in "
                    f"{wall:.1f}s{summary}",
                    flush=True,
                )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    say(
        f"flowsim sweep: ran {ran} points in {elapsed:.1f}s; results in {out} "
        f"(load with flowsim.sweep.load({str(out)!r}); figures with: flowsim report {out})"
    )
    return SweepResult(out, len(points), skipped, ran, elapsed)


def _run_point(point: Point, n_dev: int, mesh, meta: dict, path: str = "<config>"):
    params = point.params
    problem = _point.build_problem(params, path)
    meta = {**meta, "problem_kind": params["problem"]["kind"],
            "problem_panels": json.dumps([p.to_json() for p in problem.panels])}
    n_proc, proc = jax.process_count(), jax.process_index()
    chunks = _point.seed_layout(params["init"]["seeds"], n_dev, n_proc, params["run"]["batch_size"])
    parts = []
    timings: dict[str, float] = {}
    for idx, real in chunks:
        # Each process takes a contiguous block of the chunk's seeds on its own devices.
        block = len(idx) // n_proc
        mine = idx[proc * block : (proc + 1) * block]
        arrays, t = _point.run_chunk(point, problem, mine, block, mesh)
        if n_proc > 1:
            arrays = _gather(arrays)
        arrays = {k: (d, a[:real] if d and d[0] == "seed" else a) for k, (d, a) in arrays.items()}
        parts.append(arrays)
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
    arrays = _point.combine_chunks(parts)
    summary = ""
    if "gd_diverged_at" in arrays:
        n = int(np.sum(arrays["gd_diverged_at"][1] >= 0))
        summary += f", GD diverged {n}" if n else ""
    if "flow_result" in arrays:
        n = int(np.sum(arrays["flow_result"][1] != 0))
        summary += f", flow failed {n}" if n else ""
    return _to_dataset(point, arrays, timings, meta), summary


def _gather(arrays):
    """Concatenates every process's seed block (in process order) on every process.

    All per-seed arrays travel as one float64 buffer: one collective (and one compilation) per
    point instead of one per variable. Integer results (result codes, step counts) are exact
    in float64.
    """
    from jax.experimental import multihost_utils

    names = [k for k, (d, _) in arrays.items() if d and d[0] == "seed"]
    if not names:
        return arrays
    block = arrays[names[0]][1].shape[0]
    flat = [arrays[k][1].reshape(block, -1).astype(np.float64) for k in names]
    widths = [f.shape[1] for f in flat]
    packed = np.asarray(multihost_utils.process_allgather(np.concatenate(flat, axis=1), tiled=True))
    out = dict(arrays)
    start = 0
    for k, w in zip(names, widths):
        dims, a = arrays[k]
        part = packed[:, start : start + w].reshape((packed.shape[0], *a.shape[1:]))
        out[k] = (dims, part.astype(a.dtype))
        start += w
    return out


PLAN_LINES = 50
"""`--dry-run` lists at most this many grid points (the grid size is printed first, at once)."""


def _print_plan(cfg: Config, out: pathlib.Path, n_dev: int) -> None:
    axes = cfg.axis_names
    total = cfg.num_points
    print(f"config {cfg.path}: valid")
    print(
        f"grid: {total:,} points over axes {', '.join(axes) or '(none)'}; "
        f"{cfg.seeds} seeds each",
        flush=True,
    )
    print(_memory.describe(cfg, n_dev), flush=True)
    print(
        f"runs: {'GD ' if cfg.has_gd else ''}{'flow ' if cfg.has_flow else ''}"
        f"metrics: {', '.join(cfg.metrics)}"
    )
    shown = list(itertools.islice(cfg.iter_points(), PLAN_LINES))
    stored = (out / _store.CONFIG).exists()
    done = _store.finished(out, shown) if stored else [False] * len(shown)
    for p, d in zip(shown, done):
        print(f"  [{p.index}] {p.key} {p.label}{'  (finished)' if d else ''}")
    if total > len(shown):
        print(f"  ... and {total - len(shown):,} more")
    print(f"output: {out}")
