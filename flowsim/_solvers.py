"""Solvers for the flow: names to diffrax solvers, the `solver="auto"` rule, dense or
matrix-free stage solves for implicit methods, and the default step-size controller."""

import functools

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

from ._chebyshev import RKC2
from ._jit import Memo, is_immutable_array
from ._rosenbrock import ROS34PW2, Rodas5P
from ._spectral import sharpness

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
STAGES = {dfx.Tsit5: 6, dfx.Dopri5: 6, dfx.Dopri8: 13, dfx.Bosh3: 3}


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


_sharpness_seen = Memo()
"""Sharpness estimates of (model, loss) pairs still alive (Equinox modules of JAX arrays:
immutable): a problem solved again (a tolerance ladder, a benchmark's repeats) is not
estimated again (5-6 HVPs, ~0.1 ms at 8 parameters, 1 s at 792k)."""


def auto_solver(model, loss, t0, t1, n_params, batched):
    """Stiff or explicit: sharpness at theta_0 against the horizon (see STIFFNESS_THRESHOLD)."""
    lam = _initial_sharpness(model, loss, batched)
    if lam * abs(t1 - t0) <= STIFFNESS_THRESHOLD:
        return "tsit5", lam
    return ("rodas5p" if n_params <= DENSE_JACOBIAN_MAX else "rkc2"), lam


def _initial_sharpness(model, loss, batched) -> float:
    """`sharpness` at `model` (the largest over a batch), remembered for immutable inputs."""
    arrays = [x for x in jax.tree.leaves((model, loss)) if eqx.is_array(x)]
    frozen = all(isinstance(x, eqx.Module) for x in (model, loss)) and \
        all(map(is_immutable_array, arrays))
    key = (model, loss) if frozen else None
    lam = None if key is None else _sharpness_seen.get(key)
    if lam is not None:
        return lam
    if batched:
        lam = eqx.filter_vmap(lambda m: sharpness(m, loss, rtol=SHARPNESS_RTOL))(model)
        lam = float(jnp.max(lam))
    else:
        lam = float(sharpness(model, loss, rtol=SHARPNESS_RTOL))
    if key is not None:
        _sharpness_seen.put(key, lam)
    return lam


def is_implicit(solver) -> bool:
    return isinstance(solver, dfx.AbstractImplicitSolver)


def default_controller(solver, rtol: float, atol: float, ts: np.ndarray):
    """A PID controller on `rtol` / `atol` (arrays of `ts`'s dtype: traced, so that new values
    do not recompile a solve); for implicit solvers PI coefficients (smoother on stiff problems,
    diffrax's recommendation) and steps clipped onto the save times `ts` (an implicit solver's
    dense output is only third order). Built once per distinct arguments (a controller's
    construction converts its fields to device arrays: ~0.1 ms, half a small solve)."""
    implicit = is_implicit(solver)
    return _controller(implicit, float(rtol), float(atol), ts.dtype.str,
                       tuple(ts.tolist()) if implicit else None)


@functools.lru_cache(maxsize=64)
def _controller(implicit, rtol, atol, dtype, ts):
    rtol, atol = np.asarray(rtol, dtype), np.asarray(atol, dtype)
    if not implicit:
        return dfx.PIDController(rtol=rtol, atol=atol)
    controller = dfx.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4)
    return dfx.ClipStepSizeController(controller, step_ts=np.asarray(ts, dtype))


def controller_tolerances(controller):
    """`(rtol, atol)` of a PID controller (possibly inside a `ClipStepSizeController`), or
    `None` for a controller without tolerances."""
    inner = getattr(controller, "controller", controller)
    if isinstance(inner, dfx.PIDController):
        return inner.rtol, inner.atol
    return None


def tighten(controller, factor: float):
    """The same controller with its tolerances divided by `factor` (ValueError without any)."""
    inner = getattr(controller, "controller", controller)
    if not isinstance(inner, dfx.PIDController):
        raise ValueError(
            f"an error estimate tightens the step controller's tolerances, but "
            f"{type(inner).__name__} has none; pass a diffrax.PIDController"
        )
    where = (lambda c: (c.controller.rtol, c.controller.atol)) if inner is not controller \
        else (lambda c: (c.rtol, c.atol))
    return eqx.tree_at(where, controller, (inner.rtol / factor, inner.atol / factor))
