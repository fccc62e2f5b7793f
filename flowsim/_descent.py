"""Gradient descent through optax, the whole loop one jit-compiled `lax.scan`."""

import math
import warnings
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import schedules
from ._precision import lowest_precision
from ._problem import (
    available_memory_bytes,
    check_finite_inputs,
    check_loss,
    check_model,
    device_memory_bytes,
    format_bytes,
    split_batch,
)
from ._programs import release_if_crowded
from ._results import RESULTS, from_codes
from ._trajectory import Trajectory

MAX_STEPS = 2**31 - 1
"""The most steps one `gradient_descent` call takes: the step counters are int32."""

PER_STEP_BYTES = 24
"""Bytes each step costs whatever `save_every`: the step indices, learning rates and flow
times, 8 bytes each (`Trajectory.learning_rates` keeps the rates)."""


class DivergenceWarning(RuntimeWarning):
    """A gradient-descent trajectory produced a non-finite loss or iterate."""


def _as_schedule(learning_rate):
    if callable(learning_rate):
        eta = np.asarray(learning_rate(0))
        if eta.shape != () or not np.isfinite(eta) or eta <= 0:
            raise ValueError(
                f"`learning_rate` schedule must give a positive finite scalar at step 0, got {eta}"
            )
        return learning_rate
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float | np.floating):
        raise TypeError(
            f"`learning_rate` must be a positive float or an optax schedule, got {learning_rate!r}"
        )
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`learning_rate` must be positive and finite, got {learning_rate}")
    return schedules.constant(float(learning_rate))


def _all_finite(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _cast_schedule(schedule, dtype, k):
    return jnp.asarray(schedule(k), dtype)


def _unit_increments(grads, eta):
    return tuple(eta**2 * (jnp.sum(gi**2, -1) - jnp.sum(go**2, -1))
                 for gi, go in grads.hidden_units())


def _single(params, static, loss, schedule, steps: int, save_every: int, with_ledger: bool,
            dtype):
    # The step size in the parameters' precision: a float64 schedule must not promote a float32
    # model's updates (or its ledger) out of the scan carry's dtype.
    schedule = partial(_cast_schedule, schedule, dtype)
    tx = optax.sgd(schedule)

    def value_and_grad(p):
        return eqx.filter_value_and_grad(lambda q: loss(eqx.combine(q, static)))(p)

    def step(carry, k):
        p, opt_state, ledger, bound, div = carry
        alive = div < 0
        value, g = value_and_grad(p)
        updates, new_opt_state = tx.update(g, opt_state, p)
        new_p = optax.apply_updates(p, updates)
        loss_ok = jnp.isfinite(value)
        iter_ok = _all_finite(new_p)
        div = jnp.where(alive & ~loss_ok, k, div)
        div = jnp.where(alive & loss_ok & ~iter_ok, k + 1, div)
        keep = div < 0
        p = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_p, p)
        opt_state = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_opt_state, opt_state)
        eta = schedule(k)
        g_sq = sum(jnp.sum(x**2) for x in jax.tree.leaves(g))
        bound = bound + jnp.where(keep, eta**2 * g_sq, 0.0).astype(bound.dtype)
        if with_ledger:
            inc = _unit_increments(eqx.combine(g, static), eta)
            ledger = jax.tree.map(lambda c, d: c + jnp.where(keep, d, 0.0).astype(c.dtype),
                                  ledger, inc)
        value = jnp.where(alive & loss_ok, value, jnp.nan)
        return (p, opt_state, ledger, bound, div), value

    def chunk(carry, j):
        saved = (carry[0], carry[2], carry[3])
        ks = j * save_every + jnp.arange(save_every, dtype=jnp.int32)
        carry, values = jax.lax.scan(step, carry, ks)
        return carry, (saved, values[0])

    if with_ledger:
        units = eqx.combine(params, static).hidden_units()
        ledger = tuple(jnp.zeros(i.shape[:-1], i.dtype) for i, _ in units)
    else:
        ledger = ()
    carry = (params, tx.init(params), ledger, jnp.zeros((), dtype), jnp.asarray(-1, jnp.int32))
    carry, ((saved_p, saved_ledger, saved_bound), saved_loss) = jax.lax.scan(
        chunk, carry, jnp.arange(steps // save_every, dtype=jnp.int32)
    )
    p, _, ledger, bound, div = carry
    final_loss = loss(eqx.combine(p, static))
    final_loss = jnp.where((div < 0) & jnp.isfinite(final_loss), final_loss, jnp.nan)
    div = jnp.where((div < 0) & ~jnp.isfinite(final_loss), steps, div)

    def append(stack, last):
        return jnp.concatenate([stack, last[None]], axis=0)

    saved_p = jax.tree.map(append, saved_p, p)
    saved_ledger = jax.tree.map(append, saved_ledger, ledger)
    return saved_p, append(saved_loss, final_loss), saved_ledger, append(saved_bound, bound), div


@eqx.filter_jit
def _schedule_values(schedule, steps):
    return jax.vmap(schedule)(jnp.arange(steps))


def _check_schedule(schedule, steps: int) -> None:
    """ValueError at the first step k < steps whose eta_k is not positive and finite."""
    etas = _schedule_values(schedule, steps)
    if isinstance(etas, jax.core.Tracer):
        return
    etas = np.asarray(etas)
    bad = ~(np.isfinite(etas) & (etas > 0))
    if not bad.any():
        return
    k = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"`learning_rate` schedule must give a positive finite step size at every step "
        f"0..{steps - 1}, got eta_k = {etas[k]} at step k = {k} (first of {int(bad.sum())}); "
        f"make the schedule positive over all `steps` (e.g. clip it) or run fewer steps"
    )


