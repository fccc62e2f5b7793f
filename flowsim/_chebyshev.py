"""Stabilised explicit Runge–Kutta–Chebyshev solver for diffrax: RKC2.

A Runge–Kutta–Chebyshev method spends its s stages on stability rather than order: the
stability polynomial is a shifted, damped Chebyshev polynomial of degree s, bounded by ~1 on
the negative real interval [-beta(s), 0] with beta(s) ~ 0.653 s^2, so that a step of size h
is stable wherever h rho <= beta(s) (rho the spectral radius of the Jacobian), at a cost of s
vector-field evaluations. The cost per unit time is then ~ s / h ~ sqrt(rho / h) instead of an
explicit method's ~ rho. Suited to Jacobians whose eigenvalues lie near the negative real axis,
as a gradient flow's do: its Jacobian is -Hessian, symmetric, with a real spectrum.

The method is the second-order RKC of Sommeijer, Shampine & Verwer (J. Comput. Appl. Math. 88
(1997) 315-326; Verwer, Hundsdorfer & Sommeijer, Numer. Math. 57 (1990) 157-178), damping
epsilon = 2/13, as in their code rkc.f (netlib `ode/rkc.f`, subroutines STEP, RKCLOW and
RKCRHO), from which the stage recursion, the stage-count rule, the error estimate and the
spectral-radius rule below are taken. With w0 = 1 + epsilon / s^2, w1 = T_s'(w0) / T_s''(w0),
b_j = T_j''(w0) / T_j'(w0)^2 (j >= 2), b_0 = b_1 = b_2, a_j = 1 - b_j T_j(w0):

    Y_0 = y_n,    Y_1 = y_n + mu~_1 h F_0,    mu~_1 = b_1 w1,
    Y_j = (1 - mu_j - nu_j) y_n + mu_j Y_{j-1} + nu_j Y_{j-2}
          + mu~_j h F(Y_{j-1}) - a_{j-1} mu~_j h F_0,                      j = 2, ..., s,
    mu_j = 2 b_j w0 / b_{j-1},  nu_j = -b_j / b_{j-2},  mu~_j = 2 b_j w1 / b_{j-1},
    y_{n+1} = Y_s,

with T_j the Chebyshev polynomials (their values and first two derivatives at w0 by the
three-term recurrence), and local error estimate (rkc.f, RKCLOW)

    est = 0.8 (y_n - y_{n+1}) + 0.4 h (F(y_n) + F(y_{n+1})),     O(h^3).
"""

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.flatten_util import ravel_pytree

from ._rosenbrock import _FlatField

_DAMPING = 2.0 / 13.0
"""epsilon of RKC: the stability polynomial is bounded by ~1 - epsilon / 3 inside the interval
(a margin for the estimate of rho), at the price of a 2 % shorter interval."""

_STAGE_FACTOR = 1.54
"""s = 1 + floor(sqrt(1 + 1.54 h rho)) (rkc.f): beta(s) ~ 0.653 s^2 = (s^2 - 1) / 1.54 + ..."""


def _stage_count(h, rho, max_stages: int):
    """The fewest stages whose stability interval holds h rho (rkc.f's rule), in [2, max_stages]."""
    hr = jnp.abs(h) * rho
    s = 1.0 + jnp.floor(jnp.sqrt(1.0 + _STAGE_FACTOR * hr))
    s = jnp.where(jnp.isfinite(s), s, float(max_stages))  # a NaN state: the step is rejected
    return jnp.clip(s, 2.0, float(max_stages)).astype(jnp.int32)


def _rkc_step(f, t0, y0, f0, h, s):
    """y_{n+1} = Y_s of the damped second-order Chebyshev recursion (rkc.f, STEP), for a
    traced number of stages s >= 2: s - 1 evaluations of f (F_0 = f0 is given)."""
    dtype = y0.dtype
    sf = s.astype(dtype)
    e = _DAMPING / sf**2
    w0 = 1.0 + e
    temp1 = e * (2.0 + e)  # w0^2 - 1 without the cancellation
    temp2 = jnp.sqrt(temp1)
    arg = sf * jnp.log(w0 + temp2)  # s arccosh(w0)
    w1 = jnp.sinh(arg) * temp1 / (jnp.cosh(arg) * sf * temp2 - w0 * jnp.sinh(arg))
    b1 = 1.0 / (2.0 * w0) ** 2  # b_0 = b_1 = b_2
    mus = w1 * b1
    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    # (j, Y_{j-1}, Y_{j-2}, theta_{j-1}, theta_{j-2}, b_{j-1}, b_{j-2}, T_{j-1}, T_{j-2},
    #  T'_{j-1}, T'_{j-2}, T''_{j-1}, T''_{j-2}), all at w0; theta_j: Y_j's time, in units of h.
    carry = (jnp.asarray(2, jnp.int32), y0 + (h * mus) * f0, y0, mus, zero, b1, b1,
             w0, one, one, zero, zero, zero)

    def cond(c):
        return c[0] <= s

    def body(c):
        j, yjm1, yjm2, thjm1, thjm2, bjm1, bjm2, zjm1, zjm2, dzjm1, dzjm2, d2zjm1, d2zjm2 = c
        zj = 2.0 * w0 * zjm1 - zjm2
        dzj = 2.0 * w0 * dzjm1 - dzjm2 + 2.0 * zjm1
        d2zj = 2.0 * w0 * d2zjm1 - d2zjm2 + 4.0 * dzjm1
        bj = d2zj / dzj**2
        ajm1 = 1.0 - zjm1 * bjm1
        mu = 2.0 * w0 * bj / bjm1
        nu = -bj / bjm2
        mus = mu * w1 / w0
        fj = f(t0 + h * thjm1, yjm1)
        yj = mu * yjm1 + nu * yjm2 + (1.0 - mu - nu) * y0 + (h * mus) * (fj - ajm1 * f0)
        thj = mu * thjm1 + nu * thjm2 + mus * (1.0 - ajm1)
        return (j + 1, yj, yjm1, thj, thjm1, bj, bjm1, zj, zjm1, dzj, dzjm1, d2zj, d2zjm1)

    return jax.lax.while_loop(cond, body, carry)[1]


