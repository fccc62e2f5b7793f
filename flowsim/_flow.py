"""Gradient flow d theta/dt = -grad L(theta), integrated by diffrax."""

import itertools
import math
import os
import pathlib
import threading
import warnings
from collections.abc import Sequence

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

from . import invariants as inv
from ._chebyshev import RKC2
from ._exact.solve import exact_flow
from ._kinks import supports_kinks
from ._precision import PrecisionWarning, warn_tolerance_precision
from ._problem import (
    check_finite_inputs,
    check_loss,
    check_model,
    split_batch,
)
from ._rosenbrock import ROS34PW2, Rodas5P
from ._spectral import sharpness
from ._trajectory import Trajectory
from .kinks import ExactKinks, SmoothKinks, warn_auto_smooth

DENSE_JACOBIAN_MAX = 2000
"""Largest parameter count for which stiff solvers build the dense Jacobian (Rodas5P: its
symmetric half and a Cholesky factorization; Kvaerno: LU), and `solver="auto"` picks Rodas5P
for a stiff problem; above it RKC2 (Kvaerno matrix-free when named).

Above it the stage equations are solved matrix-free: Newton's method with GMRES on
Hessian-vector products. A dense n x n float64 Jacobian costs n JVPs and 8 n^2 bytes per step.
"""

STIFFNESS_THRESHOLD = 1e4
"""`solver="auto"` picks a stiff solver when lambda_max(H(theta_0)) * (t1 - t0) exceeds this.

An explicit method needs ~lambda_max (t1 - t0) / 3.3 steps for stability alone (Tsit5's
interval on the negative real axis is ~[-3.3, 0]): below 1e4 that is comparable to what accuracy
needs anyway. Above it: Rodas5P up to `DENSE_JACOBIAN_MAX` parameters, RKC2 beyond (at 52k
parameters 0.08-0.10x Kvaerno5 matrix-free's time at errors 1e-4 to 3e-6,
benchmarks/stiff_matrix_free.py). Stiff factorization: Rodas5P 150 steps, Tsit5 > 100,000.
"""

SHARPNESS_RTOL = 0.05
"""`solver="auto"`'s sharpness estimate stops once two successive power iterations agree to
this (relative): the choice needs the order of magnitude of lambda_max (t1 - t0), not digits.
On the deep linear MLPs of `benchmarks/overhead.py` (w = 32, 128) it stops after 5-6 of the
50 Hessian-vector products, at 0.83 of the 50-iteration estimate."""

GMRES_RTOL = 1e-4
"""Relative residual at which GMRES stops inside each Newton iteration (matrix-free path).

Its absolute tolerance is 1e-2 x the step controller's `atol`; with atol 0 the inexact stage
solves polluted the error estimate (a tanh MLP 60-30-30-5 at tol 1e-8 stalled at tiny steps).
Measured on that MLP: Kvaerno5 takes 59 steps and 17,804 Hessian-vector products at 1e-4 and at
1e-8 alike, so 1e-4 is the cheapest per iteration.
"""

EXACT_KINKS_MAX_SURFACES = 20_000
"""`kinks="auto"` integrates kinks exactly up to this many pre-activation surfaces (points x
hidden units) and hands them to the adaptive solver (`"smooth"`, with a `KinksWarning`) above.

Exact events grow with the surfaces and each costs a piece restart: the Du–Hu–Lee Fig 2
network (200,000 surfaces) takes 63,417 events and ~6 h to t = 20 exactly, ~2 min smoothly
(docs/kinks.md). `kinks="exact"` insists; with `"smooth"`, `error_estimate=True` estimates the
error the kinks cause.
"""

ERROR_ESTIMATE_FACTOR = 10.0
"""`error_estimate=True` solves again with rtol and atol divided by this and reports the distance
between the two solutions as the first one's estimated global error.

With tolerance proportionality the tighter solve's error is a tenth of the first's, so the
distance estimates the first error to ~10 %: measured estimate / true error 0.92–1.04 on smooth,
exact-kink and smooth-kink flows (tests/test_error_estimate.py); low (down to ~0.7) where the
error shrinks more slowly than the tolerance, as through kinks on the smooth path (docs/kinks.md).
"""

DIVERGED = -3
"""`Trajectory.result` of a flow that diverged (see `DIVERGENCE_LOSS_DROP`)."""