def _check_memory(params, steps: int, save_every: int, batch: int | None,
                  with_ledger: bool) -> None:
    """ValueError when the run's arrays would not fit in the memory available."""
    lanes = 1 if batch is None else batch
    shapes = [(x.shape[1:] if batch is not None else x.shape, x.dtype.itemsize)
              for x in jax.tree.leaves(params)]
    per_save = sum(math.prod(shape) * size for shape, size in shapes) + 8  # iterate + loss
    if with_ledger:  # one gap per hidden unit: at most one per row of a parameter array
        per_save += sum(shape[0] if shape else 1 for shape, _ in shapes) * 8
    saves = steps // save_every + 1
    per_step = PER_STEP_BYTES * steps
    saved = saves * per_save * lanes
    need = per_step + saved
    limits = [available_memory_bytes()]
    device = device_memory_bytes()
    if device is not None:
        limits.append(device)
    have = min(limits)
    if need <= have:
        if steps > MAX_STEPS:
            raise ValueError(
                f"`steps` must be at most {MAX_STEPS} (2**31 - 1, the int32 step counter), got "
                f"{steps}; split the run into several calls, each continuing from "
                f"traj.final_model()"
            )
        return
    fix = (f"run fewer steps (the per-step arrays alone take {format_bytes(per_step)}), "
           f"e.g. in several calls each continuing from traj.final_model()"
           if per_step > have / 2 else
           f"save fewer iterates (a larger `save_every`, now {save_every}) or run fewer steps")
    raise ValueError(
        f"`steps`={steps} with save_every={save_every} needs ~{format_bytes(need)} "
        f"({format_bytes(per_step)} of per-step learning rates and times, "
        f"{format_bytes(saved)} for {saves} saved iterates) but {format_bytes(have)} of memory "
        f"is available; {fix}"
    )


@eqx.filter_jit
def _gd_solve(params, static, loss, schedule, steps, save_every, batched, with_ledger, dtype):
    run = partial(_single, static=static, loss=loss, schedule=schedule, steps=steps,
                  save_every=save_every, with_ledger=with_ledger, dtype=dtype)
    if batched:
        run = jax.vmap(run)
    saved_p, saved_loss, ledger, bound, div = run(params)
    etas = jax.vmap(schedule)(jnp.arange(steps))
    etas = jnp.asarray(etas, saved_loss.dtype)
    t_all = jnp.concatenate([jnp.zeros((1,), etas.dtype), jnp.cumsum(etas)])
    save_steps = jnp.arange(0, steps + 1, save_every)
    return saved_p, saved_loss, ledger, bound, div, etas, t_all[save_steps], save_steps


