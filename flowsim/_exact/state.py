"""The exact flow's loop state as one `eqx.Module`, and the array forms of its sliding set.

The sliding set is a list of at most `capacity` flat entry indices kept in insertion order in
a fixed-size array (`idx[:n]`; the rest is padding), so that every event is handled by array
operations of static shape: appending writes `idx[n]`, removing shifts the tail left. The
capacity is a power of two; a solve whose set would outgrow it stops with `resize` set and
carries on from the same state at twice the capacity (`repad`); a single solve whose set has
fallen to a quarter of it stops the same way after the event and carries on at the smallest
capacity that holds twice the set (`next_capacity`).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from .sliding import _Sliding

INDEX = jnp.int32

# Event kinds in the record (`ExactState.ev_kind`; 0: no event).
CROSSING, SLIDE, RELEASE = 1, 2, 3
KIND_NAMES = {CROSSING: "crossing", SLIDE: "slide", RELEASE: "release"}

# The result codes the loop sets besides diffrax's (`flowsim._flow._result_message`).
MAX_EVENTS = -1
STOPPED_EARLY = -2

STAT_NAMES = ("num_steps", "num_rejected_steps", "num_events", "num_crossings",
              "num_sliding_intervals", "num_releases", "num_sliding_max")


class ExactState(eqx.Module):
    """Everything the event loop carries from one piece to the next (one trajectory).

    - `t`, `p`: time and parameters at the end of the last piece (the start of the next);
    - `mask`, `sign`, `offset`, `z`: per pre-activation entry, its slope on the pattern, the
      side it is on (+1 / -1; 0 while sliding), the offset of its event value, and its value;
    - `idx[:n]`: the sliding entries in the order they joined; `lam`, `pinv`: their slopes and
      the pseudo-inverse of the slopes' Jacobian at the piece start (the chord iterations'
      guess); `lam_end`: the slopes at the end of the last piece;
    - `dt0`: the next piece's first step;
    - `pending`: the last piece ended at an event not handled yet; `combined`: the last piece
      is to be run again with its crossing and release conditions as one (a release came
      before the located crossing); `resize`: the sliding set needs another capacity (a larger
      one: the event is handled anew there; or, after the event, a smaller one); `done`;
    - `result`: diffrax's code, or `MAX_EVENTS` / `STOPPED_EARLY`;
    - `out`, `filled`: the parameters at the save times, and which were passed;
    - `stats`: counters (`STAT_NAMES`);
    - `ev_t`, `ev_kind`, `ev_entry`, `n_records`: the event record, one row per entry that
      crossed, started sliding or was released (rows past the buffer are counted, not kept).
    """

    t: Float[Array, ""]
    p: PyTree
    mask: Float[Array, " surfaces"]
    sign: Float[Array, " surfaces"]
    offset: Float[Array, " surfaces"]
    z: Float[Array, " surfaces"]
    idx: Int[Array, " capacity"]
    n: Int[Array, ""]
    lam: Float[Array, " capacity"]
    pinv: Float[Array, "capacity capacity"]
    lam_end: Float[Array, " capacity"]
    dt0: Float[Array, ""]
    pending: Bool[Array, ""]
    combined: Bool[Array, ""]
    resize: Bool[Array, ""]
    done: Bool[Array, ""]
    result: Int[Array, ""]
    out: PyTree
    filled: Bool[Array, " times"]
    stats: dict
    ev_t: Float[Array, " records"]
    ev_kind: Int[Array, " records"]
    ev_entry: Int[Array, " records"]
    n_records: Int[Array, ""]

    @property
    def capacity(self) -> int:
        return self.idx.shape[-1]


def initial_state(params, z, ts, t0, dt0, capacity: int, records: int) -> ExactState:
    """The state at t0: entries on their side of the kink (those exactly at 0 inactive),
    nothing sliding, nothing saved."""
    dtype = z.dtype
    scalar = lambda v, d: jnp.asarray(v, d)  # noqa: E731
    out = jax.tree.map(lambda x: jnp.zeros((ts.shape[0], *x.shape), x.dtype), params)
    return ExactState(
        t=scalar(t0, dtype), p=params, mask=(z > 0).astype(dtype),
        sign=jnp.where(z > 0, 1.0, -1.0).astype(dtype), offset=jnp.zeros_like(z), z=z,
        idx=jnp.zeros(capacity, INDEX), n=scalar(0, INDEX), lam=jnp.zeros(capacity, dtype),
        pinv=jnp.eye(capacity, dtype=dtype), lam_end=jnp.zeros(capacity, dtype),
        dt0=scalar(dt0, dtype), pending=scalar(False, bool), combined=scalar(False, bool),
        resize=scalar(False, bool), done=scalar(False, bool), result=scalar(0, INDEX), out=out,
        filled=jnp.zeros(ts.shape[0], bool),
        stats={k: scalar(0, INDEX) for k in STAT_NAMES},
        ev_t=jnp.zeros(records, dtype), ev_kind=jnp.zeros(records, jnp.int8),
        ev_entry=jnp.zeros(records, INDEX), n_records=scalar(0, INDEX),
    )


def repad(state: ExactState, capacity: int) -> ExactState:
    """`state` with its sliding arrays at another `capacity` (at least `n`): padding slopes 0,
    the pseudo-inverse's padding block the identity (as `solve_slopes` pads it)."""
    k = state.capacity
    if capacity == k:
        return state
    lead = state.idx.shape[:-1]
    m = min(k, capacity)
    idx = jnp.zeros((*lead, capacity), INDEX).at[..., :m].set(state.idx[..., :m])
    lam = jnp.zeros((*lead, capacity), state.lam.dtype)
    pinv = jnp.broadcast_to(jnp.eye(capacity, dtype=state.pinv.dtype), (*lead, capacity, capacity))
    return eqx.tree_at(
        lambda s: (s.idx, s.lam, s.pinv, s.lam_end, s.resize), state,
        (idx, lam.at[..., :m].set(state.lam[..., :m]),
         pinv.at[..., :m, :m].set(state.pinv[..., :m, :m]),
         lam.at[..., :m].set(state.lam_end[..., :m]), jnp.zeros_like(state.resize)))


