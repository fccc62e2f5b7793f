"""The exact flow's reference loop on the host: one Python iteration per event.

`kink_flow` integrates one trajectory piece by piece (`events._piece`) and decides on the host
what happens at each event: releases of sliding entries whose slope reached 0 or 1, then each
entry that reached its surface crosses, starts sliding or (moving away) is left as it is, then
the slopes of the sliding set are solved for the next piece. Its state can be checkpointed to
an .npz file (`_Checkpoint`, `checkpoint_info`). The compiled loop (`driver`) makes the same
decisions in-graph; it is tested against this loop, which the benchmarks keep as a baseline.
"""

import dataclasses
import hashlib
import json
import os
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from .events import (
    _FIRST_STEP,
    _FIRST_STEP_GROWTH,
    _carries_first,
    _event_weights,
    _piece,
    _pre,
    _slope_guess,
    _zdot_entry,
)
from .problem import _locate, _per_point, _Problem
from .sliding import _RELEASE_TOL, _repad, _Sliding, _sliding_arrays


def kink_flow(model, loss, t0, t1, ts, solver, controller, max_steps, max_events, record=False,
              progress=False, label="", checkpoint=None):
    """Single-trajectory exact flow.

    Returns `(saved params at ts, stats dict, result code, pieces)`; `pieces` (with
    `record=True`, else empty) lists each smooth piece as a dict with its start/end times and
    states, the activation mask, the sliding entries, and what ended it. `progress` shows a
    tqdm bar over flow time with the events met and the entries sliding. `checkpoint`: a file
    for the solve's state (see `_Checkpoint`): saved every `CHECKPOINT_SECONDS` and when the
    solve stops, resumed from if it exists.
    """
    with tqdm.tqdm(total=float(t1) - float(t0), disable=not progress, unit="t",
                   desc=f"exact kinks {label}".strip(), leave=False,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| t={n:.4g}/{total:.4g} "
                              "[{elapsed}<{remaining}{postfix}]") as bar:
        return _kink_flow(model, loss, t0, t1, ts, solver, controller, max_steps, max_events,
                          record, bar, checkpoint)


# The exact path saves its checkpoint (if given one) at the first piece start this long after the
# last save, and when it stops.
CHECKPOINT_SECONDS = 60.0


