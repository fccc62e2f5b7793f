"""Exact gradient flow through ReLU kinks: piecewise-smooth integration, events, sliding.

On a fixed activation pattern the gradient flow of a (leaky-)ReLU network is a polynomial ODE.
`kink_flow` integrates one such piece at a time with diffrax, stops at the first pre-activation
that reaches zero (a `diffrax.Event` on min_j s_j z_j(theta), located by bisection on the step's
dense output), decides what happens there, and restarts:

- **crossing**: the other side's vector field carries z_j on through zero: flip the entry.
- **sliding** (Filippov): both sides push into the surface z_j = 0. The solution then moves
  along the surface with the convex combination of the two sides that keeps z_j' = 0. Because
  the loss is affine in the slope of an entry at z_j = 0, that combination is the vector field
  with the entry's slope sigma'(0) = lambda in [0, 1] (the Clarke subgradient element that
  keeps the trajectory on the surface). lambda is solved for at every evaluation; several
  surfaces can slide at once (a small linear system, then Newton's method: the
  field is multilinear in the slopes of entries of one data point in different layers).
- **release**: a sliding entry leaves when its lambda reaches 0 or 1 (a second event).

Any slope choice satisfies sigma'(z) z = sigma(z), so the Du–Hu–Lee invariants are conserved
through crossings and sliding, to the tolerance of the smooth pieces.

The cost per step is one forward pass over all surfaces for the event function on top of the
gradient; each event costs a restart of the solver. So the kink treatment costs in proportion
to the crossings met, not to the number of surfaces.
"""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx


class _Patterned(eqx.Module):
    """A model evaluated on a fixed activation pattern (what the losses see)."""

    model: eqx.Module
    pattern: tuple

    def __call__(self, x):
        return self.model.forward(x, self.pattern)[0]


def supports_kinks(model, loss) -> bool:
    """True when `model` is piecewise linear with kinks and `loss` exposes its inputs `X`."""
    acts = getattr(model, "activations", ())
    return (
        hasattr(loss, "X")
        and getattr(model, "is_piecewise_linear", False)
        and any(a in ("relu", "leaky_relu") for a in acts)
    )


def _lstsq(A, b):
    return jnp.linalg.lstsq(A, b, rcond=1e-12)[0]


class _Problem(eqx.Module):
    """The model's static part, the loss and the shapes of the pre-activations."""

    static: eqx.Module
    loss: eqx.Module
    shapes: tuple = eqx.field(static=True)

    def model(self, p):
        return eqx.combine(p, self.static)

    def unflatten(self, v):
        out, i = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(v[i:i + size].reshape(shape))
            i += size
        return tuple(out)

    def pre(self, p, mask):
        _, zs = self.model(p).forward(self.loss.X, self.unflatten(mask))
        return jnp.concatenate([z.ravel() for z in zs])

    def field(self, p, mask):
        pattern = self.unflatten(mask)
        g = eqx.filter_grad(lambda q: self.loss(_Patterned(self.model(q), pattern)))(p)
        return jax.tree.map(jnp.negative, g)

    def zdot(self, p, mask):
        """z'(theta) along the patterned vector field, for every entry."""
        return jax.jvp(lambda q: self.pre(q, mask), (p,), (self.field(p, mask),))[1]

    def sliding_mask(self, p, mask, idx, valid):
        """The mask with the slopes of the sliding entries chosen so that z_idx' = 0.

        z_idx' is affine in each slope but multilinear in all of them when sliding entries of
        the same data point sit in different layers (the slope of layer l scales what layer
        l + 1 sees). Newton's method from slopes 0 (Jacobian by forward-mode autodiff, steps by
        least squares) runs until the slopes move by less than `_SLOPE_TOL`, at most
        `_SLOPE_NEWTON_MAX` times: the first step is exact when the system is affine (the
        second confirms it), a coupled pair takes a few more.
        """
        k = idx.shape[0]

        def residual(lam):
            m = mask.at[idx].set(jnp.where(valid, lam, mask[idx]))
            return jnp.where(valid, self.zdot(p, m)[idx], 0.0)

        both = valid[:, None] & valid[None, :]
        eye = jnp.eye(k, dtype=mask.dtype)

        def newton(carry):
            lam, _, i = carry
            J, r = jax.jacfwd(lambda x: (residual(x), residual(x)), has_aux=True)(lam)
            # Least squares: when more surfaces slide than a unit has inputs (a unit collapsing
            # onto the origin) the slopes are not unique, the vector field still is.
            step = _lstsq(jnp.where(both, J, eye), r)
            return lam - step, jnp.max(jnp.abs(step)), i + 1

        def keep_going(carry):
            _, size, i = carry
            return (size > _SLOPE_TOL) & (i < _SLOPE_NEWTON_MAX)

        start = (jnp.zeros(k, mask.dtype), jnp.asarray(jnp.inf, mask.dtype), jnp.asarray(0))
        lam, _, _ = jax.lax.while_loop(keep_going, newton, start)
        lam = jnp.where(valid, lam, 0.0)
        return mask.at[idx].set(jnp.where(valid, lam, mask[idx])), lam


