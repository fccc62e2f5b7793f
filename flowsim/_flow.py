"""Gradient flow d theta/dt = -grad L(theta), integrated by diffrax."""

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import invariants as inv
from ._cache import proven_solve_checks
from ._counting import close_counts, counting_field, open_counts
from ._divergence import divergence_probe, mark_divergence
from ._exact.solve import exact_flow
from ._exact.state import MAX_EVENTS, STOPPED_EARLY
from ._jit import Memo, bind, is_immutable_array
from ._members import batch_execution, loop_threads, map_members, members
from ._precision import lowest_precision, warn_tolerance_precision
from ._problem import check_finite_inputs, check_loss, check_model, split_batch
from ._programs import release_if_crowded
from ._results import RESULTS, from_codes, report_failures
from ._solvers import (
    SOLVERS,
    STAGES,
    auto_solver,
    controller_tolerances,
    default_controller,
    make_solver,
)
from ._trajectory import Trajectory
from .kinks import AbstractKinks, ExactKinks, SmoothKinks, resolve

DEFAULT_TOL = 1e-10
"""`rtol` and `atol` of `gradient_flow` when neither they nor a step controller are given."""

def _host(f, x):
    """`f(numpy, x)` on the host for a concrete array (no eager dispatch: a small solve costs
    ~0.2 ms), `f(jax.numpy, x)` for a traced one; a JAX array either way."""
    if isinstance(x, jax.core.Tracer):
        return f(jnp, x)
    x = np.asarray(x)
    return jnp.asarray(np.asarray(f(np, x), x.dtype))


def _n_params(params, batched: bool) -> int:
    leaves = jax.tree.leaves(params)
    return sum(math.prod(x.shape[1:] if batched else x.shape) for x in leaves)


def _flow_solve(params, static, loss, solver, controller, t0, t1, ts, dt0, max_steps, batched,
                token=None, progress=False, gap_drift=False):
    grad = eqx.filter_grad(lambda q: loss(eqx.combine(q, static)))

    def single(p, member):
        if token is None:
            field = lambda q: jax.tree.map(jnp.negative, grad(q))  # noqa: E731
        else:
            field = counting_field(grad, token, member)
        term = dfx.ODETerm(lambda t, q, args: field(q))
        # The arguments are checked on the host (`_check_times`, `_check_dt0`): diffrax's
        # traced checks of them would keep the program out of the compilation cache.
        with proven_solve_checks():
            sol = dfx.diffeqsolve(
                term, solver, t0, t1, dt0, p,
                saveat=dfx.SaveAt(subs=[
                    dfx.SubSaveAt(ts=ts),
                    dfx.SubSaveAt(t1=True, fn=lambda t, y, args: (t, y)),
                ]),
                stepsize_controller=controller,
                max_steps=max_steps,
                throw=False,
                progress_meter=dfx.TqdmProgressMeter() if progress else dfx.NoProgressMeter(),
            )
        saved, (t_reached, y_end) = sol.ys
        losses = jax.vmap(lambda q: loss(eqx.combine(q, static)))(saved)
        stats = {
            "num_steps": sol.stats["num_steps"],
            "num_accepted_steps": sol.stats["num_accepted_steps"],
            "num_rejected_steps": sol.stats["num_rejected_steps"],
            "t_reached": t_reached[-1],
            "max_steps": jnp.asarray(max_steps),
        }
        stages = STAGES.get(type(solver))
        if token is None and stages is not None:  # explicit: every stage one gradient
            stats["num_grad_evals"] = stages * sol.stats["num_steps"] + 1
        if gap_drift:  # in the same compiled call: one dispatch less per solve
            stats["layer_gap_drift"] = _layer_gap_drift(eqx.combine(saved, static), False)
        end = jax.tree.map(lambda y: y[-1], y_end)
        return saved, losses, RESULTS.promote(sol.result), stats, end

    if batched:
        batch = jax.tree.leaves(params)[0].shape[0]
        return jax.vmap(single)(params, jnp.arange(batch))
    return single(params, jnp.asarray(0))


