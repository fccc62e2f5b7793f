"""The exact ReLU flow's event loop as one `lax.while_loop`: jit-, vmap- and shard-able.

One iteration of the loop handles the event that ended the last piece, if any (releases,
then each entry that reached its surface: crossing, sliding or neither; then the slopes of
the sliding set and their Jacobian for the next piece), then integrates the next smooth
piece: a `diffrax.diffeqsolve` on the fixed activation pattern, ended by a `diffrax.Event`
located by the Illinois root finder (`illinois.Illinois`). The numerics are those of the
host loop (`host.kink_flow`, docs/kinks.md): the same vector field, event functions, slopes
(`sliding`) and decisions, as array operations of static shape over the state (`ExactState`),
so no Python runs per event and a batch of trajectories is one vmapped loop.

The loop stops when every trajectory is done, when one needs a larger sliding capacity
(`ExactState.resize` with `pending`: the caller re-pads the state and calls again, the event
is handled anew at the larger capacity), when a single trajectory's sliding set has fallen
to a quarter of the capacity (`resize` after the event: the next piece runs at a smaller
one), or when every trajectory has met `stop_at` events (the caller's
chunks, for progress and checkpoints). Whatever the chunks, the states are the same: a call
starts from a state at an iteration boundary and the iterations depend on nothing else.
"""

import dataclasses

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from .._cache import proven_solve_checks
from .events import _FIRST_STEP_GROWTH, _ParamsNorm, _split, _WithFirst
from .illinois import _ROOT_FINDER
from .sliding import _RELEASE_TOL, slope_guess, solve_slopes
from .state import (
    CROSSING,
    INDEX,
    MAX_EVENTS,
    RELEASE,
    SLIDE,
    STOPPED_EARLY,
    ExactState,
    compact,
    event_weights,
    record,
    shrinks,
    sliding_arrays,
)

_EVENT = dfx.RESULTS.event_occurred._value
# An entry whose event value is within this of 0 (relative to max |z|) at an event is a hit;
# an entry handled at an event starts the next piece this far (relative) off its surface.
_HIT_TOL = 1e-9
_OFFSET = 1e-12

# Traces of `_loop` (one per compilation): the compile-count tests read it.
TRACES = [0]


class _Context(eqx.Module):
    """What the loop's functions share: the problem, where each entry sits, and the static
    choices (per-point loss, carried first layer)."""

    problem: eqx.Module
    layout: eqx.Module
    per_point: bool = eqx.field(static=True)
    carry_first: bool = eqx.field(static=True)
    # Stop for a smaller capacity when the sliding set shrinks (single trajectories: a
    # vmapped batch shares one capacity).
    shrink: bool = eqx.field(static=True, default=False)

    def sliding(self, s_idx, n, dtype, lam=None, pinv=None, guess=None):
        return sliding_arrays(self.layout, s_idx, n, self.per_point, dtype, lam, pinv, guess)


def _vector_field(t, y, args):
    del t
    ctx, mask, sl, n = args[:4]
    p, z1 = _split(y)
    if sl.idx.shape[0]:
        field = ctx.problem.cond(n > 0,
                                 lambda: solve_slopes(ctx.problem, p, mask, sl, z1=z1)[2],
                                 lambda: ctx.problem.field(p, mask, z1))
    else:  # capacity 0: nothing can slide
        field = ctx.problem.field(p, mask, z1)
    return field if z1 is None else _WithFirst(field, ctx.problem.first(field))


def _release_value(y, args):
    """min over sliding entries of min(lambda, 1 - lambda) (+inf with none)."""
    ctx, mask, sl, n = args[:4]
    p, z1 = _split(y)
    if not sl.idx.shape[0]:
        return jnp.asarray(jnp.inf, mask.dtype)

    def value():
        lam = solve_slopes(ctx.problem, p, mask, sl, z1=z1)[1]
        return jnp.min(jnp.where(sl.valid, jnp.minimum(lam, 1 - lam), jnp.inf))

    return ctx.problem.cond(n > 0, value, lambda: jnp.asarray(jnp.inf, mask.dtype))


def _crossing_value(y, args):
    """min_j s_j z_j + offset_j over entries off their surfaces (weighted to 1 at the piece's
    start)."""
    ctx, mask, sl, n, sign, offset, combined = args
    p, z1 = _split(y)
    z = ctx.problem.pre(p, mask, z1)
    return jnp.min(jnp.where(sign == 0, jnp.inf, sign * z + offset))


def _crossing_cond(t, y, args, **kwargs):
    """The crossing condition; +inf with `combined` (`_release_cond` holds it then)."""
    del t, kwargs
    return jnp.where(args[-1], jnp.inf, _crossing_value(y, args))


