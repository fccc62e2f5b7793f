"""Losses, learning-rate schedules and problem generators, against NumPy formulas."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.optimize

import flowsim
from flowsim.models import MLP, MatrixFactorization, TwoLayerReLU

EPS = float(np.finfo(np.float64).eps)
# Losses are sums of <= 100 float64 terms of size O(1): relative error <= 100 eps ~ 2e-14.
RTOL = 1e-13


def _mlp(rng, sizes, activation="relu"):
    return MLP.from_weights([rng.normal(size=(b, a)) for a, b in zip(sizes, sizes[1:])],
                            activation)


def test_square_loss_value():
    rng = np.random.default_rng(0)
    net = _mlp(rng, (3, 4, 2))
    X, Y = rng.normal(size=(10, 3)), rng.normal(size=(10, 2))
    f = np.asarray(net(jnp.asarray(X)))
    expect = 0.5 * np.sum((f - Y) ** 2) / 10
    loss = flowsim.losses.square(X, Y)
    np.testing.assert_allclose(loss(net), expect, rtol=RTOL)
    assert loss(net).dtype == jnp.float64 and loss.X.dtype == loss.Y.dtype == jnp.float64
    # Scalar-output models: a width-1 MLP against Y of shape (n,), and TwoLayerReLU.
    one = _mlp(rng, (3, 4, 1))
    y = rng.normal(size=10)
    f1 = np.asarray(one(jnp.asarray(X)))[:, 0]
    np.testing.assert_allclose(flowsim.losses.square(X, y)(one), 0.5 * np.mean((f1 - y) ** 2),
                               rtol=RTOL)
    tl = TwoLayerReLU(rng.normal(size=(5, 3)), rng.normal(size=5))
    f2 = np.asarray(tl(jnp.asarray(X)))
    np.testing.assert_allclose(flowsim.losses.square(X, y)(tl), 0.5 * np.mean((f2 - y) ** 2),
                               rtol=RTOL)


def test_logistic_loss_value_and_large_margins():
    rng = np.random.default_rng(1)
    net = _mlp(rng, (3, 4, 1))
    X = rng.normal(size=(10, 3))
    y = np.where(rng.normal(size=10) > 0, 1.0, -1.0)
    f = np.asarray(net(jnp.asarray(X)))[:, 0]
    expect = np.mean(np.log1p(np.exp(-y * f)))
    np.testing.assert_allclose(flowsim.losses.logistic(X, y)(net), expect, rtol=RTOL)
    # Margins of +-1000: log(1 + e^-1000) = e^-1000 (0 in float64) and log(1 + e^1000) = 1000;
    # a naive log(1 + exp(.)) would overflow to inf.
    big = MLP.from_weights([np.ones((1, 1)) * 1000.0], "linear")
    loss = flowsim.losses.logistic(np.array([[1.0], [1.0]]), np.array([1.0, -1.0]))
    np.testing.assert_allclose(loss(big), 500.0, rtol=RTOL)
    assert np.isfinite(np.asarray(jax.grad(lambda w: loss(MLP.from_weights([w], "linear")))(
        jnp.ones((1, 1)) * 1000.0))).all()


def test_factorization_and_balancing_losses():
    rng = np.random.default_rng(2)
    U, V, M = rng.normal(size=(4, 2)), rng.normal(size=(3, 2)), rng.normal(size=(4, 3))
    mf = MatrixFactorization(U, V)
    base = flowsim.losses.factorization(M)
    np.testing.assert_allclose(base(mf), 0.5 * np.sum((U @ V.T - M) ** 2), rtol=RTOL)
    reg = flowsim.losses.balancing(base, 0.3)
    G = U.T @ U - V.T @ V
    np.testing.assert_allclose(reg(mf), 0.5 * np.sum((U @ V.T - M) ** 2)
                               + 0.3 / 8 * np.sum(G**2), rtol=RTOL)
    # A linear MLP's end-to-end matrix is factorised just as well.
    lin = MLP.from_weights([V.T, U], "linear")
    np.testing.assert_allclose(base(lin), base(mf), rtol=RTOL)


def test_power_decay_values():
    ks = np.arange(1000)
    for eta0, delta in ((0.1, 0.25), (2.0, 0.5), (0.3, 0.0), (1e-3, 1e-3)):
        sched = flowsim.schedules.power_decay(eta0, delta)
        got = np.asarray(jax.vmap(sched)(jnp.asarray(ks)))
        assert got.dtype == np.float64
        # XLA's pow against NumPy's: a few ulps (4 eps relative).
        np.testing.assert_allclose(got, eta0 * (ks + 1.0) ** -(0.5 + delta), rtol=4 * EPS)
    sched = flowsim.schedules.power_decay(0.1, 0.25)
    assert float(sched(0)) == 0.1
    np.testing.assert_allclose(jax.jit(lambda k: sched(k))(3), 0.1 * 4**-0.75, rtol=4 * EPS)
    # An optax schedule: optax.sgd(sched) steps by -eta_k g at count k.
    tx = optax.sgd(sched)
    params = jnp.ones(3)
    g = jnp.array([1.0, -2.0, 0.5])
    state = tx.init(params)
    for k in range(3):
        updates, state = tx.update(g, state, params)
        np.testing.assert_allclose(updates, -0.1 * (k + 1.0) ** -0.75 * np.asarray(g),
                                   rtol=4 * EPS)
    const = flowsim.schedules.constant(0.25)
    assert float(const(0)) == float(const(10**6)) == 0.25 and const(3).dtype == jnp.float64


def test_gaussian_regression_and_low_rank():
    X, Y = flowsim.data.gaussian_regression(200, 5, 2, key=jr.key(0))
    assert X.shape == (200, 5) and Y.shape == (200, 2)
    assert X.dtype == Y.dtype == jnp.float64
    # Rows ~ N(0, I/5): mean squared row norm 1, within 15% for 200 rows (std error ~4.5%).
    np.testing.assert_allclose(np.mean(np.sum(np.asarray(X) ** 2, 1)), 1.0, rtol=0.15)
    # Noise-free targets are linear in X: Y = X A^T exactly solvable by least squares.
    A, *_ = np.linalg.lstsq(np.asarray(X), np.asarray(Y), rcond=None)
    assert np.max(np.abs(np.asarray(X) @ A - np.asarray(Y))) < 1e-12
    M = flowsim.data.low_rank_matrix(6, 5, [3.0, 1.0], key=jr.key(1))
    s = np.linalg.svd(np.asarray(M), compute_uv=False)
    np.testing.assert_allclose(s, [3.0, 1.0, 0, 0, 0], rtol=0, atol=1e-14)


def test_spectral_factorization_closed_form():
    M, U0, V0, product_at = flowsim.data.spectral_factorization(
        5, 4, [2.0, 0.5], 1e-3, key=jr.key(2)
    )
    np.testing.assert_allclose(product_at(0.0), U0 @ V0.T, rtol=0, atol=1e-15)
    # t -> inf: the product converges to M (a(t) -> s); at t = 20, exp(-2 * 0.5 * 20) ~ 2e-9 is
    # multiplied by s/a0 = 500: distance ~1e-6.
    np.testing.assert_allclose(product_at(20.0), M, rtol=0, atol=1e-5)
    # Balanced: U0^T U0 = V0^T V0.
    np.testing.assert_allclose(U0.T @ U0, V0.T @ V0, rtol=0, atol=1e-15)


def test_separable_and_orthogonal_inputs():
    X, y = flowsim.data.separable(50, 4, margin=0.2, key=jr.key(3))
    assert X.shape == (50, 4) and y.shape == (50,) and X.dtype == y.dtype == jnp.float64
    assert set(np.unique(np.asarray(y)).tolist()) == {-1.0, 1.0}
    # Linearly separable: the LP "find w with y_i <w, x_i> >= 1 for all i" is feasible.
    A = -np.asarray(y)[:, None] * np.asarray(X)
    lp = scipy.optimize.linprog(np.zeros(4), A_ub=A, b_ub=-np.ones(50), bounds=(None, None))
    assert lp.status == 0, lp.message
    assert np.min(-A @ lp.x) >= 1 - 1e-9
    Z = flowsim.data.orthogonal_inputs(5, 8, key=jr.key(4))  # the shape test_invariants uses
    G = np.asarray(Z) @ np.asarray(Z).T
    np.testing.assert_allclose(G - np.diag(np.diag(G)), 0, atol=1e-15)
    norms = np.sqrt(np.diag(G))
    assert np.all((norms >= 0.5) & (norms <= 1.5))
    with pytest.raises(ValueError, match=r"`d` must be a positive integer, got 0"):
        flowsim.data.separable(5, 0, key=jr.key(0))
