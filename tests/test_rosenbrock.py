"""Rosenbrock solvers (flowsim._rosenbrock): orders, a closed-form flow, stiffness, vmap."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.integrate
from jax.flatten_util import ravel_pytree

import flowsim
from flowsim._rosenbrock import ROS34PW2, Rodas5P, _cholesky_or_lu, _FlatField
from flowsim.models import MatrixFactorization

from .helpers import (
    PYTREE_ODE_Y0,
    fitted_order,
    pytree_ode,
    pytree_ode_exact,
    tree_max_abs_diff,
)

# (solver, order of the method); ROS34PW2 with max_age=4 reuses a stale Jacobian for up to
# 4 steps, which a W-method's order must not notice. The test field's Jacobian is diagonal,
# so symmetric=True applies.
SOLVERS = [(Rodas5P(), 5), (Rodas5P(symmetric=True), 5), (ROS34PW2(max_age=4), 3)]
IDS = ["rodas5p", "rodas5p-sym", "ros34pw2-age4"]


_vf = pytree_ode
Y0 = PYTREE_ODE_Y0
_exact = pytree_ode_exact


def _y0():
    return {k: jnp.asarray(v) for k, v in Y0.items()}


def _max_err(y, ref):
    return max(abs(float(y[k]) - float(ref[k])) for k in ref)


_slope = fitted_order


@pytest.mark.parametrize("solver,order", SOLVERS, ids=IDS)
def test_order_of_convergence(solver, order):
    # Fixed steps (diffrax's test_ode_order): the global error at T shrinks as h^order.
    T = 1.0
    ns = [16, 32, 64, 128] if order == 5 else [32, 64, 128, 256]
    errs = []
    for n in ns:
        sol = dfx.diffeqsolve(dfx.ODETerm(_vf), solver, 0.0, T, T / n, _y0(),
                              stepsize_controller=dfx.ConstantStepSize(), max_steps=256)
        errs.append(_max_err(jax.tree.map(lambda x: x[-1], sol.ys), _exact(T)))
    fitted = _slope([T / n for n in ns], errs)
    assert abs(fitted - order) <= 0.2, f"fitted order {fitted:.3f}, nominal {order}; {errs}"


def test_order_of_dense_output():
    # Rodas5P's own interpolant is of order 4: its local error is O(h^5), so a quarter into
    # each step the error shrinks as h^5 like at the steps (a cubic Hermite: h^4).
    T, errs, hs = 1.0, [], []
    for n in (16, 32, 64, 128):
        ts = jnp.linspace(0.5, 1.0, 9)[:-1] + 0.25 / n
        sol = dfx.diffeqsolve(dfx.ODETerm(_vf), Rodas5P(), 0.0, T, T / n, _y0(),
                              stepsize_controller=dfx.ConstantStepSize(), max_steps=128,
                              saveat=dfx.SaveAt(ts=ts))
        errs.append(max(_max_err(jax.tree.map(lambda x, i=i: x[i], sol.ys), _exact(float(t)))
                        for i, t in enumerate(ts)))
        hs.append(T / n)
    fitted = _slope(hs, errs)
    assert abs(fitted - 5) <= 0.2, f"dense output ~ h^{fitted:.3f}, expected h^5; {errs}"


@pytest.mark.parametrize("solver,order", SOLVERS, ids=IDS)
def test_order_of_error_estimate(solver, order):
    # The embedded method has order `order - 1`, so one step's error estimate is O(h^order):
    # the exponent diffrax's controller uses (`error_order`).
    assert solver.error_order(dfx.ODETerm(_vf)) == order
    term, t0 = dfx.ODETerm(_vf), 0.3
    y0 = {k: jnp.asarray(v) for k, v in _exact(t0).items()}
    state = solver.init(term, t0, t0 + 0.1, y0, None)
    hs = [0.08, 0.04, 0.02, 0.01]
    ests = []
    for h in hs:
        _, err, _, _, _ = solver.step(term, t0, t0 + h, y0, None, state, False)
        ests.append(float(jnp.linalg.norm(ravel_pytree(err)[0])))
    fitted = _slope(hs, ests)
    assert abs(fitted - order) <= 0.2, f"estimate ~ h^{fitted:.3f}, expected h^{order}; {ests}"


@pytest.mark.parametrize("solver", [Rodas5P(symmetric=True), ROS34PW2()],
                         ids=["rodas5p-sym", "ros34pw2"])
def test_closed_form_balanced_factorization(solver):
    # Diagonal target, balanced init U = V = E diag(sqrt(a0)): each mode obeys a' = 2a(s - a),
    # a(t) = s / (1 + (s/a0 - 1) exp(-2 s t)); a0/s down to 3e-4 covers the sigmoidal
    # transition. The solution at `ts` comes from the solver's dense output.
    s = jnp.array([3.0, 1.0, 0.5])
    a0 = jnp.array([1e-3, 1e-2, 1e-1])
    M = jnp.zeros((6, 5)).at[jnp.arange(3), jnp.arange(3)].set(s)
    U0 = jnp.zeros((6, 3)).at[jnp.arange(3), jnp.arange(3)].set(jnp.sqrt(a0))
    V0 = jnp.zeros((5, 3)).at[jnp.arange(3), jnp.arange(3)].set(jnp.sqrt(a0))
    ts = jnp.linspace(0.0, 10.0, 11)
    traj = flowsim.gradient_flow(MatrixFactorization(U0, V0), flowsim.losses.factorization(M),
                                 10.0, ts=ts, solver=solver, rtol=1e-12, atol=1e-12)
    P = traj.models.U @ jnp.swapaxes(traj.models.V, -1, -2)

    def exact(t):
        a = s / (1 + (s / a0 - 1) * jnp.exp(-2 * s * t))
        return jnp.zeros((6, 5)).at[jnp.arange(3), jnp.arange(3)].set(a)

    ref = jax.vmap(exact)(ts)
    rel = jnp.linalg.norm(P - ref, axis=(1, 2)) / jnp.linalg.norm(ref, axis=(1, 2))
    assert float(jnp.max(rel)) <= 1e-9, f"max relative error {float(jnp.max(rel)):.3g}"


@pytest.fixture(scope="module")
def stiff():
    """The stiff factorization (as tests/test_flow.py) and its final state from scipy LSODA
    at rtol = atol = 1e-12 with the jitted JAX gradient and Hessian."""
    M = flowsim.data.low_rank_matrix(20, 20, [1.0, 1e-2, 1e-4], key=jr.key(1))
    mf = MatrixFactorization.random(20, 20, 3, scale=1e-3, key=jr.key(2))
    loss = flowsim.losses.factorization(M)
    params, static = eqx.partition(mf, eqx.is_inexact_array)
    y0, unravel = ravel_pytree(params)
    flat = lambda y: loss(eqx.combine(unravel(y), static))  # noqa: E731
    grad, hess = jax.jit(jax.grad(flat)), jax.jit(jax.hessian(flat))
    ref = scipy.integrate.solve_ivp(
        lambda t, y: -np.asarray(grad(y)), (0.0, 1e6), np.asarray(y0), method="LSODA",
        rtol=1e-12, atol=1e-12, jac=lambda t, y: -np.asarray(hess(y)))
    assert ref.success
    return mf, loss, ref.y[:, -1]


@pytest.mark.parametrize("solver,max_steps",
                         [(Rodas5P(), 400), (Rodas5P(symmetric=True), 400), (ROS34PW2(), 2000)],
                         ids=["rodas5p", "rodas5p-sym", "ros34pw2"])
def test_stiff_factorization(stiff, solver, max_steps):
    # lambda_max T ~ 2e6: an explicit solver needs > 6e5 steps for stability alone
    # (tests/test_flow.py). Rodas5P takes ~150 steps at rtol 1e-8, ROS34PW2 ~ 700.
    mf, loss, ref = stiff
    traj = flowsim.gradient_flow(mf, loss, 1e6, solver=solver, rtol=1e-8, atol=1e-8,
                                 max_steps=max_steps)
    y = ravel_pytree(eqx.filter(traj.final_model(), eqx.is_inexact_array))[0]
    rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    assert rel < 1e-6, f"final relative error {rel:.3g} against LSODA at 1e-12"
    assert float(traj.loss[-1]) <= 1e-20, float(traj.loss[-1])


@pytest.mark.parametrize("solver", [Rodas5P(symmetric=True), ROS34PW2(max_age=5)],
                         ids=["rodas5p-sym", "ros34pw2"])
def test_vmap_equals_single_solves(getkey, solver):
    # Batched (one vmapped solve) against one solve per member; each lane keeps its own steps,
    # and ROS34PW2's lanes refresh their decomposition exactly when they would alone.
    M = flowsim.data.low_rank_matrix(6, 5, [2.0, 0.5], key=getkey())
    loss = flowsim.losses.factorization(M)
    make = lambda k: MatrixFactorization.random(6, 5, 2, scale=0.1, key=k)  # noqa: E731
    nets = flowsim.init.batch(make, 3, key=getkey())
    ts = jnp.linspace(0.0, 20.0, 5)
    batch = flowsim.gradient_flow(nets, loss, 20.0, ts=ts, solver=solver, rtol=1e-9, atol=1e-9,
                                  batched=True)
    for i in range(3):
        member = jax.tree.map(lambda x, i=i: x[i], nets)
        single = flowsim.gradient_flow(member, loss, 20.0, ts=ts, solver=solver, rtol=1e-9,
                                       atol=1e-9)
        assert tree_max_abs_diff(single.models, batch[i].models) <= 1e-12
        assert int(single.stats["num_steps"]) == int(batch.stats["num_steps"][i])


def test_symmetric_jacobian_equals_full(getkey):
    # symmetric=True differentiates only the lower block triangle (leaf by leaf) and mirrors
    # it: on an MLP's -Hessian (4 leaves) it must equal the full Jacobian to rounding, and the
    # full one the flat jax.hessian.
    X, Y = jr.normal(getkey(), (8, 3)), jr.normal(getkey(), (8, 2))
    loss = flowsim.losses.square(X, Y)
    net = flowsim.models.MLP((3, 4, 3, 3, 2), "tanh", use_bias=True, key=getkey())
    params, static = eqx.partition(net, eqx.is_inexact_array)
    grad = jax.grad(lambda p: loss(eqx.combine(p, static)))
    term = dfx.ODETerm(lambda t, p, args: jax.tree.map(jnp.negative, grad(p)))
    y, unravel = ravel_pytree(params)
    assert len(jax.tree.leaves(params)) >= 4
    field = _FlatField(term, None, unravel)
    f0, J = jax.jit(lambda z: field.jacobian(0.0, z))(y)
    f0s, Js = jax.jit(lambda z: field.jacobian(0.0, z, symmetric=True))(y)
    H = jax.jit(jax.hessian(lambda z: loss(eqx.combine(unravel(z), static))))(y)
    scale = float(jnp.max(jnp.abs(H)))
    assert float(jnp.max(jnp.abs(J + H))) <= 1e-13 * scale
    assert float(jnp.max(jnp.abs(Js - J))) <= 1e-13 * scale
    assert bool(jnp.all(Js == Js.T))
    assert float(jnp.max(jnp.abs(f0s - f0))) == 0.0


def test_cholesky_or_lu_solves_definite_and_indefinite():
    # Cholesky where I - gamma h J is positive definite, LU where it is not; under vmap each
    # lane takes its own factorization. Both solve M x = b to rounding.
    key = jr.key(0)
    A = jr.normal(key, (6, 6))
    S = (A + A.T) / 2
    definite = jnp.eye(6) + 0.01 * S
    indefinite = jnp.eye(6) - 10.0 * S
    b = jnp.arange(1.0, 7.0)

    def solve(M):
        lower, upper, perm = _cholesky_or_lu(M)
        x = jax.scipy.linalg.solve_triangular(lower, b[perm], lower=True)
        return jax.scipy.linalg.solve_triangular(upper, x, lower=False)

    for M in (definite, indefinite):
        assert float(jnp.max(jnp.abs(M @ solve(M) - b))) <= 1e-12
    assert bool(jnp.all(jnp.isfinite(jax.lax.linalg.cholesky(definite))))
    assert not bool(jnp.all(jnp.isfinite(jax.lax.linalg.cholesky(indefinite))))
    both = jax.vmap(solve)(jnp.stack([definite, indefinite]))
    assert float(jnp.max(jnp.abs(both[0] - solve(definite)))) == 0.0
    assert float(jnp.max(jnp.abs(both[1] - solve(indefinite)))) == 0.0