def _release_cond(t, y, args, **kwargs):
    """The release condition; with `combined`, the minimum of it and the crossing condition.
    The release value (the sliding slopes' solve) appears in this condition only: XLA inlines
    a copy of the solve at every place an event condition is evaluated (the piece's start,
    every step's end, the root find), and the crossing condition is a forward pass."""
    del t, kwargs
    ctx, combined = args[0], args[-1]
    release = _release_value(y, args)
    return ctx.problem.cond(combined, lambda: jnp.minimum(_crossing_value(y, args), release),
                            lambda: release)


def _piece(ctx, s: ExactState, ts, t1, solver, controller, max_steps):
    """Integrates the next smooth piece from `s` (to the first event or t1). Trajectories
    that are done run a piece of length 0."""
    problem, dtype = ctx.problem, s.z.dtype
    active = ~s.done & ~s.resize
    weight = event_weights(s.sign, s.offset, s.z)
    sl = ctx.sliding(s.idx, s.n, dtype, s.lam, s.pinv)
    t_end = jnp.where(active, t1, s.t)
    dt0 = jnp.where(active, jnp.minimum(s.dt0, t1 - s.t), 0.0)
    args = (ctx, s.mask, sl, s.n, s.sign * weight, s.offset * weight, s.combined)
    y0 = s.p
    if ctx.carry_first:
        y0 = _WithFirst(s.p, problem.first(s.p))
        if isinstance(controller, dfx.PIDController):
            controller = eqx.tree_at(lambda c: c.norm, controller, _ParamsNorm(controller.norm))
    # Two conditions: diffrax locates only the one that triggered first in the step, so
    # locating a crossing takes forward passes only. If the release came first after all, the
    # piece runs again with the two as one (`combined`).
    event = dfx.Event((_crossing_cond, _release_cond), root_finder=_ROOT_FINDER,
                      direction=False)
    with proven_solve_checks():
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_vector_field), solver, s.t, t_end, dt0, y0, args=args,
            saveat=dfx.SaveAt(subs=[dfx.SubSaveAt(ts=jnp.clip(ts, s.t, t_end)),
                                    dfx.SubSaveAt(t1=True)]),
            stepsize_controller=controller, event=event, max_steps=max_steps, throw=False,
        )
    ys = _split(sol.ys[0])[0]
    y_end, z1_end = _split(jax.tree.map(lambda x: x[-1], sol.ys[1]))
    z = problem.pre(y_end, s.mask, z1_end)
    lam = jnp.zeros_like(s.lam)
    if s.capacity:
        lam = problem.cond(s.n > 0,
                           lambda: solve_slopes(problem, y_end, s.mask, sl, z1=z1_end)[1],
                           lambda: lam)
    return (ys, sol.ts[1][-1], y_end, z, lam, sol.result._value,
            sol.stats["num_steps"].astype(INDEX), sol.stats["num_rejected_steps"].astype(INDEX))


def _after_piece(s: ExactState, piece, ts, t1, max_events) -> ExactState:
    """Takes in a piece: saves, counters, and what ended it (event, t1, failure)."""
    ys, t_end, y_end, z, lam, res, n_steps, n_rej = piece
    active = ~s.done & ~s.resize
    valid = jnp.arange(s.capacity, dtype=INDEX) < s.n
    margin = jnp.min(jnp.where(valid, jnp.minimum(lam, 1 - lam), jnp.inf), initial=jnp.inf)
    release_first = (s.n > 0) & ~s.combined & (margin < -_RELEASE_TOL)
    commit = active & ~release_first
    stats = dict(s.stats)
    stats["num_steps"] = stats["num_steps"] + jnp.where(active, n_steps, 0)
    stats["num_rejected_steps"] = stats["num_rejected_steps"] + jnp.where(active, n_rej, 0)
    # The next piece's first step: within a few times this piece's length per accepted step.
    accepted = n_steps - n_rej
    grown = _FIRST_STEP_GROWTH * (t_end - s.t) / jnp.maximum(accepted, 1).astype(s.t.dtype)
    dt0 = jnp.where(commit & (t_end > s.t) & (accepted > 0), grown, s.dt0)
    take = (ts >= s.t) & (ts <= t_end) & ~s.filled & commit
    out = jax.tree.map(
        lambda o, a: jnp.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, o), s.out, ys)
    filled = s.filled | take
    is_event = res == _EVENT
    inside = t_end < t1
    events = stats["num_events"] + (commit & is_event & inside).astype(INDEX)
    stats["num_events"] = events
    over = commit & is_event & inside & (events > max_events)
    finished = commit & (~is_event | ~inside | over)
    result = jnp.where(commit & ~is_event, res, s.result)
    result = jnp.where(over, MAX_EVENTS, result)
    result = jnp.where(finished & (result == 0) & ~jnp.all(filled), STOPPED_EARLY, result)

    def pick(new, old):
        return jax.tree.map(lambda a, b: jnp.where(commit, a, b), new, old)

    return eqx.tree_at(
        lambda q: (q.t, q.p, q.z, q.lam_end, q.dt0, q.out, q.filled, q.stats, q.pending,
                   q.combined, q.done, q.result),
        s, (pick(t_end, s.t), pick(y_end, s.p), pick(z, s.z), pick(lam, s.lam_end), dt0, out,
            filled, stats, jnp.where(active, commit & is_event & inside & ~over, s.pending),
            jnp.where(active, release_first, s.combined),
            s.done | finished, result))