def next_capacity(k: int, n: int | None = None) -> int:
    """The sliding capacity after `k` for a set of `n` entries: with `n` at most k / 4 (a set
    that shrank, `shrinks`), the smallest power of two >= max(8, 2 n); else the next larger:
    0 (nothing slides: the loop compiles without the sliding solves), then 8, 16, 32, ...: a
    solve whose sliding set reaches K entries compiles twice up to K = 8, ceil(log2 K) - 1
    times above (each capacity >= 4 costs ~14 s of tracing and compiling on 2 CPU cores). A
    smaller capacity is one compiled before: the cost of an event follows the capacity, not
    the set (Fig 2 network from t = 10, at most 15 entries sliding: 0.146 s per event at
    capacity 128 against 0.077 s at 16, `scripts/kinks_fig2_projection.py`)."""
    if n is not None and shrinks(k, n):
        return max(8, 1 << max(0, 2 * n - 1).bit_length())
    return max(8, 2 * k)


def shrinks(k, n):
    """A sliding set of `n` entries moves to a smaller capacity than `k` (`next_capacity`)."""
    return (k > 8) & (4 * n <= k)


class Layout(eqx.Module):
    """Where each flat pre-activation entry sits: data point and column in the point's row of
    pre-activations (`_Problem.rows`), and its layer and unit."""

    starts: tuple = eqx.field(static=True)
    widths: tuple = eqx.field(static=True)
    cols: tuple = eqx.field(static=True)

    @classmethod
    def of(cls, shapes):
        sizes = [math.prod(s) for s in shapes]
        widths = [math.prod(s[1:]) for s in shapes]
        return cls(tuple(np.cumsum([0, *sizes[:-1]]).tolist()), tuple(widths),
                   tuple(np.cumsum([0, *widths[:-1]]).tolist()))

    def locate(self, idx):
        """(layer, point, unit, column) of flat entries `idx` (NumPy or JAX)."""
        xp = jnp if isinstance(idx, jax.Array) else np
        d = idx.dtype if isinstance(idx, jax.Array) else np.int64
        starts = xp.asarray(self.starts, d)
        layer = (xp.searchsorted(starts, idx, side="right") - 1).astype(d)
        rel = idx - starts[layer]
        width = xp.asarray(self.widths, d)[layer]
        point, unit = rel // width, rel % width
        return layer, point, unit, xp.asarray(self.cols, d)[layer] + unit


def sliding_arrays(layout: Layout, idx, n, per_point: bool, dtype, lam=None,
                   pinv=None, guess=None) -> _Sliding:
    """The `_Sliding` of entries `idx[:n]` (in-graph): their points (sorted, padded with 0),
    each entry's slot among them and column in its point's row, and the guess `lam`, `pinv`
    (with `guess`, used where it is True; see `_Sliding`)."""
    k = idx.shape[0]
    valid = jnp.arange(k, dtype=INDEX) < n
    if not per_point:
        return _Sliding(idx, valid, lam=lam, pinv=pinv, guess=guess)
    _, point, _, col = layout.locate(idx)
    big = jnp.iinfo(point.dtype).max
    pts = jnp.unique(jnp.where(valid, point, big), size=k, fill_value=big)
    pts_valid = pts < big
    slot = jnp.where(valid, jnp.searchsorted(pts, point), 0)
    return _Sliding(idx, valid, jnp.where(pts_valid, pts, 0), pts_valid.astype(dtype), slot,
                    col, lam, pinv, guess)


def compact(idx, keep):
    """`idx` with the entries not in `keep` removed and the rest moved to the front in order."""
    k = idx.shape[0]
    to = jnp.where(keep, jnp.cumsum(keep.astype(INDEX)) - 1, k)
    return jnp.zeros_like(idx).at[to].set(idx, mode="drop"), jnp.sum(keep).astype(INDEX)


def record(state_rec, t, kind, entries, which):
    """Appends a row (t, kind, entry) for each `entries[i]` with `which[i]`, in order."""
    ev_t, ev_kind, ev_entry, n = state_rec
    R = ev_t.shape[0]
    at = jnp.where(which, n + jnp.cumsum(which.astype(INDEX)) - 1, R)
    at = jnp.where(at < R, at, R)
    ev_t = ev_t.at[at].set(t, mode="drop")
    ev_kind = ev_kind.at[at].set(jnp.asarray(kind, ev_kind.dtype), mode="drop")
    ev_entry = ev_entry.at[at].set(entries.astype(INDEX), mode="drop")
    return ev_t, ev_kind, ev_entry, n + jnp.sum(which).astype(INDEX)


def event_weights(sign, offset, z):
    """In-graph `events._event_weights`: positive weights that make each entry's event
    value 1 at the piece's start (1 for sliding entries)."""
    value = sign * z + offset
    tiny = jnp.finfo(z.dtype).tiny
    floor = jnp.finfo(z.dtype).eps ** 2 * jnp.maximum(jnp.max(jnp.abs(z)), tiny)
    return jnp.where(sign == 0, 1.0, 1.0 / jnp.maximum(value, floor))
