"""Running one grid point: problem -> solvers (batched, sharded over devices) -> metric arrays.

Everything here returns plain NumPy arrays keyed by variable name with their dimension names;
the store turns them into a labelled dataset. Nothing here writes files.
"""

import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .. import invariants as _inv, schedules as _schedules
from .._descent import DivergenceWarning, gradient_descent
from .._results import codes as _result_codes
from . import _families
from ._config import Point

Arrays = dict[str, tuple[tuple[str, ...], np.ndarray]]


def build_problem(params, path: str = "<config>"):
    """The problem of one grid point (built once per distinct `[problem]` and `[init]`)."""
    return _families.cached_build(params, path)


def schedule_of(gd):
    if gd["schedule"] == "constant":
        return _schedules.constant(gd["eta0"])
    return _schedules.power_decay(gd["eta0"], gd["delta"])


def seed_layout(seeds: int, n_devices: int, n_processes: int, batch_size: int):
    """Chunks of seed indices, each padded to a multiple of the devices in use.

    Returns a list of (padded index array, number of real seeds in it). Padding seeds are
    real initialisations (seed indices past the end) whose results are dropped.
    """
    unit = n_devices * n_processes
    size = seeds if batch_size <= 0 else min(batch_size, seeds)
    size = -(-size // unit) * unit
    chunks = []
    for start in range(0, seeds, size):
        real = min(size, seeds - start)
        chunks.append((np.arange(start, start + size), real))
    return chunks


def _shard(tree, mesh):
    if mesh is None:
        return tree
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    return jax.tree.map(lambda x: jax.device_put(x, spec) if eqx.is_array(x) else x, tree)


@eqx.filter_jit
def _init_batch(problem, base_seed, idx):
    keys = jax.vmap(lambda i: jr.fold_in(jr.key(base_seed), i))(idx)
    return eqx.filter_vmap(problem.init)(keys)


@eqx.filter_jit
def _problem_metrics(problem, models):
    """The problem's own metrics of a batched trajectory: arrays with axes (seed, time)."""
    values = eqx.filter_vmap(problem.metrics)(models)
    return {name: (("seed", "time"), v) for name, v in values.items()}


@eqx.filter_jit
def _traj_metrics(traj, record: tuple[str, ...]):
    """Per-seed metrics of a batched trajectory: arrays with leading axes (seed, time)."""
    out = {}
    models = traj.models
    if "loss" in record:
        out["loss"] = (("seed", "time"), traj.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _inv.NotConservedWarning)
        if "invariants" in record or "drift" in record:
            gaps = _inv.layer_gaps(models)  # (seed, time, layer)
        if "invariants" in record:
            out["layer_gap"] = (("seed", "time", "layer"), gaps)
            out["layer_norm"] = (("seed", "time", "layer"), _inv.layer_norms(models))
        if "drift" in record:
            d = gaps - gaps[:, :1]
            out["drift"] = (("seed", "time", "layer"), d)
            units = _inv.neuron_gaps(models)
            unit_drift = [jnp.max(jnp.abs(u - u[:, :1]), axis=-1) for u in units]
            out["unit_drift_max"] = (("seed", "time", "layer"), jnp.stack(unit_drift, -1))
        if "alignment" in record:
            out["alignment"] = (("seed", "time", "pair"), _inv.alignment(models))
    return out


def _ledger_metrics(traj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _inv.NotConservedWarning)
        led = _inv.gd_drift_ledger(traj)
    err = jnp.max(
        jnp.stack(
            [jnp.max(jnp.abs(m - p), axis=(-1, -2)) for m, p in zip(led.measured, led.predicted)]
        ),
        axis=0,
    )
    return {
        "ledger_predicted": (("seed", "time", "layer"), led.layer_predicted),
        "ledger_error": (("seed",), err),
    }


_ledger_metrics = eqx.filter_jit(_ledger_metrics)


def _block(tree):
    return jax.block_until_ready(tree)


def _to_numpy(arrays, real: int) -> Arrays:
    out = {}
    for name, (dims, a) in arrays.items():
        a = np.asarray(jax.device_get(a))
        if dims and dims[0] == "seed":
            a = a[:real]
        if a.dtype == np.bool_:
            a = a.astype(np.int8)
        out[name] = (dims, a)
    return out


def run_chunk(point: Point, problem, idx: np.ndarray, real: int, mesh) -> tuple[Arrays, dict]:
    """Runs the seeds `idx` of one point as one batched call; returns metrics and timings."""
    import flowsim as _api  # the flow solver and comparison, looked up at call time

    params = point.params
    can = _families.supported_metrics(problem)
    record = tuple(m for m in params["metrics"]["record"] if m in can)
    timings: dict[str, float] = {}
    idx_dev = _shard(jnp.asarray(idx, jnp.int32), mesh)
    models = _block(_init_batch(problem, params["init"]["base_seed"], idx_dev))
    arrays: dict = {}
    gd_traj = flow_traj = None
    ts = None
    if "gd" in params:
        gd = params["gd"]
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DivergenceWarning)
            gd_traj = gradient_descent(
                models,
                problem.loss,
                gd["steps"],
                learning_rate=schedule_of(gd),
                save_every=gd["save_every"],
                batched=True,
            )
        _block(gd_traj.loss)
        timings["gd_seconds"] = time.perf_counter() - t
        ts = gd_traj.ts[0]
        arrays["t_gd"] = (("time",), ts)
        arrays["step"] = (("time",), gd_traj.steps)
        steps = jnp.asarray(gd_traj.steps)
        arrays["eta"] = (("time",), jnp.broadcast_to(schedule_of(gd)(steps), steps.shape))
        lr2 = jnp.concatenate([jnp.zeros((1,), ts.dtype), jnp.cumsum(gd_traj.learning_rates**2)])
        arrays["eta_sq_sum"] = (("time",), lr2[steps])
        for name, v in _traj_metrics(gd_traj, record).items():
            arrays[f"{name}_gd"] = v
        if "problem" in record:
            for name, v in _problem_metrics(problem, gd_traj.models).items():
                arrays[f"{name}_gd"] = v
        if "ledger" in record:
            arrays["ledger_bound"] = (("seed", "time"), gd_traj.stats["ledger_bound"])
            if gd_traj.ledger is not None:
                arrays.update(_ledger_metrics(gd_traj))
        arrays["gd_diverged_at"] = (("seed",), gd_traj.stats["diverged_at"])
    if "flow" in params:
        fl = params["flow"]
        if ts is None:
            ts = jnp.linspace(0.0, fl["t1"], fl["saves"])
        t = time.perf_counter()
        ts = np.asarray(ts)
        exact = _api.ExactKinks(max_events=fl["max_events"])
        kinks = {"auto": _api.AutoKinks(exact=exact), "exact": exact,
                 "smooth": _api.SmoothKinks()}[fl["kinks"]]
        solve = _api.estimate_error if fl.get("error_estimate", False) else _api.gradient_flow
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _api.FlowWarning)  # failures are recorded per seed
            flow_traj = solve(
                models,
                problem.loss,
                float(ts[-1]),
                ts=ts,
                solver=fl["solver"],
                rtol=fl["rtol"],
                atol=fl["atol"],
                max_steps=fl["max_steps"],
                batched=True,
                throw=False,
                kinks=kinks,
            )
        _block(flow_traj.loss)
        timings["flow_seconds"] = time.perf_counter() - t
        arrays["t_flow"] = (("time",), ts)
        for name, v in _traj_metrics(flow_traj, record).items():
            arrays[f"{name}_flow"] = v
        if "problem" in record:
            for name, v in _problem_metrics(problem, flow_traj.models).items():
                arrays[f"{name}_flow"] = v
        arrays["flow_result"] = (("seed",), _result_codes(flow_traj.result))
        if "solver_stats" in record:
            for k, v in flow_traj.stats.items():
                if eqx.is_array(v) and v.ndim == 1:
                    arrays[f"flow_{k}"] = (("seed",), v)
    if gd_traj is not None and flow_traj is not None and "discretization" in record:
        t = time.perf_counter()
        with warnings.catch_warnings():  # its layer-gap drifts are not stored
            warnings.simplefilter("ignore", _inv.NotConservedWarning)
            err = _api.discretization_error(gd_traj, flow_traj, inputs=problem.inputs)
        arrays["disc_parameter"] = (("seed", "time"), err.parameter)
        arrays["disc_function"] = (("seed", "time"), err.function)
        arrays["disc_loss_gap"] = (("seed", "time"), err.loss_gap)
        timings["compare_seconds"] = time.perf_counter() - t
    return _to_numpy(arrays, real), timings


def combine_chunks(parts: list[Arrays]) -> Arrays:
    """Concatenates per-chunk arrays along the seed axis (time-only arrays are shared)."""
    first = parts[0]
    out = {}
    for name, (dims, a) in first.items():
        if dims and dims[0] == "seed":
            out[name] = (dims, np.concatenate([p[name][1] for p in parts], axis=0))
        else:
            out[name] = (dims, a)
    return out
