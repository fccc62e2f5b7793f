"""RKC2 (flowsim._chebyshev): stability polynomial, orders, stiffness, a gradient flow, vmap."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree
from numpy.polynomial import chebyshev as C

import flowsim
from flowsim._chebyshev import RKC2, _rkc_step, _stage_count
from flowsim.models import MLP

from .helpers import (
    PYTREE_ODE_Y0,
    fitted_order,
    pytree_ode,
    pytree_ode_exact,
    tree_max_abs_diff,
)

_vf = pytree_ode
Y0 = PYTREE_ODE_Y0
_exact = pytree_ode_exact


def _flat_vf(t, y):
    out = _vf(t, {"a": y[0], "b": y[1], "c": y[2]}, None)
    return jnp.stack([out["a"], out["b"], out["c"]])


_slope = fitted_order


def _symmetric(lam, key):
    """Q diag(lam) Q^T for a random orthogonal Q."""
    Q, _ = jnp.linalg.qr(jr.normal(key, (lam.shape[0], lam.shape[0])))
    return (Q * lam) @ Q.T


@pytest.mark.parametrize("s", [2, 5, 40, 256])
def test_stability_polynomial(s):
    # One step on y' = lambda y is y1 = R_s(h lambda) y0 with the damped Chebyshev polynomial
    # R_s(z) = a_s + b_s T_s(w0 + w1 z) (Verwer et al. 1990), a_s = 1 - b_s T_s(w0),
    # b_s = T_s''(w0) / T_s'(w0)^2, w1 = T_s'(w0) / T_s''(w0), w0 = 1 + 2 / (13 s^2): computed
    # here from numpy's Chebyshev series, independently of the recursion. It must hold to
    # rounding, stay in [-1, 1] on [-beta, 0] with beta = (s^2 - 1) / 1.54 (the stage rule's
    # interval), and leave that interval only beyond it.
    w0 = 1.0 + 2.0 / (13.0 * s**2)
    Ts = C.Chebyshev.basis(s)
    d1, d2 = Ts.deriv(1)(w0), Ts.deriv(2)(w0)
    w1, bs = d1 / d2, d2 / d1**2
    beta = (s**2 - 1) / 1.54
    z = -np.linspace(0.0, beta, 2001)
    R = (1.0 - bs * Ts(w0)) + bs * Ts(w0 + w1 * z)
    lam = jnp.asarray(z)
    y1 = _rkc_step(lambda t, y: lam * y, jnp.asarray(0.0), jnp.ones_like(lam), lam,
                   jnp.asarray(1.0), jnp.asarray(s, jnp.int32))
    assert float(jnp.max(jnp.abs(y1 - R))) <= 1e-12 * s**2, float(jnp.max(jnp.abs(y1 - R)))
    assert float(jnp.max(jnp.abs(y1))) <= 1.0 + 1e-12
    assert int(_stage_count(jnp.asarray(1.0), jnp.asarray(beta * (1 - 1e-9)), 10**6)) <= s
    # Order 2 at the origin: R(z) = 1 + z + z^2 / 2 + O(z^3).
    zs = -1e-3
    Rz = (1.0 - bs * Ts(w0)) + bs * Ts(w0 + w1 * zs)
    assert abs(Rz - (1 + zs + zs**2 / 2)) <= abs(zs) ** 3  # an O(z^2) slip would be 1e-6


@pytest.mark.parametrize("s", [2, 3, 10, 50])
def test_order_at_fixed_stage_count(s):
    # The recursion is of order 2 for every s (the stage times theta_j enter through the
    # non-autonomous component): fixed steps h = 1/n, global error at t = 1 ~ h^2.
    step = jax.jit(lambda t, y, h: _rkc_step(_flat_vf, t, y, _flat_vf(t, y), h,
                                             jnp.asarray(s, jnp.int32)))
    ns, errs = [8, 16, 32, 64], []
    exact = _exact(1.0)
    for n in ns:
        y, h = jnp.array([Y0["a"], Y0["b"], Y0["c"]]), 1.0 / n
        for i in range(n):
            y = step(jnp.asarray(i * h), y, jnp.asarray(h))
        errs.append(float(np.max(np.abs(np.asarray(y) - np.array(list(exact.values()))))))
    fitted = _slope([1.0 / n for n in ns], errs)
    assert abs(fitted - 2) <= 0.2, f"fitted order {fitted:.3f} at s = {s}; {errs}"


def test_order_linear_symmetric():
    # y' = -A y, A symmetric with eigenvalues 0.1 ... 10 (the stage rule takes s = 2-3), exact
    # solution expm(-A t) y0; fixed steps diffeqsolve: global error ~ h^2.
    A = _symmetric(jnp.logspace(-1.0, 1.0, 20), jr.key(0))
    y0 = jnp.ones(20)
    exact = scipy.linalg.expm(-np.asarray(A)) @ np.asarray(y0)
    term = dfx.ODETerm(lambda t, y, args: -(A @ y))
    ns, errs = [16, 32, 64, 128], []
    for n in ns:
        sol = dfx.diffeqsolve(term, RKC2(), 0.0, 1.0, 1.0 / n, y0,
                              stepsize_controller=dfx.ConstantStepSize(), max_steps=128)
        errs.append(float(jnp.max(jnp.abs(sol.ys[-1] - exact))))
    fitted = _slope([1.0 / n for n in ns], errs)
    assert abs(fitted - 2) <= 0.2, f"fitted order {fitted:.3f}; {errs}"


def test_order_nonlinear_pytree():
    ns, errs = [8, 16, 32, 64], []
    exact = _exact(1.0)
    for n in ns:
        sol = dfx.diffeqsolve(dfx.ODETerm(_vf), RKC2(), 0.0, 1.0, 1.0 / n,
                              {k: jnp.asarray(v) for k, v in Y0.items()},
                              stepsize_controller=dfx.ConstantStepSize(), max_steps=64)
        errs.append(max(abs(float(sol.ys[k][-1]) - exact[k]) for k in exact))
    fitted = _slope([1.0 / n for n in ns], errs)
    assert abs(fitted - 2) <= 0.2, f"fitted order {fitted:.3f}; {errs}"


def test_order_of_error_estimate():
    # rkc.f's estimate 0.8 (y_n - y_n+1) + 0.4 h (f_n + f_n+1) is O(h^3): diffrax's
    # `error_order` (order + 1 = 3) is the exponent its controller uses.
    solver, term, t0 = RKC2(), dfx.ODETerm(_vf), 0.3
    assert solver.error_order(term) == 3
    y0 = {k: jnp.asarray(v) for k, v in _exact(t0).items()}
    state = solver.init(term, t0, t0 + 0.1, y0, None)
    hs, ests = [0.04, 0.02, 0.01, 0.005], []
    for h in hs:
        _, err, _, _, _ = solver.step(term, t0, t0 + h, y0, None, state, False)
        ests.append(float(jnp.linalg.norm(ravel_pytree(err)[0])))
    fitted = _slope(hs, ests)
    assert abs(fitted - 3) <= 0.2, f"estimate ~ h^{fitted:.3f}, expected h^3; {ests}"


def test_stiff_linear_large_steps():
    # Eigenvalues 1e-2 ... 1e4 (40, log-spaced) in a random basis, T = 100: Tsit5 needs
    # >= lambda_max T / 3.3 = 3e5 steps for stability alone. RKC2 takes steps up to thousands
    # of times 3.3 / lambda_max (s up to ~100 stages) and ends within 50 rtol of expm: the
    # controller bounds the error per step, so an order-2 method's global error is ~ tol^(2/3)
    # (13 rtol measured at rtol 1e-6).
    lam = jnp.logspace(-2.0, 4.0, 40)
    A = _symmetric(lam, jr.key(1))
    y0, T, tol = jnp.ones(40), 100.0, 1e-6
    exact = scipy.linalg.expm(-np.asarray(A) * T) @ np.asarray(y0)
    term = dfx.ODETerm(lambda t, y, args: -(A @ y))
    sol = dfx.diffeqsolve(term, RKC2(), 0.0, T, None, y0,
                          stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
                          max_steps=4096, saveat=dfx.SaveAt(steps=True, solver_state=True))
    accepted = int(sol.stats["num_accepted_steps"])
    ts = np.asarray(sol.ts)[:accepted]
    largest = float(np.max(np.diff(np.concatenate([[0.0], ts]))))
    limit = 3.3 / float(lam[-1])
    assert largest >= 1000 * limit, f"largest step {largest:.3g} against Tsit5's {limit:.3g}"
    steps = int(sol.stats["num_steps"])
    assert steps <= 0.01 * float(lam[-1]) * T / 3.3, f"{steps} steps"
    err = float(jnp.max(jnp.abs(sol.ys[accepted - 1] - exact)))
    assert err <= 50 * tol, f"final error {err:.3g} at rtol = atol = {tol:g}"
    # The spectral-radius estimate in the state bounds lambda_max from above (safety 1.2).
    rho = float(sol.solver_state[2])  # at t = T
    assert float(lam[-1]) <= rho <= 1.3 * float(lam[-1]), rho


@pytest.fixture(scope="module")
def deep_linear():
    """A small deep linear MLP (6 -> 8 -> 8 -> 3, 136 parameters) on inputs with column
    scales 1 ... 10: lambda_max(theta_0) ~ 800, lambda_max T ~ 1.6e4 at T = 20."""
    kx, kt, kw = jr.split(jr.key(0), 3)
    X = jr.normal(kx, (32, 6)) * jnp.logspace(0.0, 1.0, 6)
    sizes = (6, 8, 8, 3)
    loss = flowsim.losses.square(X, MLP(sizes, "linear", key=kt)(X))
    return MLP(sizes, "linear", key=kw), loss, 20.0


def test_gradient_flow_matches_tsit5(deep_linear):
    # Through flowsim.gradient_flow, against Tsit5 at rtol = atol = 1e-13. The final state's
    # relative error is 1.8e-6 at rtol 1e-8 and 3.9e-7 at rtol 1e-9 (order 2: ~ tol^(2/3)).
    net, loss, T = deep_linear
    assert float(flowsim.sharpness(net, loss)) * T >= 1e4
    ref = flowsim.gradient_flow(net, loss, T, solver="tsit5", rtol=1e-13, atol=1e-13)
    traj = flowsim.gradient_flow(net, loss, T, solver=RKC2(), rtol=1e-9, atol=1e-9,
                                 count_evals=True)
    y = ravel_pytree(traj.final_model().weights)[0]
    y_ref = ravel_pytree(ref.final_model().weights)[0]
    rel = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
    assert rel <= 1e-6, f"final relative error {rel:.3g}"
    # Fewer steps than Tsit5 at 1e-13 would be trivial; fewer gradients than Tsit5's stability
    # bound (6 per step, lambda_max T / 3.3 steps) is the point. Power iterations are cheap:
    # Hessian-vector products are a few percent of the gradients.
    grads, hvps = int(traj.stats["num_grad_evals"]), int(traj.stats["num_hvp_evals"])
    assert grads <= 0.5 * 6 * float(flowsim.sharpness(net, loss)) * T / 3.3, grads
    assert 0 < hvps <= 0.1 * grads, (grads, hvps)


def test_vmap_equals_single_solves(getkey):
    # One vmapped solve against one solve per member: each lane keeps its own steps, stage
    # counts and power iterations (only lanes due a refresh iterate).
    kx, kt = getkey(), getkey()
    X = jr.normal(kx, (16, 4)) * jnp.logspace(0.0, 1.0, 4)
    sizes = (4, 6, 6, 2)
    loss = flowsim.losses.square(X, MLP(sizes, "linear", key=kt)(X))
    nets = flowsim.init.batch(lambda k: MLP(sizes, "linear", key=k), 3, key=getkey())
    ts = jnp.linspace(0.0, 10.0, 5)
    solver = RKC2(refresh=7)
    batch = flowsim.gradient_flow(nets, loss, 10.0, ts=ts, solver=solver, rtol=1e-8,
                                  atol=1e-8, batched=True)
    for i in range(3):
        member = jax.tree.map(lambda x, i=i: x[i], nets)
        single = flowsim.gradient_flow(member, loss, 10.0, ts=ts, solver=solver, rtol=1e-8,
                                       atol=1e-8)
        assert tree_max_abs_diff(single.models, batch[i].models) <= 1e-10
        assert int(single.stats["num_steps"]) == int(batch.stats["num_steps"][i])


@pytest.mark.parametrize("kwargs", [{"max_stages": 1}, {"refresh": 0}, {"safety": 0.9},
                                    {"power_rtol": 0.0}, {"power_iters": 2.5}])
def test_bad_arguments(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}`"):
        RKC2(**kwargs)