def fingerprint(params, loss, t0, t1, ts, solver, controller) -> str:
    """A hash of what determines an exact solve's solution: initial parameters, data, times,
    solver, tolerances (a checkpoint from another problem is refused by it)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params) + jax.tree.leaves(eqx.filter(loss, eqx.is_array)):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.asarray(ts, np.float64).tobytes())
    h.update(repr((float(t0), float(t1), type(solver).__name__, type(controller).__name__,
                   float(getattr(controller, "rtol", 0.0)),
                   float(getattr(controller, "atol", 0.0)))).encode())
    return h.hexdigest()


class _Checkpoint:
    """The state of a piecewise solve at a piece start, in an .npz file: time, parameters,
    activation mask, event signs and offsets, sliding entries and their slope guess, first step,
    statistics, the states saved so far, and the seconds spent (`elapsed_s`, summed over
    resumed runs). A solve that reached t1 is stored with its outputs (`done`); one that
    failed (max_events, max_steps) at the start of the piece it failed on, so that a rerun
    with a larger budget carries on. `fingerprint` hashes what determines the solution (initial
    parameters, data, times, solver, tolerances): a file from another problem is refused."""

    def __init__(self, path, params, loss, t0, t1, ts, solver, controller):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint: the folder of {self.path} does not exist; create "
                             f"it or pass another path")
        self.fingerprint = fingerprint(params, loss, t0, t1, ts, solver, controller)
        self.treedef = jax.tree.structure(params)
        self.last_save = time.perf_counter()
        self.history = []

    def check_fingerprint(self, meta):
        """Refuses a file written by the solve of another problem."""
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint: {self.path} holds the solve of a different problem "
                             f"(model, data, times, solver or tolerances differ); delete it or "
                             f"pass another path")

    def load(self):
        """The saved state as a dict, or None if there is no file."""
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
            meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint: {self.path} is not a flowsim checkpoint ({e}); "
                             f"delete it or pass another path") from None
        self.check_fingerprint(meta)

        def tree(prefix, n):
            return jax.tree.unflatten(self.treedef, [data[f"{prefix}{i}"] for i in range(n)])

        self.history = meta.get("history", [])
        n = self.treedef.num_leaves
        state = {**meta, "p": tree("p", n), "out": tree("out", n) if meta["has_out"] else None}
        for k in ("mask", "sign", "offset", "filled", "lam", "pinv"):
            state[k] = data.get(k)
        return state

    def save(self, state, force=False):
        """Writes `state` (atomically) if forced or `CHECKPOINT_SECONDS` have passed."""
        now = time.perf_counter()
        if not force and now - self.last_save < CHECKPOINT_SECONDS:
            return
        self.last_save = now
        arrays = {f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state["p"]))}
        if state["out"] is not None:
            arrays.update({f"out{i}": x for i, x in enumerate(jax.tree.leaves(state["out"]))})
        for k in ("mask", "sign", "offset", "filled", "lam", "pinv"):
            if state.get(k) is not None:
                arrays[k] = np.asarray(state[k])
        meta = {k: state[k] for k in ("t", "dt0", "sliding", "stats", "result", "done",
                                      "elapsed_s")}
        # One row per write: how the solve progressed (time, events, sliding, seconds).
        self.history.append([state["t"], state["stats"]["num_events"], len(state["sliding"]),
                             state["elapsed_s"]])
        meta.update(fingerprint=self.fingerprint, has_out=state["out"] is not None,
                    history=self.history)
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, self.path)


def checkpoint_info(path, states: bool = False) -> dict:
    """What an exact solve's checkpoint file holds: `t` reached, `stats` there, `sliding`
    entries, `elapsed_s` (seconds spent, summed over resumed runs), `done`, `history` (one row
    [t, events, entries sliding, seconds] per write of the file); with `states`
    also `filled` (which save times the solve has passed) and `saved`, the leaves of the
    parameters at the save times (leading axis: time; rows not `filled` are not meaningful)."""
    with np.load(os.fspath(path), allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        info = {k: meta[k] for k in ("t", "stats", "sliding", "elapsed_s", "done")}
        info["history"] = meta.get("history", [])
        if states:
            n = sum(k.startswith("out") for k in f.files)
            info["filled"] = f["filled"] if "filled" in f.files else None
            info["saved"] = [f[f"out{i}"] for i in range(n)]
    return info


@dataclasses.dataclass
class _Run:
    """The host loop's state at a piece start, updated in place from one piece to the next.

    Per pre-activation entry: its slope on the pattern (`mask`), its side (`sign`, +1 / -1; 0
    while sliding), the offset of its event value, and its value `z` (None after a resume
    until computed). `sliding`: the sliding entries in the order they joined; `sl`: their
    arrays with the slope guess. `out`, `filled`: the parameters at the save times so far.
    With `record`, `pieces` lists the pieces and their events."""

    problem: _Problem
    per_point: bool
    record: bool
    dtype: np.dtype
    t: float
    p: object
    dt0: float
    mask: np.ndarray
    sign: np.ndarray
    offset: np.ndarray
    z: np.ndarray | None
    sliding: list
    sl: _Sliding | None
    stats: dict
    filled: np.ndarray
    out: object = None
    result: int = 0
    elapsed: float = 0.0
    pieces: list = dataclasses.field(default_factory=list)

    def slides(self, entries) -> _Sliding:
        return _sliding_arrays(entries, self.problem.shapes, self.per_point)

    def note(self, kind, j):
        """Records an event in the last piece (with `record`)."""
        if self.record:
            self.pieces[-1]["events"].append((kind, j))

    def leave(self, j, side, z_end, delta):
        """Entry j, just taken out of `sliding`, is released to `side` (1: active)."""
        self.mask[j] = side
        self.sign[j] = 1.0 if side else -1.0
        self.offset[j] = max(0.0, -self.sign[j] * z_end[j]) + delta
        self.stats["num_releases"] += 1
        self.note("release", int(j))

    def snapshot(self, started) -> dict:
        """The state to checkpoint at this piece start (`_Checkpoint.save`)."""
        return {"t": self.t, "p": self.p, "dt0": self.dt0, "sliding": list(self.sliding),
                "stats": dict(self.stats), "result": 0, "done": False,
                "mask": self.mask.copy(), "sign": self.sign.copy(),
                "offset": self.offset.copy(), "out": self.out, "filled": self.filled.copy(),
                "lam": self.sl.lam, "pinv": self.sl.pinv,
                "elapsed_s": self.elapsed + time.perf_counter() - started}


def _start(problem, params, zs, ts, t0, t1, record) -> _Run:
    """The state at t0: entries on their side of the kink (those exactly at a kink, e.g.
    zero-initialised units, inactive), nothing sliding, nothing saved."""
    z = np.concatenate([np.asarray(v).ravel() for v in zs])
    dtype = z.dtype
    stats = {"num_steps": 0, "num_rejected_steps": 0, "num_events": 0, "num_crossings": 0,
             "num_sliding_intervals": 0, "num_releases": 0}
    run = _Run(problem, _per_point(problem.loss), record, dtype, t=float(t0), p=params,
               dt0=_FIRST_STEP * (float(t1) - float(t0)), mask=(z > 0).astype(dtype),
               sign=np.where(z > 0, 1, -1).astype(dtype), offset=np.zeros_like(z), z=z,
               sliding=[], sl=None, stats=stats, filled=np.zeros(np.shape(ts)[0], bool))
    run.sl = run.slides(run.sliding)
    return run


def _resume(run, saved):
    """`run` at the state of a checkpoint (`_Checkpoint.load`)."""
    run.t, run.p, run.dt0, run.sliding, run.stats = (saved[k] for k in (
        "t", "p", "dt0", "sliding", "stats"))
    run.mask, run.sign, run.offset = saved["mask"], saved["sign"], saved["offset"]
    run.out, run.filled, run.elapsed = saved["out"], saved["filled"], saved["elapsed_s"]
    sl = run.slides(run.sliding)
    if saved["lam"] is not None:
        lam, pinv = _repad(saved["lam"], saved["pinv"], len(run.sliding), sl.idx.shape[0])
        sl = dataclasses.replace(sl, lam=jnp.asarray(lam),
                                 pinv=None if pinv is None else jnp.asarray(pinv))
    run.sl = sl
    run.z = None


def _kink_flow(model, loss, t0, t1, ts, solver, controller, max_steps, max_events, record, bar,
               checkpoint=None):
    started = time.perf_counter()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    zs = model.forward(loss.X)[1]
    problem = _Problem(static, loss, tuple(z.shape for z in zs))
    carry_first = _carries_first(problem, solver, controller)
    run = _start(problem, params, zs, ts, t0, t1, record)
    ts = np.asarray(ts, run.dtype)
    ckpt = None if checkpoint is None else _Checkpoint(checkpoint, params, loss, t0, t1, ts,
                                                        solver, controller)
    saved = None if ckpt is None else ckpt.load()
    if saved is not None:
        _resume(run, saved)
        bar.update(run.t - float(t0))
        if saved["done"]:
            return run.out, run.stats, saved["result"], run.pieces
    snap = None
    try:
        while True:
            if ckpt is not None:
                snap = run.snapshot(started)
                ckpt.save(snap)
            if bar.n and run.stats["num_events"] % 10 == 0:
                bar.set_postfix(events=run.stats["num_events"], sliding=len(run.sliding),
                                refresh=False)
            ys, t_end, y_end, res, z_end, lam = _integrate(run, ts, t1, solver, controller,
                                                           max_steps, carry_first)
            _take(run, ys, t_end, ts)
            if record:
                run.pieces.append({"t0": run.t, "t1": float(t_end), "p0": run.p, "p1": y_end,
                                   "mask": run.mask.copy(), "sliding": list(run.sliding),
                                   "events": []})
            bar.update(t_end - run.t)
            run.p, run.t = y_end, t_end
            if res != dfx.RESULTS.event_occurred._value:
                run.result = res
                break
            if run.t >= t1:
                break
            run.stats["num_events"] += 1
            if run.stats["num_events"] > max_events:
                run.result = -1
                break
            _handle_event(run, z_end, lam)
    except KeyboardInterrupt:
        if snap is not None:
            ckpt.save(snap, force=True)
        raise
    return _finish(run, ckpt, snap, started)


def _integrate(run, ts, t1, solver, controller, max_steps, carry_first):
    """The next piece from `run`'s state, to the first event or t1: `(states at ts, t_end,
    state at t_end, diffrax's result, pre-activations and sliding slopes at t_end)`. Counts
    its steps and sets the next piece's first step."""
    problem, dtype, t = run.problem, run.dtype, run.t
    ts_piece = np.maximum(ts, t)
    if run.z is None:  # resumed from a checkpoint
        run.z = np.asarray(_pre(problem, run.p, jnp.asarray(run.mask)))
    weight = _event_weights(run.sign, run.offset, run.z)
    piece_args = (problem, run.p, jnp.asarray(t, dtype), jnp.asarray(t1, dtype),
                  jnp.asarray(min(run.dt0, t1 - t), dtype), jnp.asarray(ts_piece),
                  jnp.asarray(run.mask), run.sl, jnp.asarray(run.sign * weight),
                  jnp.asarray(run.offset * weight), solver, controller, max_steps)
    ys, t_end, y_end, res, n_steps, n_rej, z_end, lam = _piece(*piece_args,
                                                               carry_first=carry_first)
    if run.sliding and np.min(np.minimum(lam, 1 - lam)[: len(run.sliding)]) < -_RELEASE_TOL:
        # A crossing was located but a release came first: locate the earlier of the two.
        run.stats["num_steps"] += int(n_steps)
        run.stats["num_rejected_steps"] += int(n_rej)
        ys, t_end, y_end, res, n_steps, n_rej, z_end, lam = _piece(
            *piece_args, combined=True, carry_first=carry_first)
    run.stats["num_steps"] += int(n_steps)
    run.stats["num_rejected_steps"] += int(n_rej)
    t_end = float(t_end)
    # The next piece's first step: a restart's initial step selection would cost two
    # gradients. Events usually cut the step short: the next is likely within a few times
    # this piece's length per accepted step (the controller shrinks a step that fails).
    accepted = int(n_steps) - int(n_rej)
    if t_end > t and accepted > 0:
        run.dt0 = _FIRST_STEP_GROWTH * (t_end - t) / accepted
    return ys, t_end, y_end, int(res), z_end, lam