# Newton on the sliding slopes stops when they move by less than this (they live in [0, 1]).
_SLOPE_TOL = 1e-13
_SLOPE_NEWTON_MAX = 20


class _Bisection(optx.Bisection):
    """Bisection that stops on the interval width alone.

    The event function can sit at rounding level at both ends of a step (a surface touched
    tangentially); then there is no clean bracket and |f| never falls below a tolerance.
    Bisection with a fixed orientation (`flip=True`: the value goes down through zero) then
    converges to the end of the step where the sign change was detected, which is the right
    answer to rounding.
    """

    def terminate(self, fn, y, args, options, state, tags):
        del fn, args, options, tags
        scale = self.atol + self.rtol * jnp.abs(y)
        return jnp.abs(state.lower - state.upper) < scale, optx.RESULTS.successful


# Event times to ~ 4 ulp of t: well below the smooth pieces' tolerance.
_ROOT_FINDER = _Bisection(rtol=1e-15, atol=1e-15, flip=True)


def _vector_field(t, p, args):
    del t
    problem, mask, idx, valid, _, _ = args
    if idx.shape[0]:
        mask, _ = problem.sliding_mask(p, mask, idx, valid)
    return problem.field(p, mask)


def _event_value(t, y, args, **kwargs):
    value = _crossing_value(t, y, args)
    if args[2].shape[0]:
        value = jnp.minimum(value, _release_value(t, y, args))
    return value


def _crossing_value(t, y, args, **kwargs):
    """min_j s_j z_j + offset_j over entries off their surfaces: goes down through 0 at a hit."""
    del t, kwargs
    problem, mask, idx, valid, sign, offset = args
    z = problem.pre(y, mask)
    return jnp.min(jnp.where(sign == 0, jnp.inf, sign * z + offset))


def _release_value(t, y, args, **kwargs):
    """min over sliding entries of min(lambda, 1 - lambda): goes down through 0 at a release."""
    del t, kwargs
    problem, mask, idx, valid, _, _ = args
    _, lam = problem.sliding_mask(y, mask, idx, valid)
    return jnp.min(jnp.where(valid, jnp.minimum(lam, 1 - lam), jnp.inf))


@eqx.filter_jit
def _piece(problem, p, t0, t1, ts, mask, idx, valid, sign, offset, solver, controller, max_steps):
    args = (problem, mask, idx, valid, sign, offset)
    # One scalar condition (bisection needs one): both parts start positive, because sliding
    # entries with a slope already at 0 or 1 are released before a piece starts.
    event = dfx.Event(_event_value, root_finder=_ROOT_FINDER, direction=False)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_vector_field), solver, t0, t1, None, p, args=args,
        saveat=dfx.SaveAt(subs=[dfx.SubSaveAt(ts=ts), dfx.SubSaveAt(t1=True)]),
        stepsize_controller=controller, event=event, max_steps=max_steps, throw=False,
    )
    ys = sol.ys[0]
    t_end = sol.ts[1][-1]
    y_end = jax.tree.map(lambda x: x[-1], sol.ys[1])
    z = problem.pre(y_end, mask)
    lam = problem.sliding_mask(y_end, mask, idx, valid)[1] if idx.shape[0] else jnp.zeros(0)
    return (ys, t_end, y_end, sol.result._value, sol.stats["num_steps"],
            sol.stats["num_rejected_steps"], z, lam)


@eqx.filter_jit
def _lambdas(problem, p, mask, idx, valid):
    return problem.sliding_mask(p, mask, idx, valid)[1]


def _sliding_arrays(sliding):
    k = _bucket(len(sliding))
    idx = np.zeros(k, np.int64)
    valid = np.zeros(k, bool)
    idx[: len(sliding)] = sliding
    valid[: len(sliding)] = True
    return jnp.asarray(idx), jnp.asarray(valid)


@eqx.filter_jit
def _zdots(problem, p, mask, idx, valid):
    if idx.shape[0]:
        mask, _ = problem.sliding_mask(p, mask, idx, valid)
    return problem.zdot(p, mask)


def _bucket(k: int) -> int:
    return 0 if k == 0 else 1 << (k - 1).bit_length()