def _power(jvp, v, active, iters: int, rtol: float):
    """Power iteration for the spectral radius of the linear map `jvp`, from the unit vector v.

    sigma_k = ||J v_k||, v_{k+1} = J v_k / sigma_k; stops once two successive sigmas agree to
    `rtol` (after at least two products) or after `iters` products (rkc.f, RKCRHO). sigma_k is
    a lower bound on rho that tightens with k. Lanes with `active` False (under vmap) do no
    iteration and return their v and 0. Returns (v, sigma, products).
    """
    zero = jnp.zeros((), v.dtype)

    def cond(c):
        k, _, sigma, prev = c
        settled = (k >= 2) & (jnp.abs(sigma - prev) <= rtol * sigma)
        return active & (k < iters) & ~settled

    def body(c):
        k, v, sigma, _ = c
        w = jvp(v)
        norm = jnp.linalg.norm(w)
        # J v = 0: v lies in the kernel; keep it (sigma = 0 says no stiffness seen).
        v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)
        return k + 1, v, norm, sigma

    k, v, sigma, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), v, zero, zero))
    return v, sigma, k


class RKC2(dfx.AbstractAdaptiveSolver):
    """Second-order Runge–Kutta–Chebyshev (RKC, Sommeijer, Shampine & Verwer 1997), a
    stabilised explicit solver for stiff problems with a real (or nearly real) spectrum.

    Each step uses s = 1 + floor(sqrt(1 + 1.54 h rho)) stages (rkc.f's rule; at least 2,
    at most `max_stages`), s vector-field evaluations in all (s - 1 stages and the slope at the
    new point, which the next step reuses), so that the step is stable up to h rho ~ 0.65 s^2:
    a stiff problem costs ~ sqrt(rho / h) evaluations per unit time instead of ~ rho, and no
    Jacobian, linear solve or Newton iteration is needed. Order 2; the embedded error estimate
    0.8 (y_n - y_{n+1}) + 0.4 h (f_n + f_{n+1}) of rkc.f is O(h^3) (`error_order` 3). Dense
    output: cubic Hermite from y_n, y_{n+1}, f_n, f_{n+1} (rkc.f's RKCINT; order 3 locally,
    as accurate as the steps).

    rho, a bound on the spectral radius of the Jacobian d f / d y, is estimated by power
    iteration on Jacobian-vector products (`jax.linearize` of the vector field; for a gradient
    flow, Hessian-vector products): ||J v|| for the iterate v, times `safety`, the iteration
    stopping once two estimates agree to `power_rtol` or after `power_iters` products. At
    `init` it starts from a fixed random vector; it is refreshed at the step's start every
    `refresh` accepted steps (and after a jump), warm-started from the dominant eigenvector
    kept in the solver state (typically 2-3 products). In between, every accepted step also
    raises rho to `safety` x ||f_{n+1} - f_n|| / ||y_{n+1} - y_n|| where that is larger (a
    free lower bound on the spectral radius along the step), so that a spectrum that stiffens
    between refreshes is caught early; a step that was still unstable is rejected by the error
    estimate. Power iteration bounds rho from below, so `safety` and the damping (the
    stability polynomial stays below ~0.95 in modulus inside its interval) give the margin.

    Where h rho needs more than `max_stages` stages the step is taken with `max_stages` and
    is unstable in the stiffest modes; the error estimate then rejects it and the controller
    shrinks h, as for any explicit method at its stability limit. Roundoff grows with s^2
    (rkc.f caps s at sqrt(rtol / (10 u)): 213 at rtol 1e-10 in float64).

    The solver state is (f_n, unit dominant eigenvector, rho, accepted steps since the last
    refresh, stages of the last step): `diffrax.SaveAt(solver_state=True)` shows rho and s.

    **Arguments:**

    - `max_stages`: most stages in a step (static, default 256: stable up to h rho ~ 42,000).
    - `refresh`: accepted steps between power iterations (default 25, as rkc.f).
    - `safety`: factor on the power-iteration estimate (default 1.2, as rkc.f).
    - `power_iters`: most Jacobian-vector products per power iteration (default 50).
    - `power_rtol`: agreement of successive estimates that stops it (default 0.01, as rkc.f).

    **Example:**

    ```python
    import diffrax as dfx, jax.numpy as jnp
    from flowsim._chebyshev import RKC2
    lam = jnp.logspace(-2, 4, 50)
    term = dfx.ODETerm(lambda t, y, args: -lam * y)
    sol = dfx.diffeqsolve(term, RKC2(), 0.0, 10.0, None, jnp.ones(50),
                          stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8))
    ```
    """

    term_structure: ClassVar = dfx.ODETerm
    interpolation_cls: ClassVar = dfx.ThirdOrderHermitePolynomialInterpolation.from_k
    max_stages: int = eqx.field(default=256, static=True)
    refresh: int = eqx.field(default=25, static=True)
    safety: float = eqx.field(default=1.2, static=True)
    power_iters: int = eqx.field(default=50, static=True)
    power_rtol: float = eqx.field(default=0.01, static=True)

    def __check_init__(self):
        for name in ("max_stages", "refresh", "power_iters"):
            value = getattr(self, name)
            low = 2 if name != "refresh" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.safety, int | float) and self.safety >= 1.0):
            raise ValueError(f"`safety` must be a number >= 1, got {self.safety!r}")
        if not (isinstance(self.power_rtol, int | float) and 0.0 < self.power_rtol < 1.0):
            raise ValueError(f"`power_rtol` must be in (0, 1), got {self.power_rtol!r}")

    def order(self, terms):
        return 2

    def error_order(self, terms):
        # The estimate is of the order-2 step's own local error, O(h^3) (diffrax's default
        # assumes an embedded pair of orders p and p - 1, an O(h^p) estimate).
        return 3

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def _estimate(self, f, t0, y, v, active):
        """(v, safety x sigma) from a power iteration at (t0, y), for the lanes `active`."""
        _, jvp = jax.linearize(lambda z: f(t0, z), y)
        v, sigma, _ = _power(jvp, v, active, self.power_iters, self.power_rtol)
        return v, self.safety * sigma

    def init(self, terms, t0, t1, y0, args):
        y, unravel = ravel_pytree(y0)
        dtype = y.dtype
        t0 = jnp.asarray(t0, dtype)
        f = _FlatField(terms, args, unravel)
        v = jr.normal(jr.key(0), y.shape, dtype)
        v, rho = self._estimate(f, t0, y, v / jnp.linalg.norm(v), jnp.asarray(True))
        return (f(t0, y), v, rho, jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32))

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y, unravel = ravel_pytree(y0)
        dtype = y.dtype
        t0 = jnp.asarray(t0, dtype)
        h = jnp.asarray(terms.contr(t0, t1), dtype)
        f = _FlatField(terms, args, unravel)
        f0, v, rho, age, _ = solver_state
        if made_jump is not False:
            f0 = jax.lax.cond(eqxi.unvmap_any(made_jump), lambda: f(t0, y), lambda: f0)
        need = (age >= self.refresh) | made_jump

        def refresh():
            v_new, rho_new = self._estimate(f, t0, y, v, need)
            return jnp.where(need, v_new, v), jnp.where(need, rho_new, rho)

        # Under vmap the iteration runs when some lane needs it, and only those lanes iterate.
        v, rho = jax.lax.cond(eqxi.unvmap_any(need), refresh, lambda: (v, rho))
        s = _stage_count(h, rho, self.max_stages)
        y1 = _rkc_step(f, t0, y, f0, h, s)
        f1 = f(t0 + h, y1)
        err = 0.8 * (y - y1) + (0.4 * h) * (f0 + f1)
        # An overflowing step is rejected (and the step size shrunk), not kept.
        err = jnp.where(jnp.all(jnp.isfinite(y1)), err, jnp.inf)
        dy, df = jnp.linalg.norm(y1 - y), jnp.linalg.norm(f1 - f0)
        secant = jnp.where(dy > 0, df / jnp.where(dy > 0, dy, 1.0), 0.0)
        rho_next = jnp.maximum(rho, self.safety * jnp.where(jnp.isfinite(secant), secant, 0.0))
        state = (f1, v, rho_next, jnp.where(need, 1, age + 1).astype(jnp.int32), s)
        dense_info = dict(y0=y0, y1=unravel(y1), k=jax.vmap(unravel)(jnp.stack([h * f0, h * f1])))
        return unravel(y1), unravel(err), dense_info, state, dfx.RESULTS.successful