DIVERGENCE_LOSS_DROP = 1e6
"""A failed smooth solve is diverged (`DIVERGED`) when at the time it reached its state or loss
is not finite, or its loss fell below L(theta_0) by more than this times
S = |L(theta_0)| + ||g_0|| ||theta_0|| + ||g_0||^2 (t1 - t0) (g_0 the initial gradient).

The loss of a gradient flow only decreases and bounds its path length, so only a loss falling
without bound can blow up in finite time; losses >= 0 fall by at most S. Measured: dtheta/dt =
theta^3 from theta_0 = 1 stalls at t = 0.5 - 1e-14 with L ~ -6e25 against S = 2.25.
"""

_EXPLICIT = {
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "bosh3": dfx.Bosh3,
}
_IMPLICIT = {
    "kvaerno3": dfx.Kvaerno3,
    "kvaerno4": dfx.Kvaerno4,
    "kvaerno5": dfx.Kvaerno5,
}
# A gradient flow's Jacobian, -Hessian, is symmetric: Rodas5P differentiates half of it and
# factorizes by Cholesky; ROS34PW2 reuses one eigendecomposition over steps.
_ROSENBROCK = {"rodas5p": lambda: Rodas5P(symmetric=True), "ros34pw2": ROS34PW2}
# Stabilised explicit: gradients and a spectral-radius estimate only (no Jacobian, no solve).
_CHEBYSHEV = {"rkc2": RKC2}
SOLVERS = ("auto", *_EXPLICIT, *_IMPLICIT, *_ROSENBROCK, *_CHEBYSHEV)

# New vector-field evaluations per attempted step (first-same-as-last counted once).
_STAGES = {dfx.Tsit5: 6, dfx.Dopri5: 6, dfx.Dopri8: 13, dfx.Bosh3: 3}


class FlowFailed(RuntimeError):
    """A gradient-flow solve did not reach t1 (with `throw=True`)."""


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


def _implicit(cls, n_params: int, atol: float):
    if n_params <= DENSE_JACOBIAN_MAX:
        return cls()
    # Newton's own tolerances follow the step controller's; see GMRES_RTOL for the linear ones.
    root_finder = dfx.with_stepsize_controller_tols(optx.Newton)(
        linear_solver=lx.GMRES(rtol=GMRES_RTOL, atol=1e-2 * atol, restart=20, max_steps=200),
    )
    return cls(root_finder=root_finder)


def make_solver(name: str, n_params: int, atol: float = 1e-10):
    """The diffrax solver for a shortcut name (implicit ones matrix-free above a size)."""
    if name in _EXPLICIT:
        return _EXPLICIT[name]()
    if name in _IMPLICIT:
        return _implicit(_IMPLICIT[name], n_params, atol)
    if name in _ROSENBROCK:
        return _ROSENBROCK[name]()
    if name in _CHEBYSHEV:
        return _CHEBYSHEV[name]()
    raise ValueError(
        f"`solver` must be a diffrax solver or one of {', '.join(SOLVERS)}, got {name!r}"
    )


def _auto(model, loss, t0, t1, n_params, batched):
    """Stiff or explicit: sharpness at theta_0 against the horizon (see STIFFNESS_THRESHOLD)."""
    if batched:
        lam = eqx.filter_vmap(lambda m: sharpness(m, loss, rtol=SHARPNESS_RTOL))(model)
        lam = float(jnp.max(lam))
    else:
        lam = float(sharpness(model, loss, rtol=SHARPNESS_RTOL))
    if lam * abs(t1 - t0) <= STIFFNESS_THRESHOLD:
        return "tsit5", lam
    return ("rodas5p" if n_params <= DENSE_JACOBIAN_MAX else "rkc2"), lam


def _is_implicit(solver) -> bool:
    return isinstance(solver, dfx.AbstractImplicitSolver)


# Evaluation counts of the solves run with `count_evals=True`: token -> {kind: per-member counts}.
_COUNTS: dict[int, dict[str, np.ndarray]] = {}
_COUNTS_LOCK = threading.Lock()
_TOKENS = itertools.count()


def _tick(kind: str, token, member, probe):
    """A zero that, when computed, adds one `kind` evaluation per lane to member's host count.

    `probe` is a scalar of the evaluated point (or tangent): it ties the callback to each
    evaluation, also inside `jax.linearize`d and `jax.jacfwd`ed (vmapped) Hessian products,
    where every lane of the vmap is one evaluation.
    """

    def count(token, member, probe):
        member, probe = np.broadcast_arrays(member, probe)
        with _COUNTS_LOCK:
            counts = _COUNTS[int(np.ravel(token)[0])][kind]
            np.add.at(counts, member.ravel(), 1)
        return np.zeros(probe.shape, probe.dtype)

    return jax.pure_callback(
        count, jax.ShapeDtypeStruct((), probe.dtype), token, member, probe,
        vmap_method="expand_dims",
    )