def gradient_flow(
    model,
    loss,
    t1: float,
    *,
    t0: float = 0.0,
    ts: Sequence[float] | jax.Array | None = None,
    solver: dfx.AbstractSolver | str = "auto",
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
    dt0: float | None = None,
    batched: bool = False,
    throw: bool = True,
    kinks: AbstractKinks | str = "auto",
    count_evals: bool = False,
    progress: bool = False,
) -> Trajectory:
    """Integrates the gradient flow d theta/dt = -grad L(theta) of an Equinox model with diffrax.

    **Arguments:**

    - `model`: an Equinox model (batched: arrays with a leading batch axis, `flowsim.init.batch`).
    - `loss`: a callable `model -> scalar`, e.g. from `flowsim.losses`.
    - `t1`, `t0`: final and initial time. `ts`: save times in [t0, t1], default `(t0, t1)`.
    - `solver`: a diffrax solver, or a name in `flowsim._solvers.SOLVERS`: `"tsit5"`, `"dopri5"`,
      `"dopri8"`, `"bosh3"`, `"kvaerno3/4/5"` (dense Jacobian up to `DENSE_JACOBIAN_MAX`
      parameters, Newton-GMRES above), `"rodas5p"` (`flowsim.Rodas5P`), `"ros34pw2"`,
      `"rkc2"` (`flowsim.RKC2`), or `"auto"`: Tsit5, or Rodas5P / RKC2 (by size) when
      sharpness(theta_0) x (t1 - t0) exceeds `STIFFNESS_THRESHOLD`.
    - `stepsize_controller`: a diffrax step controller; default a PID controller on `rtol` and
      `atol` (PI coefficients and steps clipped onto `ts` for implicit solvers).
    - `rtol`, `atol`: tolerances of the default controller (1e-10 each; not with a controller
      of your own). Below 100 x the model's machine epsilon a `flowsim.PrecisionWarning` says
      what accuracy to expect.
    - `max_steps`: the most steps (per piece on the exact path); `dt0`: a smooth solve's first
      step.
    - `batched`: a batch of initialisations in one compiled call (vmap). `throw`: raise
      `flowsim.FlowFailed` if a trajectory fails; else a `flowsim.FlowWarning` and
      `Trajectory.result` mark it, the others are kept.
    - `kinks`: how ReLU kinks are integrated: `flowsim.ExactKinks(...)` (`"exact"`: events and
      Filippov sliding, docs/kinks.md), `flowsim.SmoothKinks()` (`"smooth"`), or
      `flowsim.AutoKinks()` (`"auto"`): exact where supported, with at most
      `EXACT_KINKS_MAX_SURFACES` pre-activation surfaces; else smooth with a `KinksWarning`.
    - `count_evals`: count every gradient and Hessian-vector product (smooth path; a host
      callback per evaluation): `stats["num_grad_evals"]`, `stats["num_hvp_evals"]`.
    - `progress`: a tqdm progress bar over flow time (and events) on stderr.

    **Returns:** a `flowsim.Trajectory`: `ts`, `models`, `loss`, `result` (a `flowsim.RESULTS`
    item per trajectory) and `stats`: steps, `t_reached`, `num_grad_evals` for explicit solvers,
    events on the exact path, and for homogeneous networks `layer_gap_drift` (the largest change
    of a layer gap over the saved times relative to the largest squared norm: a check, not an
    error estimate, for which see `flowsim.estimate_error`).

    **Raises:** `ValueError` for bad arguments (NaN or inf data among them); `FlowFailed`.

    **Example:**

    ```python
    import jax.numpy as jnp, jax.random as jr, flowsim
    M = jnp.diag(jnp.array([3.0, 1.0]))
    mf = flowsim.models.MatrixFactorization.random(2, 2, 2, scale=0.1, key=jr.key(0))
    traj = flowsim.gradient_flow(mf, flowsim.losses.factorization(M), 10.0)
    assert float(traj.loss[-1]) < 1e-12
    ```
    """
    t0, t1, ts_arr = _check_times(t0, t1, ts, max_steps)
    _check_dt0(dt0)
    rtol, atol = _tolerances(stepsize_controller, rtol, atol)
    plan = _prepare(model, loss, t0, t1, ts_arr, solver, stepsize_controller, rtol, atol,
                    max_steps, dt0, batched, kinks, count_evals)
    params, static, batch, solver, controller, strategy, gap_drift, ts_j, t0_j, t1_j = plan[:10]
    probe = events = None
    if strategy is not None:
        saved, losses, result, stats, events = _kink_solve(
            params, static, loss, solver, controller, t0, t1, ts_arr, max_steps,
            batch if batched else None, progress, strategy)
    else:
        saved, losses, result, stats, probe = _smooth_solve(
            params, static, loss, solver, controller, t0_j, t1_j, ts_j, dt0, max_steps,
            batch if batched else None, count_evals, progress, gap_drift, plan.bound,
            plan.loop_members)
    if "max_steps" not in stats:
        stats["max_steps"] = _host(lambda xp, r: xp.full_like(r, max_steps), result._value)
    if gap_drift and "layer_gap_drift" not in stats:
        stats["layer_gap_drift"] = _layer_gap_drift(eqx.combine(saved, static), batched)
    result, details = mark_divergence(result, losses, ts_j, stats["t_reached"], probe)
    ts_j = plan.ts_device
    traj = Trajectory(
        ts=jnp.broadcast_to(ts_j, (batch, ts_j.shape[0])) if batched else ts_j,
        models=eqx.combine(saved, static), loss=losses, result=result, stats=stats,
        batched=batched, solver=type(solver).__name__, events=events,
        kinks=plan.kinks,
    )
    release_if_crowded()
    if not isinstance(result._value, jax.core.Tracer):
        report_failures(result, stats["t_reached"], throw, max_steps, details, t0)
    return traj