def gradient_descent(
    model,
    loss,
    steps: int,
    *,
    learning_rate,
    save_every: int = 1,
    batched: bool = False,
    throw: bool = False,
) -> Trajectory:
    """Gradient descent theta_{k+1} = theta_k - eta_k grad L(theta_k), as one compiled `lax.scan`.

    The update is `optax.sgd(schedule)`; iterate k is saved with its flow time
    t_k = sum_{i<k} eta_i so that it can be compared with the gradient flow at the same time.

    **Arguments:**

    - `model`: an Equinox model (e.g. from `flowsim.models`). With `batched=True`, a model whose
      arrays carry a leading batch axis (see `flowsim.init.batch`).
    - `loss`: a callable `model -> scalar`, e.g. from `flowsim.losses`.
    - `steps`: number of GD steps K; iterates 0, s, 2s, ..., K are saved (s = `save_every`).
    - `learning_rate`: a positive float (constant step) or an optax schedule `k -> eta_k`, e.g.
      `flowsim.schedules.power_decay(eta0, delta)`; the schedule must be positive and finite at
      every step k = 0..steps-1 (checked before the descent runs). The steps are taken in the
      model's precision (a float32 model: float32 step sizes and updates).
    - `save_every`: save every s-th iterate; must divide `steps`. The run keeps 24 bytes per
      step (`learning_rates`, flow times) plus every saved iterate; a run that would not fit in
      the memory available is refused.
    - `batched`: run a batch of initialisations in one compiled call (vmap).
    - `throw`: raise `FloatingPointError` if a trajectory diverges; by default a
      `DivergenceWarning` names the trajectories and steps and the results are returned.

    **Returns:** a `flowsim.Trajectory` with `ts`, `models`, `loss`, `steps`, `result`
    (`flowsim.RESULTS.successful` or `.diverged`), `ledger` (the GD drift ledger, see
    `flowsim.invariants.gd_drift_ledger`), `learning_rates`, `stats["diverged_at"]` (the first
    step whose loss or iterate is not finite, or -1) and `stats["ledger_bound"]`:
    sum_{i<k} eta_i^2 ||grad L(theta_i)||^2 at each saved k, the bound on how far any balance
    gap (a unit's, a layer's, the Gram gap in Frobenius norm) has drifted by step k.

    **Raises:** `ValueError` for bad arguments: NaN or inf in the initial model or the loss's
    data arrays (checked where they are concrete, not under tracing), a schedule not positive
    and finite at some step (naming the first), `steps` above 2**31 - 1 or a run needing more
    memory than is available (naming both); `FloatingPointError` on divergence with
    `throw=True`.

    **Example:**

    ```python
    import jax.random as jr
    import flowsim
    kx, kw = jr.split(jr.key(0))
    X = jr.normal(kx, (32, 4)); Y = X[:, :2]
    net = flowsim.models.MLP((4, 8, 2), "relu", key=kw)
    traj = flowsim.gradient_descent(net, flowsim.losses.square(X, Y), 500, learning_rate=0.1)
    assert traj.loss[-1] < traj.loss[0]
    ```
    """
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer, got {steps!r}")
    if isinstance(save_every, bool) or not isinstance(save_every, int | np.integer) \
            or save_every < 1 or steps % save_every:
        raise ValueError(
            f"`save_every` must be a positive integer dividing steps={steps}, got {save_every!r}"
        )
    schedule = _as_schedule(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = check_model(params, batched)
    check_finite_inputs(params, loss, batched)
    check_loss(loss, split_batch(params, static, batched))
    with_ledger = hasattr(model, "hidden_units")
    _check_memory(params, int(steps), int(save_every), batch, with_ledger)
    _check_schedule(schedule, int(steps))
    saved_p, saved_loss, ledger, bound, div, etas, ts, save_steps = _gd_solve(
        params, static, loss, schedule, int(steps), int(save_every), batched, with_ledger,
        lowest_precision(params),
    )
    if batched:
        ts = jnp.broadcast_to(ts, (batch, ts.shape[0]))
    traj = Trajectory(
        ts=ts,
        models=eqx.combine(saved_p, static),
        loss=saved_loss,
        steps=save_steps,
        result=from_codes(jnp.where(div >= 0, RESULTS.diverged._value, RESULTS.successful._value)),
        ledger=ledger if with_ledger else None,
        learning_rates=etas,
        stats={"diverged_at": div, "ledger_bound": bound},
        batched=batched,
    )
    release_if_crowded()
    _report_divergence(div, throw)
    return traj


def _report_divergence(div, throw: bool) -> None:
    if isinstance(div, jax.core.Tracer):
        return
    div = np.atleast_1d(np.asarray(div))
    bad = np.flatnonzero(div >= 0)
    if bad.size == 0:
        return
    shown = ", ".join(f"trajectory {i} at step {div[i]}" for i in bad[:5])
    more = f" and {bad.size - 5} more" if bad.size > 5 else ""
    msg = (
        f"gradient descent diverged (non-finite loss or iterate): {shown}{more}; the saved states "
        f"after that hold the last finite iterate with loss NaN. Lower the learning rate."
    )
    if throw:
        raise FloatingPointError(msg)
    warnings.warn(msg, DivergenceWarning, stacklevel=3)