def _probe(tree):
    # One entry of every leaf: batched (one count per lane) when any leaf's tangent is, as in
    # a Jacobian built leaf by leaf (Rodas5P), where the other leaves' tangents are zeros.
    return sum(x.ravel()[0] for x in jax.tree.leaves(tree))


def _counting_field(grad, token, member):
    """-grad L with a custom JVP (-H v) that counts each gradient and each Hessian-vector product.

    The values are unchanged (each gets + 0.0 from the counting callback); diffrax's implicit
    solvers only ever differentiate the vector field forward (Newton: JVPs; dense Jacobians:
    vmapped JVPs), which is what the JVP rule sees.
    """

    @jax.custom_jvp
    def field(p, token, member):
        zero = _tick("grad", token, member, _probe(p))
        return jax.tree.map(lambda g: -(g + zero), grad(p))

    @field.defjvp
    def field_jvp(primals, tangents):
        p, token, member = primals
        g, hv = jax.jvp(grad, (p,), (tangents[0],))
        # The gradient once per linearisation, the product once per tangent (per application).
        g_zero = _tick("grad", token, member, _probe(p))
        # The probe holds the point too: a Jacobian's tangents are constant basis vectors, and
        # a callback on constants alone would be hoisted out of the solver's loop (run once).
        hv_zero = _tick("hvp", token, member, _probe(tangents[0]) + _probe(p))
        return (jax.tree.map(lambda a: -(a + g_zero), g),
                jax.tree.map(lambda h: -(h + hv_zero), hv))

    return lambda p: field(p, token, member)


@eqx.filter_jit
def _divergence_probe(p0, p_end, static, loss, t0, t1, batched):
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