class _Plan(NamedTuple):
    """What a call of `gradient_flow` settles before it solves: checked inputs, the solver,
    the controller, the kink strategy, and the smooth solve's compiled call (`bound`: filled
    by the first solve)."""

    params: Any
    static: Any
    batch: int | None
    solver: dfx.AbstractSolver
    controller: dfx.AbstractStepSizeController
    strategy: ExactKinks | None
    gap_drift: bool
    ts: np.ndarray
    t0: np.ndarray
    t1: np.ndarray
    ts_device: jax.Array
    kinks: str | None
    low_precision: bool
    loop_members: bool
    bound: dict


_plans = Memo(maxsize=64)
"""Plans of calls still alive, by the identity of (model, loss) and the value of every other
argument: a solve called again on the same immutable inputs (a benchmark's repeats, a tolerance
ladder) skips its checks and choices (~0.1 ms, a 2 x 2 factorization's whole solve)."""


def _prepare(model, loss, t0, t1, ts_arr, solver, controller, rtol, atol, max_steps, dt0,
             batched, kinks, count_evals) -> _Plan:
    """The `_Plan` of a call, remembered where model and loss are immutable."""
    objs = (model, loss)
    try:
        extra = (t0, t1, tuple(ts_arr.tolist()), solver, controller, rtol, atol, max_steps, dt0,
                 batched, kinks, count_evals)
        hash(extra)
    except TypeError:  # e.g. a controller holding NumPy arrays: not remembered
        extra = None
    memo = extra is not None and all(isinstance(x, eqx.Module) for x in objs) and \
        all(is_immutable_array(x) for x in jax.tree.leaves(objs) if eqx.is_array(x))
    plan = _plans.get(objs, extra) if memo else None
    if plan is not None:
        if plan.low_precision:
            warn_tolerance_precision(plan.params, rtol, atol)
        return plan
    params, static, batch, single = _split(model, loss, batched)
    warn_tolerance_precision(params, rtol, atol)
    dtype, n_params = np.dtype(jax.tree.leaves(params)[0].dtype), _n_params(params, batched)
    solver = _solver(solver, model, loss, t0, t1, n_params, batched, np.asarray(atol, dtype))
    ts_j, t0_j, t1_j = (np.asarray(x, dtype) for x in (ts_arr, t0, t1))
    controller = controller or default_controller(solver, rtol, atol, ts_j)
    strategy = _strategy(kinks, single, loss, count_evals, dt0)
    label = "exact" if strategy is not None else ("smooth" if _has_kinks(model) else None)
    loop = batched and label == "smooth" and batch_execution(
        kinks.batch if isinstance(kinks, SmoothKinks) else "auto") == "loop"
    plan = _Plan(params, static, batch, solver, controller, strategy, _conserves_gaps(single),
                 ts_j, t0_j, t1_j, jnp.asarray(ts_j), label,
                 lowest_precision(params).itemsize <= 4, loop, {})
    if memo and label != "smooth":  # AutoKinks's smooth choice warns every call
        _plans.put(objs, plan, extra)
    return plan