def _take(run, ys, t_end, ts):
    """Keeps the piece's states `ys` at the save times in [run.t, t_end] not yet filled."""
    take = (ts >= run.t) & (ts <= t_end) & ~run.filled
    if run.out is None:
        run.out = jax.tree.map(lambda a: np.array(a), ys)
    else:
        def merge(o, a):
            return np.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, o)

        run.out = jax.tree.map(merge, run.out, jax.tree.map(np.asarray, ys))
    run.filled |= take


def _handle_event(run, z_end, lam):
    """The event that ended the last piece (at `run.t`; `z_end`, `lam`: the pre-activations and
    the sliding slopes there): releases, then hits, then the next piece's slope guess."""
    run.z = z_end = np.asarray(z_end)
    lam_piece = np.asarray(lam)
    zscale = max(float(np.max(np.abs(z_end))), np.finfo(run.dtype).tiny)
    delta = 1e-12 * zscale
    piece_sliding = list(run.sliding)
    _releases(run, lam_piece[: len(run.sliding)], z_end, delta)
    _hits(run, z_end, zscale, delta, piece_sliding)
    _next_guess(run, lam_piece, piece_sliding, z_end, delta)


def _releases(run, lam, z_end, delta):
    """A sliding entry whose slope `lam` reached 0 or 1 leaves the surface."""
    for pos, j in enumerate(list(run.sliding)):
        if lam[pos] <= _RELEASE_TOL or lam[pos] >= 1 - _RELEASE_TOL:
            side = 1.0 if lam[pos] >= 0.5 else 0.0
            run.sliding.remove(j)
            run.leave(j, side, z_end, delta)