def _leave(z, delta, marks, j, side):
    """Entries j leave their surface on `side` (1: active, 0: inactive), offset `delta` off it;
    vectorised, an index past the end is dropped. `marks`: (mask, sign, offset)."""
    mask, sign, offset = marks
    S = mask.shape[0]
    new_sign = jnp.where(side > 0, 1.0, -1.0).astype(z.dtype)
    zj = z[jnp.clip(j, 0, S - 1)]
    return (mask.at[j].set(side, mode="drop"), sign.at[j].set(new_sign, mode="drop"),
            offset.at[j].set(jnp.maximum(0.0, -new_sign * zj) + delta, mode="drop"))


def _handle_event(ctx, s: ExactState) -> ExactState:
    """The event that ended the last piece: releases, hits, the next piece's slopes. If the
    sliding set would outgrow the capacity, `s` comes back unchanged but for `resize` (and
    `pending`); with `ctx.shrink`, `resize` is also set (`pending` not) when the set has
    fallen to a quarter of the capacity."""
    dtype, k = s.z.dtype, s.capacity
    zscale = jnp.maximum(jnp.max(jnp.abs(s.z)), jnp.finfo(dtype).tiny)
    delta = _OFFSET * zscale
    pos = jnp.arange(k, dtype=INDEX)
    rec = (s.ev_t, s.ev_kind, s.ev_entry, s.n_records)
    stats = dict(s.stats)
    marks, idx, n, stats, rec = _releases(s, delta, pos, stats, rec)
    marks, idx, n, stats, rec, grow = _hits(ctx, s, zscale, delta, pos, marks, idx, n, stats,
                                            rec)
    stats["num_sliding_max"] = jnp.maximum(stats["num_sliding_max"], n)
    # Whether the sliding set is still the last piece's (its guess then serves).
    same = (n == s.n) & jnp.all(jnp.where(pos < n, idx == s.idx, True))
    if not k:
        handled = eqx.tree_at(
            lambda q: (q.mask, q.sign, q.offset, q.stats, q.ev_t, q.ev_kind, q.ev_entry,
                       q.n_records, q.pending),
            s, (*marks, stats, *rec, jnp.asarray(False)))
    else:
        marks, idx, n, lam, pinv, stats, rec = _settle_slopes(ctx, s, delta, pos, same, marks,
                                                              idx, n, stats, rec)
        handled = eqx.tree_at(
            lambda q: (q.mask, q.sign, q.offset, q.idx, q.n, q.lam, q.pinv, q.stats, q.ev_t,
                       q.ev_kind, q.ev_entry, q.n_records, q.pending),
            s, (*marks, idx, n, lam, pinv, stats, *rec, jnp.asarray(False)))
    if ctx.shrink:
        # The set has fallen to a quarter of the capacity: the loop stops before the next
        # piece, which runs at a smaller capacity (`state.next_capacity`).
        handled = eqx.tree_at(lambda q: q.resize, handled, shrinks(k, handled.n))
    return jax.tree.map(lambda a, b: jnp.where(grow, a, b),
                        eqx.tree_at(lambda q: q.resize, s, jnp.asarray(True)), handled)


def _releases(s: ExactState, delta, pos, stats, rec):
    """A sliding entry whose slope reached 0 or 1 at the end of the last piece leaves the
    surface: `((mask, sign, offset), idx, n, stats, rec)` with the sliding set compacted."""
    S = s.mask.shape[0]
    valid = pos < s.n
    rel = valid & ((s.lam_end <= _RELEASE_TOL) | (s.lam_end >= 1 - _RELEASE_TOL))
    side = jnp.where(s.lam_end >= 0.5, 1.0, 0.0).astype(s.z.dtype)
    marks = _leave(s.z, delta, (s.mask, s.sign, s.offset), jnp.where(rel, s.idx, S), side)
    rec = record(rec, s.t, RELEASE, s.idx, rel)
    stats["num_releases"] = stats["num_releases"] + jnp.sum(rel).astype(INDEX)
    idx, n = compact(s.idx, valid & ~rel)
    return marks, idx, n, stats, rec