def kink_flow(model, loss, t0, t1, ts, solver, controller, max_steps, max_events, record=False):
    """Single-trajectory exact flow.

    Returns `(saved params at ts, stats dict, result code, pieces)`; `pieces` (with
    `record=True`, else empty) lists each smooth piece as a dict with its start/end times and
    states, the activation mask, the sliding entries, and what ended it.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    X = loss.X
    zs = model.forward(X)[1]
    problem = _Problem(static, loss, tuple(z.shape for z in zs))
    z = np.concatenate([np.asarray(v).ravel() for v in zs])
    dtype = z.dtype
    mask = (z > 0).astype(dtype)
    sign = np.where(z > 0, 1, -1).astype(dtype)
    offset = np.zeros_like(z)
    # Entries exactly at a kink at t0 (e.g. zero-initialised units) start as inactive.
    sliding: list[int] = []
    ts = np.asarray(ts, dtype)
    out = None
    filled = np.zeros(ts.shape[0], bool)
    t = float(t0)
    p = params
    stats = {"num_steps": 0, "num_rejected_steps": 0, "num_events": 0, "num_crossings": 0,
             "num_sliding_intervals": 0, "num_releases": 0}
    result = 0
    pieces = []
    while True:
        k = _bucket(len(sliding))
        idx = np.zeros(k, np.int64)
        valid = np.zeros(k, bool)
        idx[: len(sliding)] = sliding
        valid[: len(sliding)] = True
        ts_piece = np.maximum(ts, t)
        ys, t_end, y_end, res, n_steps, n_rej, z_end, lam = _piece(
            problem, p, jnp.asarray(t, dtype), jnp.asarray(t1, dtype), jnp.asarray(ts_piece),
            jnp.asarray(mask), jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(sign),
            jnp.asarray(offset), solver, controller, max_steps,
        )
        stats["num_steps"] += int(n_steps)
        stats["num_rejected_steps"] += int(n_rej)
        t_end = float(t_end)
        res = int(res)
        take = (ts >= t) & (ts <= t_end) & ~filled
        if out is None:
            out = jax.tree.map(lambda a: np.array(a), ys)
        else:
            def merge(o, a, take=take):
                return np.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, o)

            out = jax.tree.map(merge, out, jax.tree.map(np.asarray, ys))
        filled |= take
        if record:
            pieces.append({"t0": t, "t1": float(t_end), "p0": p, "p1": y_end, "mask": mask.copy(),
                           "sliding": list(sliding), "events": []})
        p = y_end
        t = t_end
        event = res == dfx.RESULTS.event_occurred._value
        if not event:
            result = res
            break
        if t >= t1:
            break
        stats["num_events"] += 1
        if stats["num_events"] > max_events:
            result = -1
            break
        z_end = np.asarray(z_end)
        lam = np.asarray(lam)
        zscale = max(float(np.max(np.abs(z_end))), np.finfo(dtype).tiny)
        delta = 1e-12 * zscale
        # Releases: a sliding entry whose lambda reached 0 or 1 leaves the surface.
        for pos, j in enumerate(list(sliding)):
            if lam[pos] <= 1e-10 or lam[pos] >= 1 - 1e-10:
                side = 1.0 if lam[pos] >= 0.5 else 0.0
                sliding.remove(j)
                mask[j] = side
                sign[j] = 1.0 if side else -1.0
                offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
                stats["num_releases"] += 1
                if record:
                    pieces[-1]["events"].append(("release", j))
        # Hits: entries whose event value reached zero.
        values = np.where(sign == 0, np.inf, sign * z_end + offset)
        hits = np.flatnonzero(values <= 1e-9 * zscale)
        for j in hits:
            mask_eff = mask.copy()
            idx2, valid2 = _sliding_arrays(sliding)
            both = []
            for side in (1.0, 0.0):
                mask_eff[j] = side
                zd = _zdots(problem, p, jnp.asarray(mask_eff), idx2, valid2)
                both.append(float(zd[j]))
            zd_plus, zd_minus = both
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
                sliding.append(int(j))
                sign[j] = 0.0
                offset[j] = 0.0
                stats["num_sliding_intervals"] += 1
                if record:
                    pieces[-1]["events"].append(("slide", int(j)))
            else:
                mask[j] = 0.0 if was_active else 1.0
                sign[j] = -sign[j]
                offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
                stats["num_crossings"] += 1
                if record:
                    pieces[-1]["events"].append(("cross", int(j)))
        # A sliding entry whose slope is already at 0 or 1 (a far side at rounding level) is
        # released before the next piece, so the release condition starts positive.
        while sliding:
            idx_s, valid_s = _sliding_arrays(sliding)
            lam_now = np.asarray(_lambdas(problem, p, jnp.asarray(mask), idx_s, valid_s))
            out_of_range = [pos for pos in range(len(sliding))
                            if not (1e-10 < lam_now[pos] < 1 - 1e-10)]
            if not out_of_range:
                break
            pos = out_of_range[0]
            j = sliding.pop(pos)
            side = 1.0 if lam_now[pos] >= 0.5 else 0.0
            mask[j] = side
            sign[j] = 1.0 if side else -1.0
            offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
            stats["num_releases"] += 1
            if record:
                pieces[-1]["events"].append(("release", int(j)))
    if not filled.all() and result == 0:
        result = -2
    stats["num_sliding_now"] = len(sliding)
    stats["t_reached"] = t
    return out, stats, result, pieces