def _hits(run, z_end, zscale, delta, piece_sliding):
    """Entries whose event value reached zero: each crosses its surface, starts sliding along
    it (both sides push into it) or, moving away, only gets an offset."""
    mask, sign, offset = run.mask, run.sign, run.offset
    values = np.where(sign == 0, np.inf, sign * z_end + offset)
    hits = np.flatnonzero(values <= 1e-9 * zscale)
    for j in hits:
        zd_plus, zd_minus = _one_sided_rates(run, j, piece_sliding)
        was_active = sign[j] > 0
        # Derivatives at rounding level (e.g. exactly 0 with orthogonal inputs) count as 0.
        tiny = 1e-12 * (abs(zd_plus) + abs(zd_minus))
        approaching = (zd_plus if was_active else zd_minus) * sign[j] < -tiny
        if not approaching:
            offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
            continue
        other = zd_minus if was_active else zd_plus
        pushes_back = other * sign[j] > tiny  # the far side drives z back to the surface
        if pushes_back:
            run.sliding.append(int(j))
            sign[j] = 0.0
            offset[j] = 0.0
            run.stats["num_sliding_intervals"] += 1
            run.note("slide", int(j))
        else:
            mask[j] = 0.0 if was_active else 1.0
            sign[j] = -sign[j]
            offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
            run.stats["num_crossings"] += 1
            run.note("cross", int(j))


