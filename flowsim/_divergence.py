"""Telling a diverged flow from a failed solve: a smooth solve that stopped early diverged when
its state or loss is not finite where it stopped, or its loss fell without bound."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._results import RESULTS, codes, from_codes

DIVERGENCE_LOSS_DROP = 1e6
"""A failed smooth solve is diverged (`RESULTS.diverged`) when at the time it reached its state
or loss is not finite, or its loss fell below L(theta_0) by more than this times
S = |L(theta_0)| + ||g_0|| ||theta_0|| + ||g_0||^2 (t1 - t0) (g_0 the initial gradient).

The loss of a gradient flow only decreases and bounds its path length, so only a loss falling
without bound can blow up in finite time; losses >= 0 fall by at most S. Measured: dtheta/dt =
theta^3 from theta_0 = 1 stalls at t = 0.5 - 1e-14 with L ~ -6e25 against S = 2.25.
"""


@eqx.filter_jit
def divergence_probe(p0, p_end, static, loss, t0, t1, batched):
    """What `DIVERGENCE_LOSS_DROP`'s test needs: the state's finiteness and the loss at the end
    (the time reached), L(theta_0) and the scale S. Evaluated only after a failed solve."""
    if batched:
        return jax.vmap(lambda a, b: _divergence_probe_one(a, b, static, loss, t0, t1))(p0, p_end)
    return _divergence_probe_one(p0, p_end, static, loss, t0, t1)


def _divergence_probe_one(p0, p_end, static, loss, t0, t1):
    value = lambda q: loss(eqx.combine(q, static))  # noqa: E731
    loss0, g0 = eqx.filter_value_and_grad(value)(p0)
    loss_end = value(p_end)

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))

    dtype = loss0.dtype
    g_norm = norm(g0).astype(dtype)
    scale = jnp.abs(loss0) + g_norm * norm(p0).astype(dtype) + g_norm**2 * (t1 - t0).astype(dtype)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p_end)]))
    return {"finite": finite & jnp.isfinite(loss_end), "loss_end": loss_end, "loss0": loss0,
            "scale": scale}


def mark_divergence(result, losses, ts, t_reached, probe):
    """`result` (a `RESULTS` item) with `RESULTS.diverged` where the flow diverged
    (`DIVERGENCE_LOSS_DROP`), and for those trajectories the reason, {index: text}. Traced
    results (under jit / vmap) are left as they are."""
    if any(isinstance(x, jax.core.Tracer) for x in (result._value, losses, t_reached)):
        return result, {}
    code = np.atleast_1d(codes(result))
    loss = np.asarray(losses).reshape(code.shape[0], -1)
    if probe is None and not code.any() and np.isfinite(loss).all():  # the common case
        return result, {}
    reached = np.asarray(ts).reshape(1, -1) <= np.atleast_1d(np.asarray(t_reached))[:, None]
    bad_saved = np.any(reached & ~np.isfinite(loss), axis=1)
    diverged = bad_saved.copy()
    reasons = {int(i): "non-finite state or loss" for i in np.flatnonzero(bad_saved)}
    if probe is not None:
        finite = np.atleast_1d(np.asarray(probe["finite"]))
        loss_end = np.atleast_1d(np.asarray(probe["loss_end"]))
        loss0 = np.atleast_1d(np.asarray(probe["loss0"]))
        scale = np.atleast_1d(np.asarray(probe["scale"]))
        failed = code != 0
        with np.errstate(invalid="ignore", over="ignore"):
            fell = (loss0 - loss_end) > DIVERGENCE_LOSS_DROP * scale
        for i in np.flatnonzero(failed & ~finite):
            reasons.setdefault(int(i), "non-finite state or loss")
        for i in np.flatnonzero(failed & finite & fell):
            reasons[int(i)] = (f"loss fell from {loss0[i]:.6g} to {loss_end[i]:.6g}, without "
                               f"bound")
        diverged |= failed & (~finite | fell)
    if not diverged.any():
        return result, {}
    new = np.where(diverged, RESULTS.diverged._value, code)
    return from_codes(new.reshape(np.shape(result._value))), reasons
