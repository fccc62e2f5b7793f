"""The exact flow of one trajectory or a batch: builds the loop's state, calls the compiled
loop (`driver.run`) until every trajectory is done, resizing the sliding capacity when a
trajectory needs it (`next_capacity`), and, for progress bars and checkpoints, in chunks of
events."""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from .._members import batch_execution, loop_threads, map_members, members
from . import driver
from .checkpoint import CHECKPOINT_SECONDS, Checkpoint
from .events import _FIRST_STEP, _carries_first
from .problem import _per_point, _Problem
from .state import KIND_NAMES, Layout, initial_state, next_capacity, repad

# The first chunk of events per compiled call when a progress bar or a checkpoint needs the
# host between events; chunks double while a call takes less than `_CHUNK_SECONDS`.
_FIRST_CHUNK = 16
_CHUNK_SECONDS = 2.0
_NO_STOP = np.iinfo(np.int32).max


class Events(eqx.Module):
    """The events of an exact solve: one row per entry that crossed its surface, started
    sliding along it, or was released from it, in the order they happened.

    **Fields** (shape `(records,)`, or `(batch, records)`, padded where `valid` is False):

    - `t`: the event's time;
    - `kind`: 1 crossing, 2 slide (a sliding interval starts), 3 release (`KINDS`);
    - `layer`, `unit`, `point`: the hidden layer (from 0), its unit and the data point of the
      pre-activation entry;
    - `valid`: rows that hold an event.
    """

    t: jax.Array
    kind: jax.Array
    layer: jax.Array
    unit: jax.Array
    point: jax.Array
    valid: jax.Array

    KINDS = KIND_NAMES

    def names(self) -> list:
        """The kinds as names ('crossing', 'slide', 'release'), valid rows of one trajectory."""
        kind = np.asarray(self.kind)
        if kind.ndim != 1:
            raise TypeError("select a trajectory first: traj[i].events.names()")
        return [KIND_NAMES[int(k)] for k in kind[np.asarray(self.valid)]]


# A single solve's capacity comes down when its sliding set falls to a quarter of it
# (`next_capacity`); off only to measure an event's cost at a fixed capacity.
_SHRINK = True


def _events(state, layout) -> Events:
    kind = np.asarray(state.ev_kind)
    entry = np.asarray(state.ev_entry).astype(np.int64)
    layer, point, unit, _ = layout.locate(entry)
    valid = kind > 0
    return Events(t=jnp.asarray(state.ev_t), kind=jnp.asarray(kind),
                  layer=jnp.asarray(np.where(valid, layer, -1)),
                  unit=jnp.asarray(np.where(valid, unit, -1)),
                  point=jnp.asarray(np.where(valid, point, -1)), valid=jnp.asarray(valid))


def _member_path(path, tag):
    import pathlib

    path = pathlib.Path(path)
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def exact_flow(params, static, loss, t0, t1, ts, solver, controller, max_steps, max_events,
               batched, *, progress=False, checkpoint=None, capacity=0, execution="auto"):
    """Exact flow of `params` (a batch with `batched`). Returns `(saved, stats, result,
    events)`: the parameters at `ts`, a dict of per-trajectory statistics, the result codes,
    and the event record (`Events`). `capacity`: the first sliding capacity (then
    `next_capacity`: larger when the set outgrows it, smaller for a single solve whose set
    has fallen to a quarter of it). `execution`: how a batch runs (`batch_execution`); as a
    loop, each member keeps its checkpoint in `<stem>-<i><suffix>`."""
    if batched and batch_execution(execution) == "loop":
        size = jax.tree.leaves(params)[0].shape[0]

        def member(item):
            i, p = item
            return _exact_flow(
                p, static, loss, t0, t1, ts, solver, controller, max_steps, max_events, False,
                progress=progress,
                checkpoint=None if checkpoint is None else _member_path(checkpoint, i),
                capacity=capacity, label=f"member {i}")

        return map_members(member, list(enumerate(members(params, size))),
                           loop_threads(size, progress, checkpoint))
    return _exact_flow(params, static, loss, t0, t1, ts, solver, controller, max_steps,
                       max_events, batched, progress=progress, checkpoint=checkpoint,
                       capacity=capacity)