def _one_sided_rates(run, j, piece_sliding):
    """z_j' with entry j active and with it inactive, the sliding entries at their slopes."""
    mask_eff = run.mask.copy()
    # The piece's slope guess serves while the sliding set is the piece's.
    sl_now = run.sl if run.sliding == piece_sliding else run.slides(run.sliding)
    point, col = _locate(np.array([j]), run.problem.shapes)
    both = []
    for side in (1.0, 0.0):
        mask_eff[j] = side
        zd = _zdot_entry(run.problem, run.p, jnp.asarray(mask_eff), sl_now,
                         jnp.asarray(point[0]), jnp.asarray(col[0]))
        both.append(float(zd))
    return both


def _next_guess(run, lam_piece, piece_sliding, z_end, delta):
    """The next piece's slopes and the pseudo-inverse of their Jacobian (`slope_guess`), into
    `run.sl`. A sliding entry whose slope is already at 0 or 1 (a far side at rounding level)
    is released before the next piece, so the release condition starts positive, and the
    slopes are solved again."""
    # The slopes: by chord iterations from the last piece's guess while the sliding set is
    # that piece's, else by Newton from the slopes known (0 for entries that just joined).
    # (A Jacobian kept over several pieces slowed the chord to ~0.2 per iteration on the
    # Fig 2 network with 33 entries sliding, and Newton took over: 1.4 s per piece.)
    sliding = run.sliding
    reuse = sliding == piece_sliding
    known = dict(zip(piece_sliding, lam_piece.tolist()))
    while True:
        if not sliding:
            run.sl = run.slides(sliding)
            return
        if reuse:  # `run.sl` is still the piece's
            start = dataclasses.replace(run.sl, lam=jnp.asarray(lam_piece))
        else:  # Newton from the known slopes, 0 for entries that just joined
            start = run.slides(sliding)
            warm = np.zeros(start.idx.shape[0], run.dtype)
            warm[: len(sliding)] = [known.get(j, 0.0) for j in sliding]
            start = dataclasses.replace(start, lam=jnp.asarray(warm))
        run.sl = _slope_guess(run.problem, run.p, jnp.asarray(run.mask), start)
        reuse = False
        lam_now = np.asarray(run.sl.lam)
        known = dict(zip(sliding, lam_now.tolist()))
        out_of_range = [pos for pos in range(len(sliding))
                        if not (_RELEASE_TOL < lam_now[pos] < 1 - _RELEASE_TOL)]
        if not out_of_range:
            return
        pos = out_of_range[0]
        j = sliding.pop(pos)
        run.leave(j, 1.0 if lam_now[pos] >= 0.5 else 0.0, z_end, delta)


def _finish(run, ckpt, snap, started):
    """`kink_flow`'s returns, with the result (-2: stopped before the last save time) and the
    last statistics; the checkpoint's last write (the failed piece's start after a failure,
    so that a rerun with a larger budget carries on)."""
    if not run.filled.all() and run.result == 0:
        run.result = -2
    run.stats["num_sliding_now"] = len(run.sliding)
    run.stats["t_reached"] = run.t
    if ckpt is not None:
        run.elapsed += time.perf_counter() - started
        if run.result == 0:
            ckpt.save({"t": run.t, "p": run.p, "dt0": run.dt0, "sliding": list(run.sliding),
                       "stats": run.stats, "result": 0, "done": True, "mask": run.mask,
                       "sign": run.sign, "offset": run.offset, "out": run.out,
                       "filled": run.filled, "lam": None, "pinv": None,
                       "elapsed_s": run.elapsed}, force=True)
        elif snap is not None:
            ckpt.save(snap, force=True)
    return run.out, run.stats, run.result, run.pieces