@eqx.filter_jit
def _flow_solve(params, static, loss, solver, controller, t0, t1, ts, dt0, max_steps, batched,
                token=None, progress=False, gap_drift=False):
    grad = eqx.filter_grad(lambda q: loss(eqx.combine(q, static)))

    def single(p, member):
        if token is None:
            field = lambda q: jax.tree.map(jnp.negative, grad(q))  # noqa: E731
        else:
            field = _counting_field(grad, token, member)
        term = dfx.ODETerm(lambda t, q, args: field(q))
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
        }
        if gap_drift:  # in the same compiled call: one dispatch less per solve
            stats["layer_gap_drift"] = _layer_gap_drift(eqx.combine(saved, static), False)
        return saved, losses, sol.result._value, stats, jax.tree.map(lambda y: y[-1], y_end)

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
    solver="auto",
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 100_000,
    dt0: float | None = None,
    batched: bool = False,
    throw: bool = True,
    kinks="auto",
    max_events: int = 10_000,
    count_evals: bool = False,
    progress: bool = False,
    error_estimate: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> Trajectory:
    """Integrates the gradient flow d theta/dt = -grad L(theta) of an Equinox model with diffrax.

    The state is the model's arrays; diffrax's adaptive step control (PID controller on
    `rtol`/`atol`) does the integration and the flow is saved at `ts`.

    **Arguments:**

    - `model`: an Equinox model (batched: arrays with a leading batch axis, see
      `flowsim.init.batch`).
    - `loss`: a callable `model -> scalar`, e.g. from `flowsim.losses`.
    - `t1`: final time; `t0` the initial one.
    - `ts`: save times in [t0, t1] (increasing); default `(t0, t1)`.
    - `solver`: a diffrax solver instance, or a name: `"tsit5"`, `"dopri5"`, `"dopri8"`,
      `"bosh3"` (explicit), `"rodas5p"` (`flowsim.Rodas5P`: Rosenbrock, order 5, a fresh
      dense symmetric Jacobian -Hessian and its Cholesky factorization per step, for stiff
      problems up to a few thousand parameters), `"ros34pw2"` (`flowsim.ROS34PW2`: order 3,
      one eigendecomposition reused over steps), `"kvaerno3"`, `"kvaerno4"`, `"kvaerno5"`
      (L-stable ESDIRK; Jacobian dense up to `DENSE_JACOBIAN_MAX` parameters and matrix-free —
      Newton with GMRES on Hessian-vector products — above), `"rkc2"` (`flowsim.RKC2`:
      Runge–Kutta–Chebyshev, order 2, s stages from a spectral-radius estimate; gradients
      only, for stiff problems of any size), or `"auto"`: if sharpness(theta_0) * (t1 - t0) >
      `STIFFNESS_THRESHOLD`, Rodas5P up to `DENSE_JACOBIAN_MAX` parameters and RKC2 above,
      else Tsit5.
    - `rtol`, `atol`: the step controller's tolerances. The solve runs in the model's
      precision: for a float32 (or lower) model, tolerances below 100 x its machine epsilon
      (`flowsim._precision.PRECISION_FACTOR`; 1.2e-5 for float32) cannot be met and a
      `flowsim.PrecisionWarning` says what accuracy to expect; convert with
      `jax.tree.map(lambda x: x.astype(jnp.float64), model)` and float64 loss data for more.
    - `max_steps`: bound on the number of steps (static; failure beyond it).
    - `dt0`: initial step; default chosen by diffrax.
    - `batched`: integrate a batch of initialisations in one compiled call (vmap).
    - `throw`: raise `FlowFailed` if any trajectory fails; with `throw=False` failures are
      marked in `Trajectory.result` and the other trajectories are kept.
    - `kinks`: how ReLU kinks are integrated: a strategy from `flowsim.kinks`, or a string
      shortcut. `flowsim.ExactKinks(...)` / `"exact"`: piece by piece on fixed activation
      patterns, with every pattern change located as an event and Filippov sliding along
      kinks, as one compiled program (vmapped over a batch on accelerators; see
      docs/kinks.md; needs a ReLU / leaky-ReLU model and a loss with inputs `X`, as from
      `flowsim.losses`); `flowsim.SmoothKinks()` / `"smooth"`: hand the discontinuous vector
      field to the adaptive solver as it is (fast where few kinks are crossed; stalls in a
      sliding mode, which is then reported as a max_steps failure); `"auto"` (default): exact
      where supported and the data has at most `EXACT_KINKS_MAX_SURFACES` pre-activation
      surfaces (points x hidden units), smooth above with a `flowsim.KinksWarning`.
      `Trajectory.kinks` says which was used, `Trajectory.events` lists the exact path's
      events.
    - `max_events`: with exact kinks, the most pattern changes before the solve is failed
      (shortcut for `ExactKinks(max_events=...)`, whose value wins when one is passed).
    - `count_evals`: count every gradient and Hessian-vector product the solver evaluates
      (`stats["num_grad_evals"]`, `stats["num_hvp_evals"]`) through a host callback: exact
      for any solver, implicit ones included (diffrax does not report their Newton / GMRES
      work), at the cost of a host round trip per evaluation. Under `batched=True` a member
      counts what its vmap lane evaluated: vmap runs every lane's loops (steps, Newton, GMRES)
      until the slowest member's stop, so lanes report the batch's work, not their own. Not
      for the exact-kink path.
    - `progress`: show a progress bar (tqdm, on stderr) over flow time; with exact kinks it
      also shows the events met so far.
    - `error_estimate`: also solve at tolerances `rtol / ERROR_ESTIMATE_FACTOR`,
      `atol / ERROR_ESTIMATE_FACTOR` (same solver, same kink treatment, no recompilation)
      and report `stats["error_estimate"]`: max over the saved times of
      ||theta(t) - theta_tight(t)||_2 / max_t ||theta_tight(t)||_2, an a-posteriori estimate of
      the returned solution's relative global error (which the layer-gap drift can miss by
      orders of magnitude: docs/kinks.md). The tighter solve takes 10^(1/5) = 1.6x the steps
      of a 5th-order method on a smooth flow, but up to 10x where the solver chatters across
      kinks (steps ~ 1/tol there: 11,144 against 1,993 on the Fig 2 network at rtol 1e-8).
      NaN, with a `FlowWarning`, if the tighter solve fails before the first one's end; 0 if
      it took the very same steps (the tolerance never bound them, as on exact-kink pieces
      shorter than the error control would allow): the error is then below what the
      tolerance resolves, not zero.
    - `checkpoint`: with exact kinks, a file (.npz) in which the event loop keeps its state
      (shortcut for `ExactKinks(checkpoint=...)`): written every
      `flowsim._exact.checkpoint.CHECKPOINT_SECONDS` (60 s), on Ctrl-C and when the solve
      stops. If the file exists the solve resumes from it, bitwise as if never stopped (a
      finished one returns its result at once; one that ran out of `max_events` or
      `max_steps` carries on with the larger budget given). The file is refused (ValueError)
      if it belongs to another problem (initial model, data, times, solver, tolerances). A
      vmapped batch keeps one file, a batch run as a loop one per member,
      `<stem>-<i><suffix>`; the tighter solve of `error_estimate` uses `<stem>-tight<suffix>`.

    Implicit solvers step exactly onto `ts` (their dense output is only third order); explicit
    ones interpolate with their own high-order dense output.

    **Returns:** a `flowsim.Trajectory` with `ts`, `models`, `loss`, `result` (0 = success;
    positive: diffrax's `RESULTS` index, 1 = max_steps reached; -1: more kink events than
    `max_events`; -2: the piecewise solve stopped before t1; -3 = `DIVERGED`: the flow diverged,
    its state or loss not finite or its loss falling without bound, as in a finite-time
    blow-up of a loss unbounded below: see `DIVERGENCE_LOSS_DROP`; `stats["t_reached"]` is the
    time reached) and
    `stats` (`num_steps`, `num_accepted_steps`, `num_rejected_steps`, `num_grad_evals` for
    explicit solvers (stages x steps + 1) or with `count_evals`, then also `num_hvp_evals`;
    with exact kinks `num_events`, `num_crossings`, `num_sliding_intervals`, `num_releases`,
    `num_sliding_max`, `num_sliding_now`, `num_records`, and `Trajectory.events`;
    for homogeneous networks `layer_gap_drift`, the largest change of a layer gap
    ||W_h||^2 - ||W_h+1||^2 over the saved times relative to the largest squared norm: the flow
    conserves the gaps, so a drift above the tolerance flags a solve to distrust; a small
    drift does not bound the error, for which see `error_estimate`).

    **Raises:** `ValueError` for bad arguments, among them NaN or inf in `t0`, `t1`, `ts`, the
    initial model or the loss's data arrays (checked before any solve, where the arrays are
    concrete, not under tracing); `FlowFailed` (with `throw=True`) naming the cause: a
    divergence says so with the time reached. **Warns:** `flowsim.PrecisionWarning` (see
    `rtol`), `flowsim.FlowWarning` for failures with `throw=False`.

    **Example:**

    ```python
    import jax.numpy as jnp, jax.random as jr, flowsim
    M = jnp.diag(jnp.array([3.0, 1.0]))
    mf = flowsim.models.MatrixFactorization.random(2, 2, 2, scale=0.1, key=jr.key(0))
    traj = flowsim.gradient_flow(mf, flowsim.losses.factorization(M), 10.0)
    float(traj.loss[-1])  # ~1e-17
    ```
    """
    t0, t1 = float(t0), float(t1)
    if not math.isfinite(t0):
        raise ValueError(f"`t0` must be finite, got {t0}; pass a finite start time (default 0.0)")
    if not (math.isfinite(t1) and t1 > t0):
        raise ValueError(f"`t1` must be finite and greater than t0={t0}, got {t1}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tol, int | float) and tol > 0 and math.isfinite(tol)):
            raise ValueError(f"`{name}` must be a positive float, got {tol!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer, got {max_steps!r}")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = check_model(params, batched)
    check_finite_inputs(params, loss, batched)
    single = split_batch(params, static, batched)
    check_loss(loss, single)
    dtype = jax.tree.leaves(params)[0].dtype
    if ts is None:
        ts_arr = np.array([t0, t1])
    else:
        ts_arr = np.asarray(ts, dtype=np.float64)
        if ts_arr.ndim != 1 or ts_arr.size == 0:
            raise ValueError(
                f"`ts` must be a non-empty 1-d sequence of times, got shape {ts_arr.shape}"
            )
        if not np.all(np.isfinite(ts_arr)):
            k = int(np.flatnonzero(~np.isfinite(ts_arr))[0])
            raise ValueError(
                f"`ts` must hold finite times, got {ts_arr[k]} at index {k}; pass save times "
                f"in [t0, t1] = [{t0}, {t1}]"
            )
        if np.any(np.diff(ts_arr) < 0) or ts_arr[0] < t0 or ts_arr[-1] > t1:
            raise ValueError(f"`ts` must be non-decreasing and within [t0, t1] = [{t0}, {t1}]")
    warn_tolerance_precision(params, rtol, atol)
    n_params = _n_params(params, batched)
    # Tolerances and times as (NumPy) arrays: traced, so new values do not recompile the solve;
    # NumPy rather than jnp: no eager dispatch per value (a small solve is ~0.2 ms).
    np_dtype = np.dtype(dtype)
    rtol_j, atol_j = np.asarray(rtol, np_dtype), np.asarray(atol, np_dtype)
    t0_j, t1_j = np.asarray(t0, np_dtype), np.asarray(t1, np_dtype)
    chosen = solver
    if isinstance(solver, str):
        if solver == "auto":
            chosen, _ = _auto(model, loss, t0, t1, n_params, batched)
        solver = make_solver(chosen, n_params, atol_j)
    elif not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver or a name in {SOLVERS}, got {solver!r}")
    controller = dfx.PIDController(rtol=rtol_j, atol=atol_j)
    if _is_implicit(solver):
        # PI control is smoother on stiff problems (diffrax's recommendation for implicit solvers).
        controller = dfx.PIDController(rtol=rtol_j, atol=atol_j, pcoeff=0.3, icoeff=0.4)
        controller = dfx.ClipStepSizeController(controller, step_ts=ts_arr)
    ts_j = np.asarray(ts_arr, np_dtype)
    if isinstance(kinks, ExactKinks):
        max_events, checkpoint = kinks.max_events, kinks.checkpoint
        strategy = kinks
    else:
        strategy = ExactKinks(max_events=max_events, checkpoint=checkpoint)
    exact = _use_kinks(kinks, single, loss)
    for name, flag in (("count_evals", count_evals), ("error_estimate", error_estimate)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be True or False, got {flag!r}")
    if count_evals and exact:
        raise ValueError(
            "count_evals=True counts the evaluations of a smooth solve, but this one takes the "
            "exact-kink path (kinks='exact', or 'auto' on a small ReLU problem); pass "
            "kinks='smooth' or count_evals=False"
        )
    if checkpoint is not None and not exact:
        raise ValueError(
            "`checkpoint` is for the exact-kink path (kinks='exact', or 'auto' on a small ReLU "
            "problem), but this solve is smooth; drop checkpoint or pass kinks='exact'"
        )
    gap_drift = bool(getattr(single, "is_homogeneous", False)
                     and getattr(single, "activations", ()))
    probe = None
    if exact:
        saved, losses, result, stats, events = _kink_solve(
            params, static, loss, solver, controller, t0, t1, ts_arr, max_steps, max_events,
            batch if batched else None, progress, checkpoint, strategy,
        )
    else:
        events = None
        token = next(_TOKENS) if count_evals else None
        if token is not None:
            lanes = batch if batched else 1
            _COUNTS[token] = {"grad": np.zeros(lanes, np.int64), "hvp": np.zeros(lanes, np.int64)}
        try:
            saved, losses, result, stats, y_end = _flow_solve(
                params, static, loss, solver, controller, t0_j, t1_j, ts_j,
                None if dt0 is None else np.asarray(dt0, np_dtype),
                max_steps, batched, None if token is None else np.asarray(token, np.int32),
                bool(progress), gap_drift,
            )
            jax.block_until_ready((saved, stats))
        finally:
            counts = _COUNTS.pop(token, None)
        stages = _STAGES.get(type(solver))
        if counts is not None:
            shape = jnp.shape(result)
            stats = dict(stats, **{
                f"num_{kind}_evals": jnp.asarray(n.reshape(shape)) for kind, n in counts.items()
            })
        elif stages is not None:
            stats = dict(stats, num_grad_evals=_host(lambda xp, n: stages * n + 1,
                                                      stats["num_steps"]))
        if not isinstance(result, jax.core.Tracer) and np.any(np.asarray(result) != 0):
            probe = _divergence_probe(params, y_end, static, loss, t0_j, t1_j, batched)
    stats = dict(stats, max_steps=_host(lambda xp, r: xp.full_like(r, max_steps), result))
    if gap_drift and "layer_gap_drift" not in stats:
        stats["layer_gap_drift"] = _layer_gap_drift(eqx.combine(saved, static), batched)
    result, details = _divergence(result, losses, ts_j, stats["t_reached"], probe)
    ts_j = jnp.asarray(ts_j)
    traj = Trajectory(
        ts=jnp.broadcast_to(ts_j, (batch, ts_j.shape[0])) if batched else ts_j,
        models=eqx.combine(saved, static),
        loss=losses,
        result=result,
        stats=stats,
        batched=batched,
        solver=type(solver).__name__,
        kinks="exact" if exact else ("smooth" if _has_kinks(model) else None),
        events=events,
    )
    _report_failures(traj, throw, max_steps, details, t0)
    if error_estimate:
        with warnings.catch_warnings():  # its failures are reported below, as the estimate's
            warnings.simplefilter("ignore", FlowWarning)
            warnings.simplefilter("ignore", PrecisionWarning)  # said once, for the first solve
            tight = gradient_flow(
                model, loss, t1, t0=t0, ts=ts_arr, solver=chosen,
                rtol=rtol / ERROR_ESTIMATE_FACTOR, atol=atol / ERROR_ESTIMATE_FACTOR,
                max_steps=max_steps, dt0=dt0, batched=batched, throw=False,
                kinks=eqx.tree_at(
                    lambda k: k.checkpoint, strategy,
                    None if checkpoint is None else _member_path(checkpoint, "tight"),
                    is_leaf=lambda x: x is None) if exact else SmoothKinks(),
                progress=progress,
            )
        traj = eqx.tree_at(lambda tr: tr.stats, traj,
                           dict(traj.stats, error_estimate=_error_estimate(traj, tight)))
        _report_tight_failures(traj, tight, max_steps, max_events if exact else None)
    return traj


def _error_estimate(traj: Trajectory, tight: Trajectory):
    """Per trajectory: max_t ||theta(t) - theta_tight(t)|| / max_t ||theta_tight(t)|| over the
    saved times both solves reached (NaN where the tight one did not reach the first's end)."""

    def flat(tr):
        leaves = jax.tree.leaves(eqx.filter(tr.models, eqx.is_inexact_array))
        lead = 2 if tr.batched else 1
        return np.concatenate([np.asarray(x).reshape(*x.shape[:lead], -1) for x in leaves], -1)

    a, b = flat(traj), flat(tight)  # (*batch, time, params)
    ts = np.asarray(traj.ts)
    reached = np.asarray(traj.stats["t_reached"])[..., None]
    reached_tight = np.asarray(tight.stats["t_reached"])[..., None]
    both = ts <= np.minimum(reached, reached_tight)
    # Times a solve did not reach hold diffrax's inf fill: masked before any arithmetic.
    a, b = np.where(both[..., None], a, 0.0), np.where(both[..., None], b, 0.0)
    dist, norm = np.linalg.norm(a - b, axis=-1), np.linalg.norm(b, axis=-1)
    est = np.max(dist, axis=-1) / np.max(norm, axis=-1)
    short = np.squeeze(reached_tight < reached, -1)
    return jnp.asarray(np.where(short, np.nan, est))


def _report_tight_failures(traj: Trajectory, tight: Trajectory, max_steps, max_events) -> None:
    """A FlowWarning for trajectories whose estimate is NaN (`max_events` None: smooth path)."""
    short = np.atleast_1d(np.isnan(np.asarray(traj.stats["error_estimate"])))
    if not short.any():
        return
    i = int(np.flatnonzero(short)[0])
    code = int(np.atleast_1d(np.asarray(tight.result))[i])
    n = int(short.sum())
    fix = f"raise max_steps (now {max_steps})"
    if max_events is not None:
        fix += f" or max_events (now {max_events})"
    warnings.warn(
        f"no error estimate for {n} {'trajectory' if n == 1 else 'trajectories'} "
        f"(stats['error_estimate'] is NaN): the solve at tolerances / "
        f"{ERROR_ESTIMATE_FACTOR:g} stopped early (trajectory {i}: {_result_message(code)}); "
        f"{fix}", FlowWarning, stacklevel=3,
    )


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
    return any(a in ("relu", "leaky_relu") for a in getattr(model, "activations", ()))


def _use_kinks(kinks, model, loss) -> bool:
    if isinstance(kinks, ExactKinks):
        kinks = "exact"
    elif isinstance(kinks, SmoothKinks):
        kinks = "smooth"
    if not isinstance(kinks, str) or kinks not in ("auto", "exact", "smooth"):
        raise ValueError(f"`kinks` must be 'auto', 'exact', 'smooth', flowsim.ExactKinks(...) "
                         f"or flowsim.SmoothKinks(), got {kinks!r}")
    supported = supports_kinks(model, loss)
    if kinks == "exact" and not supported:
        raise ValueError(
            "kinks='exact' needs a ReLU or leaky-ReLU model from flowsim.models and a loss "
            "with inputs X (flowsim.losses.square or logistic); use kinks='smooth'"
        )
    if kinks == "auto" and supported:
        pre = jax.eval_shape(lambda m: m.forward(loss.X)[1], model)
        surfaces = sum(math.prod(z.shape) for z in pre)
        if surfaces > EXACT_KINKS_MAX_SURFACES:
            warn_auto_smooth(surfaces, EXACT_KINKS_MAX_SURFACES)
            return False
        return True
    return supported and kinks == "exact"


def _member_path(path, tag):
    """`<stem>-<tag><suffix>` next to `path`."""
    path = pathlib.Path(path)
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def _kink_solve(params, static, loss, solver, controller, t0, t1, ts, max_steps, max_events,
                batch, progress=False, checkpoint=None, strategy=None):
    """The exact path: one compiled event loop, vmapped over the batch (`flowsim._exact`)."""
    strategy = ExactKinks() if strategy is None else strategy
    saved, stats, result, events = exact_flow(
        params, static, loss, t0, t1, ts, solver, controller, max_steps, max_events,
        batch is not None, progress=progress, checkpoint=checkpoint,
        capacity=strategy.capacity, execution=strategy.batch)
    losses = jax.vmap(lambda q: loss(eqx.combine(q, static)))
    loss_vals = losses(saved) if batch is None else jax.vmap(losses)(saved)
    return saved, loss_vals, result, stats, events


def _divergence(result, losses, ts, t_reached, probe):
    """`result` with `DIVERGED` where the flow diverged (`DIVERGENCE_LOSS_DROP`), and for those
    trajectories the reason, {index: text}. Traced results (under jit / vmap) are left as they
    are."""
    if any(isinstance(x, jax.core.Tracer) for x in (result, losses, t_reached)):
        return result, {}
    code = np.atleast_1d(np.asarray(result))
    loss = np.asarray(losses).reshape(code.shape[0], -1)
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
    new = np.where(diverged, DIVERGED, code).astype(np.asarray(result).dtype)
    return jnp.asarray(new.reshape(np.shape(result))), reasons


def _report_failures(traj: Trajectory, throw: bool, max_steps: int, details=None,
                     t0: float | None = None) -> None:
    result = np.atleast_1d(np.asarray(traj.result))
    bad = np.flatnonzero(result != 0)
    if bad.size == 0:
        return
    details = details or {}
    t_reached = np.atleast_1d(np.asarray(traj.stats.get("t_reached", np.nan)))
    t_reached = np.broadcast_to(t_reached, result.shape)
    msgs = []
    for i in bad[:5]:
        code = int(result[i])
        if code == DIVERGED:
            why = details.get(int(i), "non-finite state or loss")
            msgs.append(f"trajectory {i}: diverged ({why}) at t = {t_reached[i]:.10g}")
        else:
            msgs.append(f"trajectory {i}: {_result_message(code)}")
    advice = []
    if any(int(result[i]) == DIVERGED for i in bad):
        t_min = min(float(t_reached[i]) for i in bad if int(result[i]) == DIVERGED)
        if t0 is not None and t_min <= t0:
            advice.append("the loss or its gradient is not finite at the initial model; check "
                          "the loss and its data")
        else:
            advice.append(f"the flow diverges: the loss is unbounded below or the flow blows up "
                          f"in finite time; check the loss (and its data) or stop before the "
                          f"blow-up with t1 < {t_min:.6g}")
    if not all(int(result[i]) in (-1, DIVERGED) for i in bad):  # not only events / divergence
        advice.append(f"increase max_steps (now {max_steps}), loosen rtol/atol, or pick a stiff "
                      f"solver (solver='kvaerno5') if the problem is stiff")
    advice.append("pass throw=False to keep the other results" if throw else
                  "the results up to the failure are kept (Trajectory.result marks it)")
    text = (f"gradient flow failed: {'; '.join(msgs)}{' ...' if bad.size > 5 else ''}. "
            f"{'; '.join(advice)}")
    if throw:
        raise FlowFailed(text)
    warnings.warn(text, FlowWarning, stacklevel=3)


class FlowWarning(RuntimeWarning):
    """Some trajectories of a gradient-flow solve failed (`throw=False`)."""


def _result_message(code: int) -> str:
    if code == -1:
        return "more kink events than max_events; raise max_events or use kinks='smooth'"
    if code == -2:
        return "the piecewise solve stopped before t1"
    if code == DIVERGED:
        return "diverged (non-finite state or loss, or a loss falling without bound)"
    messages = dfx.RESULTS._index_to_message
    msg = messages[code] if 0 <= code < len(messages) else f"result code {code}"
    return msg.split("\n")[0].rstrip(".")