@eqx.filter_jit
def _start(params, static, loss, ts, t0, dt0, capacity, records, batched):
    """The loop's first state (`initial_state`), for a batch with `batched`."""
    def start(p):
        z = jnp.concatenate([v.ravel() for v in eqx.combine(p, static).forward(loss.X)[1]])
        return initial_state(p, z, ts, t0, dt0, capacity, records)

    return jax.vmap(start)(params) if batched else start(params)


def _exact_flow(params, static, loss, t0, t1, ts, solver, controller, max_steps, max_events,
                batched, *, progress=False, checkpoint=None, capacity=0, label=""):
    started = time.perf_counter()
    one = jax.tree.map(lambda x: x[0], params) if batched else params
    zs = eqx.combine(one, static).forward(loss.X)[1]
    shapes = tuple(z.shape for z in zs)
    problem = _Problem(static, loss, shapes)
    layout = Layout.of(shapes)
    ctx = driver._Context(problem, layout, _per_point(loss),
                          _carries_first(problem, solver, controller),
                          shrink=_SHRINK and not batched)
    dtype = zs[0].dtype
    ts = jnp.asarray(ts, dtype)
    t1_j = jnp.asarray(t1, dtype)
    records = 2 * int(max_events) + 16  # rows: an event can change several entries
    dt0 = _FIRST_STEP * (float(t1) - float(t0))

    def make(p, capacity, records):
        return _start(p, static, loss, ts, jnp.asarray(t0, dtype), jnp.asarray(dt0, dtype),
                      capacity, records, batched)

    ckpt = state = None
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint, params, loss, t0, t1, ts, solver, controller)
        state = ckpt.load(lambda k, r: jax.eval_shape(lambda p: make(p, k, r), params), records)
    if state is None:
        state = make(params, capacity, records)
    chunked = progress or ckpt is not None
    chunk = _FIRST_CHUNK
    lanes = jax.tree.leaves(params)[0].shape[0] if batched else None
    span = float(t1) - float(t0)
    with tqdm.tqdm(total=span, disable=not progress, unit="t", desc=f"exact kinks {label}".strip(),
                   leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| t={n:.4g}/"
                                           "{total:.4g} [{elapsed}<{remaining}{postfix}]") as bar:
        while not bool(jnp.all(state.done)):
            if chunked:
                stop_at = state.stats["num_events"] + chunk
            else:
                stop_at = jnp.full(() if lanes is None else (lanes,), _NO_STOP, jnp.int32)
            tic = time.perf_counter()
            try:
                state = driver.run(ctx, state, ts, t1_j, jnp.asarray(max_events, jnp.int32),
                                   stop_at.astype(jnp.int32), solver, controller, max_steps,
                                   batched)
                jax.block_until_ready(state)
            except KeyboardInterrupt:
                if ckpt is not None:
                    ckpt.save(state, started, force=True)
                raise
            if chunked and time.perf_counter() - tic < _CHUNK_SECONDS:
                chunk *= 2
            if bool(jnp.any(state.resize)):
                # Larger while an event waits for room (`pending`), else smaller.
                grow = bool(jnp.any(state.resize & state.pending))
                state = repad(state, next_capacity(
                    state.capacity, None if grow else int(jnp.max(state.n))))
            if progress:
                t_now = float(jnp.min(jnp.where(state.done, t1_j, state.t)))
                bar.update(t_now - float(t0) - bar.n)
                bar.set_postfix(events=int(jnp.max(state.stats["num_events"])),
                                sliding=int(jnp.max(state.n)), refresh=False)
            if ckpt is not None:
                ckpt.save(state, started, force=bool(jnp.all(state.done)))
    stats = dict(state.stats)
    stats["num_sliding_now"] = state.n
    stats["t_reached"] = state.t
    stats["num_records"] = state.n_records
    return state.out, stats, state.result, _events(state, layout)


__all__ = ["CHECKPOINT_SECONDS", "Events", "exact_flow"]