def _split(model, loss, batched):
    """`(params, static, batch size or None, one member)`, after checking the model and loss."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = check_model(params, batched)
    check_finite_inputs(params, loss, batched)
    single = split_batch(params, static, batched)
    check_loss(loss, single)
    return params, static, batch, single


def _conserves_gaps(model) -> bool:
    """Whether the flow conserves the model's layer gaps (a homogeneous network)."""
    from .models import AbstractModel

    return isinstance(model, AbstractModel) and model.is_homogeneous and bool(model.activations)


def _solver(solver, model, loss, t0, t1, n_params, batched, atol):
    """The diffrax solver for `solver` (an instance, or a name; "auto" by the sharpness rule)."""
    if isinstance(solver, str):
        name = auto_solver(model, loss, t0, t1, n_params, batched)[0] if solver == "auto" \
            else solver
        return make_solver(name, n_params, atol)
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver or a name in {SOLVERS}, got {solver!r}")
    return solver


def _check_dt0(dt0):
    """A ValueError unless `dt0` is None or a positive finite step."""
    if dt0 is None:
        return
    try:
        step = float(dt0)
    except (TypeError, ValueError):
        step = math.nan
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"`dt0` must be a positive finite first step, got {dt0!r}; pass one "
                         f"or leave it None (the step-size controller picks it)")