def _hits(ctx, s: ExactState, zscale, delta, pos, marks, idx, n, stats, rec):
    """The entries at their surface, in the order of their index: each crosses, starts sliding
    or (moving away) just gets an offset. Returns `(marks, idx, n, stats, rec, grow)`: `grow`
    if the sliding set would outgrow the capacity (the loop stops at the first such entry)."""
    k, z = s.capacity, s.z
    mask, sign, offset = marks
    values = jnp.where(sign == 0, jnp.inf, sign * z + offset)
    hits = values <= _HIT_TOL * zscale

    def hit(c):
        mask, sign, offset, idx, n, remaining, stats, rec, grow = c
        j = jnp.argmax(remaining).astype(INDEX)
        remaining = remaining.at[j].set(False)
        zd_plus, zd_minus = _one_sided_rates(ctx, s, pos, mask, idx, n, j)
        was_active = sign[j] > 0
        tiny = 1e-12 * (jnp.abs(zd_plus) + jnp.abs(zd_minus))
        approaching = jnp.where(was_active, zd_plus, zd_minus) * sign[j] < -tiny
        other = jnp.where(was_active, zd_minus, zd_plus)
        slide = approaching & (other * sign[j] > tiny)
        cross = approaching & ~slide
        grow = grow | (slide & (n >= k))
        away_offset = jnp.maximum(0.0, -sign[j] * z[j]) + delta
        new_sign = jnp.where(slide, 0.0, jnp.where(cross, -sign[j], sign[j]))
        new_mask = jnp.where(cross, jnp.where(was_active, 0.0, 1.0), mask[j])
        new_offset = jnp.where(slide, 0.0, jnp.maximum(0.0, -new_sign * z[j]) + delta)
        new_offset = jnp.where(approaching, new_offset, away_offset)
        mask, sign, offset = (mask.at[j].set(new_mask), sign.at[j].set(new_sign),
                              offset.at[j].set(new_offset))
        idx = jnp.where(slide & (pos == n), j, idx)
        n = n + slide.astype(INDEX)
        stats = dict(stats)
        stats["num_crossings"] = stats["num_crossings"] + cross.astype(INDEX)
        stats["num_sliding_intervals"] = stats["num_sliding_intervals"] + slide.astype(INDEX)
        kind = jnp.where(cross, CROSSING, SLIDE)
        rec = record(rec, s.t, kind, j[None], approaching[None])
        return mask, sign, offset, idx, n, remaining, stats, rec, grow

    def more_hits(c):
        return jnp.any(c[5]) & ~c[-1]

    mask, sign, offset, idx, n, _, stats, rec, grow = lax.while_loop(
        more_hits, hit, (mask, sign, offset, idx, n, hits, stats, rec, jnp.asarray(False)))
    return (mask, sign, offset), idx, n, stats, rec, grow


def _one_sided_rates(ctx, s: ExactState, pos, mask, idx, n, j):
    """z_j' with entry j active and with it inactive, the sliding entries `idx[:n]` at their
    slopes: while the sliding set is the last piece's, from its guess (chord iterations, one
    residual each); else by Newton from 0."""
    problem, dtype, k = ctx.problem, s.z.dtype, s.capacity
    # The two sides one after the other (`lax.map`), each through the same traced slope solve
    # as the rest of the loop. As one vmapped evaluation the slope solve is batched anew (a
    # second, larger copy in the program): the small solve of `scripts/kinks_first_call.py`
    # took ~2 s longer on its first call (tracing 3.5 s against 2.5 s, XLA 10.3 s against
    # 9.0 s), for no measurable gain per event (8 quickstart members: 842 against 850 ms).
    same = (n == s.n) & jnp.all(jnp.where(pos < n, idx == s.idx, True))
    _, point, _, col = ctx.layout.locate(j)

    def zdot(side):
        m = mask.at[j].set(side)

        def with_slopes():
            # From the last piece's guess while the set is that piece's, else fresh from 0:
            # one traced solve for both (`_Sliding.guess`).
            lam = jnp.where(same, s.lam, 0.0)
            m_s, _, field = solve_slopes(problem, s.p, m,
                                         ctx.sliding(idx, n, dtype, lam, s.pinv, same))
            return m_s, field

        if k:
            m_f, field = problem.cond(n > 0, with_slopes, lambda: (m, problem.field(s.p, m)))
        else:
            m_f, field = m, problem.field(s.p, m)
        return jax.jvp(lambda q: problem.rows(q, m_f, point[None]), (s.p,), (field,))[1][0, col]

    return lax.map(zdot, jnp.array([1.0, 0.0], dtype))