def _check_times(t0, t1, ts, max_steps):
    """`(t0, t1, ts)` as floats and a float64 array, or a ValueError naming the bad one (of
    them and `max_steps`)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer, got {max_steps!r}")
    t0, t1 = float(t0), float(t1)
    if not math.isfinite(t0):
        raise ValueError(f"`t0` must be finite, got {t0}; pass a finite start time (default 0.0)")
    if not (math.isfinite(t1) and t1 > t0):
        raise ValueError(f"`t1` must be finite and greater than t0={t0}, got {t1}")
    if ts is None:
        return t0, t1, np.array([t0, t1])
    ts_arr = np.asarray(ts, dtype=np.float64)
    if ts_arr.ndim != 1 or ts_arr.size == 0:
        raise ValueError(f"`ts` must be a non-empty 1-d sequence of times, got shape "
                         f"{ts_arr.shape}")
    if not np.all(np.isfinite(ts_arr)):
        k = int(np.flatnonzero(~np.isfinite(ts_arr))[0])
        raise ValueError(f"`ts` must hold finite times, got {ts_arr[k]} at index {k}; pass save "
                         f"times in [t0, t1] = [{t0}, {t1}]")
    if np.any(np.diff(ts_arr) < 0) or ts_arr[0] < t0 or ts_arr[-1] > t1:
        raise ValueError(f"`ts` must be non-decreasing and within [t0, t1] = [{t0}, {t1}]")
    return t0, t1, ts_arr


def _tolerances(controller, rtol, atol):
    """`(rtol, atol)`: the given ones (default `DEFAULT_TOL`), or the controller's own;
    checked."""
    if controller is not None:
        if not isinstance(controller, dfx.AbstractStepSizeController):
            raise TypeError(f"`stepsize_controller` must be a diffrax step-size controller, got "
                            f"{controller!r}")
        if rtol is not None or atol is not None:
            raise ValueError("pass the tolerances either as rtol / atol or inside "
                             "`stepsize_controller`, not both")
        tols = controller_tolerances(controller)
        if tols is None:  # e.g. a constant step: no tolerances to check
            return DEFAULT_TOL, DEFAULT_TOL
        rtol, atol = (float(np.asarray(x)) for x in tols)
    rtol = DEFAULT_TOL if rtol is None else rtol
    atol = DEFAULT_TOL if atol is None else atol
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tol, int | float) and tol > 0 and math.isfinite(tol)):
            raise ValueError(f"`{name}` must be a positive float, got {tol!r}")
    return rtol, atol


def _strategy(kinks, single, loss, count_evals, dt0):
    """The `ExactKinks` to run, or None for a smooth solve; ValueError for options that the
    chosen path does not take."""
    if not isinstance(count_evals, bool):
        raise TypeError(f"`count_evals` must be True or False, got {count_evals!r}")
    strategy = resolve(kinks, single, loss)
    if strategy is None:
        return None
    for name, given in (("count_evals", count_evals), ("dt0", dt0 is not None)):
        if given:
            raise ValueError(
                f"`{name}` is for smooth solves, but this one takes the exact-kink path "
                f"(kinks='exact', or 'auto' on a small ReLU problem); pass kinks='smooth' or "
                f"drop `{name}`")
    return strategy


def _smooth_solve(params, static, loss, solver, controller, t0, t1, ts, dt0, max_steps, batch,
                  count_evals, progress, gap_drift, bound, loop_members=False):
    """One diffrax solve (vmapped over `batch` members, or with `loop_members` the single
    solve over them on threads: `flowsim._members`); `probe` is what tells a diverged flow
    from a failed solve, computed only when one failed. `bound`: compiled calls by `progress`
    (arguments flattened once per plan)."""
    token = open_counts(1 if batch is None else batch) if count_evals else None
    dt0 = None if dt0 is None else np.asarray(dt0, ts.dtype)
    try:
        call = bound.get(bool(progress)) if token is None else None
        if call is None and loop_members and token is None and not progress and \
                not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
            # Not kept in `bound`: the members' slices are copies of the batch.
            call = functools.partial(map_members, lambda f: f(), [  # flattened here, run there
                bind(_flow_solve, p, static, loss, solver, controller, t0, t1, ts, dt0,
                     max_steps, False, None, False, gap_drift) for p in members(params, batch)],
                loop_threads(batch))
        elif call is None:
            call = bind(
                _flow_solve, params, static, loss, solver, controller, t0, t1, ts, dt0,
                max_steps, batch is not None,
                None if token is None else np.asarray(token, np.int32), bool(progress),
                gap_drift)
            if token is None:
                bound[bool(progress)] = call
        saved, losses, result, stats, y_end = call()
        jax.block_until_ready((saved, stats))
    finally:
        counts = None if token is None else close_counts(token)
    if counts is not None:
        shape = jnp.shape(result._value)
        stats = dict(stats, **{f"num_{kind}_evals": jnp.asarray(n.reshape(shape))
                               for kind, n in counts.items()})
    probe = None
    if not isinstance(result._value, jax.core.Tracer) and \
            np.any(np.asarray(result._value) != 0):
        probe = divergence_probe(params, y_end, static, loss, t0, t1, batch is not None)
    return saved, losses, result, stats, probe


@eqx.filter_jit
def _layer_gap_drift(models, batched: bool):
    """max over saved times and layers of |gap_t - gap_0| / max ||W||^2, per trajectory.

    A check of a solve: the flow of a homogeneous network conserves every layer gap, so this is
    the integration error seen through the invariants. It sees only the part of the error
    that changes the gaps; `error_estimate=True` estimates the whole.
    """
    gaps = inv.layer_gaps(models)  # (*batch, time, layers - 1)
    norms = inv.layer_norms(models)
    moved = jnp.max(jnp.abs(gaps - gaps[..., :1, :]), axis=(-2, -1))
    return moved / jnp.max(norms, axis=(-2, -1))


def _has_kinks(model) -> bool:
    from .models import AbstractModel

    return isinstance(model, AbstractModel) and model.has_kinks


def _kink_solve(params, static, loss, solver, controller, t0, t1, ts, max_steps, batch,
                progress, strategy):
    """The exact path: one compiled event loop, vmapped over the batch (`flowsim._exact`)."""
    saved, stats, code, events = exact_flow(
        params, static, loss, t0, t1, ts, solver, controller, max_steps, strategy.max_events,
        batch is not None, progress=progress, checkpoint=strategy.checkpoint,
        capacity=strategy.capacity, execution=strategy.batch)
    code = jnp.where(code == MAX_EVENTS, RESULTS.max_events_reached._value,
                     jnp.where(code == STOPPED_EARLY, RESULTS.stopped_early._value, code))
    result = from_codes(code)
    losses = jax.vmap(lambda q: loss(eqx.combine(q, static)))
    loss_vals = losses(saved) if batch is None else jax.vmap(losses)(saved)
    return saved, loss_vals, result, stats, events