def _settle_slopes(ctx, s: ExactState, delta, pos, same, marks, idx, n, stats, rec):
    """The next piece's slopes and the pseudo-inverse of their Jacobian (`slope_guess`): by
    chord iterations from the last piece's guess while the sliding set is that piece's, else
    by Newton from the slopes known (0 for entries that just joined). An entry whose slope is
    already at 0 or 1 is released, and the slopes solved again. `same`: the sliding set is
    the last piece's. Returns `(marks, idx, n, lam, pinv, stats, rec)`."""
    problem, dtype, k, S = ctx.problem, s.z.dtype, s.capacity, s.mask.shape[0]

    def guess(c):
        mask, sign, offset, idx, n, lam, pinv, reuse, known_idx, known_lam, known_n, stats, \
            rec, _ = c

        # From the last piece's guess (`reuse`), else fresh from the slopes known before
        # the set changed: one traced solve for both (`_Sliding.guess`).
        hit_known = (idx[:, None] == known_idx[None, :]) & (pos[None, :] < known_n)
        warm = jnp.where(pos < n, jnp.sum(jnp.where(hit_known, known_lam[None, :], 0.0),
                                          axis=1), 0.0)
        g = slope_guess(problem, s.p, mask, ctx.sliding(
            idx, n, dtype, jnp.where(reuse, s.lam_end, warm), s.pinv, reuse))
        lam, pinv = g.lam, g.pinv
        valid = pos < n
        out = valid & ~((_RELEASE_TOL < lam) & (lam < 1 - _RELEASE_TOL))
        first = jnp.argmax(out).astype(INDEX)
        any_out = jnp.any(out)
        j = jnp.where(any_out, idx[first], S)
        side = jnp.where(lam[first] >= 0.5, 1.0, 0.0).astype(dtype)
        mask, sign, offset = _leave(s.z, delta, (mask, sign, offset), j, side)
        rec = record(rec, s.t, RELEASE, j[None], any_out[None])
        stats = dict(stats)
        stats["num_releases"] = stats["num_releases"] + any_out.astype(INDEX)
        new_idx, new_n = compact(idx, valid & ~(any_out & (pos == first)))
        return (mask, sign, offset, new_idx, new_n, lam, pinv, jnp.asarray(False), idx, lam, n,
                stats, rec, ~any_out)

    def unsettled(c):
        return (c[4] > 0) & ~c[-1]

    eye = jnp.eye(k, dtype=dtype)
    init = (*marks, idx, n, s.lam, s.pinv, same, s.idx, s.lam_end, s.n, stats, rec,
            jnp.asarray(False))
    mask, sign, offset, idx, n, lam, pinv, *_, stats, rec, _ = lax.while_loop(
        unsettled, guess, init)
    lam = jnp.where(n > 0, lam, 0.0)
    pinv = jnp.where(n > 0, pinv, eye)
    return (mask, sign, offset), idx, n, lam, pinv, stats, rec


def loop(ctx, s: ExactState, ts, t1, max_events, stop_at, solver, controller, max_steps):
    """Runs one trajectory's event loop from `s` until it is done, needs a larger capacity,
    or has met `stop_at` events (see the module docstring)."""
    TRACES[0] += 1

    def body(s):
        s = ctx.problem.cond(s.pending, lambda: _handle_event(ctx, s), lambda: s)
        piece = _piece(ctx, s, ts, t1, solver, controller, max_steps)
        return _after_piece(s, piece, ts, t1, max_events)

    def going(s):
        return ~s.done & ~s.resize & (s.stats["num_events"] < stop_at)

    return lax.while_loop(going, body, s)


@eqx.filter_jit
def run(ctx, s, ts, t1, max_events, stop_at, solver, controller, max_steps, batched):
    """`loop` compiled; with `batched`, vmapped over the leading axis of `s` and `stop_at`."""
    if batched:
        ctx = eqx.tree_at(lambda c: c.problem, ctx,
                          dataclasses.replace(ctx.problem, vmapped=True))

    def one(s, stop_at):
        return loop(ctx, s, ts, t1, max_events, stop_at, solver, controller, max_steps)

    if batched:
        return jax.vmap(one)(s, stop_at)
    return one(s, stop_at)
