"""The balance invariants (Du, Hu, Lee 2018) and the GD drift ledger, checked to rounding."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import flowsim
from flowsim import invariants
from flowsim.invariants import NotConservedWarning, gd_drift_ledger
from flowsim.models import MLP, ConvNet, MatrixFactorization, TwoLayerReLU

EPS = float(np.finfo(np.float64).eps)  # 2.2e-16

# The ledger bound. One GD step theta' = fl(theta - eta g) changes a unit's gap by exactly
# eta^2 (|g_in|^2 - |g_out|^2) in exact arithmetic (the first-order term
# -2 eta (<theta_in, g_in> - <theta_out, g_out>) vanishes by homogeneity). In float64 each step
# adds: the rounding of the update, |fl(x) - x| <= eps/2 |x| per entry, which moves a squared
# norm by <= eps |theta|^2; the rounding of the computed gradient, which leaves the first-order
# term at a few eps |theta|^2 (eta |g| <= |theta| here); and the rounding of the ledger's sums.
# Summed in the worst case (linearly, not as a random walk) over K steps:
#     |measured - predicted| <= C * eps * K * max_k |theta_k|^2,  with C = 10.
# Observed discrepancies (4e-15 to 4e-14) sit ~1e3 below this bound (2e-11 to 2e-10); a real
# defect (a missed eta^2 term, a wrong unit map, a non-homogeneous activation) lands >= 1e3 above
# it (see the tanh control), and the drifts themselves (2e-4 to 6) are >= 1e6 above it.
C_LEDGER = 10.0
# The bound must be negligible next to the drift it checks, else agreement proves nothing.
MEANINGFUL = 1e-3


def _max_abs(tree):
    return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _sq_norms(traj):
    """max over saved states of |theta|^2, per trajectory."""
    leaves = jax.tree.leaves(eqx.filter(traj.models, eqx.is_inexact_array))
    lead = traj.ts.ndim
    total = sum(jnp.sum(x**2, axis=tuple(range(lead, x.ndim))) for x in leaves)
    return jnp.max(total, axis=-1)


def ledger_bound(traj, steps):
    return C_LEDGER * EPS * steps * float(np.max(_sq_norms(traj)))


@eqx.filter_jit
def _ledgers(traj, loss):
    # One compilation for everything the check needs (eagerly, each small op would compile on
    # its own, which costs more than the GD run itself).
    return (gd_drift_ledger(traj), gd_drift_ledger(traj, loss),
            invariants.drift(traj, invariants.layer_gaps), _sq_norms(traj))


def check_ledger(traj, loss, steps):
    """Measured drift of every unit gap and every layer gap == the ledger's prediction, both the
    one recorded during the run and the one recomputed from the saved iterates with `loss`."""
    recorded, recomputed, layer_measured, sq = _ledgers(traj, loss)
    bound = C_LEDGER * EPS * steps * float(np.max(sq))
    unit_drift = _max_abs(recorded.measured)
    layer_drift = _max_abs(layer_measured)  # measured independently of the ledger
    assert bound < MEANINGFUL * unit_drift, (bound, unit_drift)
    assert bound < MEANINGFUL * layer_drift, (bound, layer_drift)
    for name, ledger in (("recorded", recorded), ("recomputed", recomputed)):
        unit_err = float(ledger.max_discrepancy())
        layer_err = max(_max_abs(layer_measured - ledger.layer_predicted),
                        _max_abs(ledger.layer_measured - ledger.layer_predicted))
        assert unit_err <= bound, f"{name}: unit gaps off by {unit_err:.3g} > bound {bound:.3g}"
        assert layer_err <= bound, f"{name}: layer gaps off by {layer_err:.3g} > bound {bound:.3g}"
    agree = max(_max_abs(a - b) for a, b in zip(recorded.predicted, recomputed.predicted))
    assert agree <= bound, f"recorded and recomputed predictions differ by {agree:.3g}"
    return {"bound": bound, "unit_drift": unit_drift, "layer_drift": layer_drift,
            "error": float(recorded.max_discrepancy()),
            "error_recomputed": float(recomputed.max_discrepancy())}


def _mlp(rng, sizes, activation, use_bias):
    extra = int(use_bias)
    ws = [rng.normal(size=(b, a + extra)) / np.sqrt(a) for a, b in zip(sizes, sizes[1:])]
    return MLP.from_weights(ws, activation, use_bias=use_bias)


def _data(rng, n, d, d_out, loss):
    X = rng.normal(size=(n, d))
    if loss == "logistic":
        return flowsim.losses.logistic(X, np.where(rng.normal(size=n) > 0, 1.0, -1.0))
    return flowsim.losses.square(X, rng.normal(size=(n, d_out)))


# Depth 2-4 weight layers; each activation with both losses; biases on and off.
MLP_CASES = [
    ((4, 6, 3), "linear", "square", False),
    ((4, 5, 5, 1), "linear", "logistic", True),
    ((4, 6, 5, 4, 3), "relu", "square", True),
    ((4, 6, 5, 1), "relu", "logistic", False),
    ((4, 6, 5, 3), "leaky_relu", "square", False),
    ((4, 5, 6, 4, 1), "leaky_relu", "logistic", True),
]


@pytest.mark.parametrize("sizes,activation,loss_kind,use_bias", MLP_CASES)
def test_gd_drift_ledger_mlp(sizes, activation, loss_kind, use_bias):
    rng = np.random.default_rng(len(sizes) + 7 * use_bias)
    net = _mlp(rng, sizes, activation, use_bias)
    loss = _data(rng, 20, sizes[0], sizes[-1], loss_kind)
    # Alternate a constant step and the decaying schedule of Thm 3.1 (eta_k varies per step).
    lr = 0.2 if use_bias else flowsim.schedules.power_decay(0.4, 0.25)
    traj = flowsim.gradient_descent(net, loss, 1000, learning_rate=lr)
    assert float(traj.loss[-1]) < float(traj.loss[0])
    check_ledger(traj, loss, 1000)


def test_gd_drift_ledger_convnet():
    """Thm 2.3: shared filters; a unit is a channel (filter in, next layer's channel out)."""
    rng = np.random.default_rng(11)
    template = eqx.filter_eval_shape(lambda: ConvNet((2, 6, 6), (3, 4), 2, key=jr.key(0)))
    filters = (rng.normal(size=(3, 2, 3, 3)) / 4.0, rng.normal(size=(4, 3, 3, 3)) / 5.0)
    head = rng.normal(size=(2, 16)) / 4.0
    net = eqx.tree_at(lambda m: (m.filters, m.head), template,
                      (tuple(map(jnp.asarray, filters)), jnp.asarray(head)))
    loss = flowsim.losses.square(rng.normal(size=(8, 2, 6, 6)), rng.normal(size=(8, 2)))
    traj = flowsim.gradient_descent(net, loss, 1000, learning_rate=0.05)
    assert float(traj.loss[-1]) < 0.1 * float(traj.loss[0])
    check_ledger(traj, loss, 1000)


def test_gd_drift_ledger_matrix_factorization():
    rng = np.random.default_rng(12)
    M = flowsim.data.low_rank_matrix(6, 5, [3.0, 1.0], key=jr.key(1))
    mf = MatrixFactorization(0.5 * rng.normal(size=(6, 3)), 0.5 * rng.normal(size=(5, 3)))
    loss = flowsim.losses.factorization(M)
    traj = flowsim.gradient_descent(mf, loss, 1000,
                                    learning_rate=flowsim.schedules.power_decay(0.2, 0.25))
    assert float(traj.loss[-1]) < 1e-3 * float(traj.loss[0])
    check_ledger(traj, loss, 1000)


def test_gd_drift_ledger_two_layer_relu():
    rng = np.random.default_rng(13)
    X = flowsim.data.orthogonal_inputs(5, 8, key=jr.key(2))
    net = TwoLayerReLU(0.5 * rng.normal(size=(10, 8)), 0.5 * rng.normal(size=10))
    loss = flowsim.losses.square(X, rng.normal(size=5))
    traj = flowsim.gradient_descent(net, loss, 1000, learning_rate=0.5)
    assert float(traj.loss[-1]) < float(traj.loss[0])
    check_ledger(traj, loss, 1000)


@settings(max_examples=2, deadline=None, derandomize=True, database=None)
@given(
    depth=st.integers(2, 4),
    widths=st.lists(st.integers(2, 5), min_size=3, max_size=3),
    activation=st.sampled_from(["linear", "relu", "leaky_relu"]),
    loss_kind=st.sampled_from(["square", "logistic"]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_gd_drift_ledger_random_architectures(depth, widths, activation, loss_kind, use_bias,
                                              seed):
    rng = np.random.default_rng(seed)
    d_out = 1 if loss_kind == "logistic" else widths[-1]
    sizes = (3, *widths[: depth - 1], d_out)
    net = _mlp(rng, sizes, activation, use_bias)
    loss = _data(rng, 12, 3, d_out, loss_kind)
    traj = flowsim.gradient_descent(net, loss, 1000, learning_rate=0.2)
    check_ledger(traj, loss, 1000)


def test_gd_drift_ledger_fails_for_tanh():
    """Control: for tanh the first-order term does not vanish, and the ledger check fails by far
    more than its bound, so the checks above can fail."""
    rng = np.random.default_rng(14)
    net = _mlp(rng, (4, 6, 3), "tanh", False)
    loss = _data(rng, 20, 4, 3, "square")
    traj = flowsim.gradient_descent(net, loss, 1000, learning_rate=0.2)
    with pytest.warns(NotConservedWarning, match="not positively homogeneous"):
        ledger = gd_drift_ledger(traj)
    err = float(ledger.max_discrepancy())
    assert err > 1e3 * ledger_bound(traj, 1000), err


@eqx.filter_jit
def _flow_rate(quantity, model, loss):
    """d/dt quantity(theta(t)) along the gradient flow d theta/dt = -grad L, by a JVP."""
    grad = eqx.filter_grad(loss)(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tangent = jax.tree.map(jnp.negative, eqx.filter(grad, eqx.is_inexact_array))
    _, rate = jax.jvp(lambda p: quantity(eqx.combine(p, static)), (params,), (tangent,))
    size = sum(x.size for x in jax.tree.leaves(params))
    biggest = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves((params, tangent))]
    half = len(biggest) // 2
    return rate, 2 * size * jnp.max(jnp.stack(biggest[:half])) * jnp.max(jnp.stack(biggest[half:]))


def test_flow_conserves_gaps_instantaneously():
    """Thm 2.1 / 2.2 / 2.3 at the level of the vector field: the flow's rate of change of every
    conserved quantity is zero up to rounding (a dot product of P terms of size s errs by at
    most P * eps * s, with s = 2 max|theta| max|g|; we allow 100x that)."""
    rng = np.random.default_rng(16)
    X, Y = rng.normal(size=(10, 4)), rng.normal(size=(10, 3))
    loss = flowsim.losses.square(X, Y)
    relu = _mlp(rng, (4, 6, 5, 3), "relu", True)
    linear = _mlp(rng, (4, 6, 5, 3), "linear", False)
    for model, quantity in ((relu, invariants.neuron_gaps), (linear, invariants.gram_gaps),
                            (relu, invariants.layer_gaps)):
        rate, scale = _flow_rate(quantity, model, loss)
        assert _max_abs(rate) <= 100 * EPS * float(scale), (quantity.__name__, _max_abs(rate))
    # Controls: off the diagonal, W_h W_h^T - W_{h+1}^T W_{h+1} moves for ReLU (Thm 2.2 needs
    # a linear activation), and tanh breaks even the per-neuron gaps.
    def gram_unchecked(m):
        return tuple(i @ i.T - o @ o.T for i, o in m.hidden_units())

    rate, scale = _flow_rate(gram_unchecked, relu, loss)
    assert _max_abs(rate) > 1e6 * EPS * float(scale)
    tanh = _mlp(rng, (4, 6, 5, 3), "tanh", False)
    with pytest.warns(NotConservedWarning):
        invariants.neuron_gaps(tanh)
    with warnings.catch_warnings():  # warned just above; jit would warn once, at trace time
        warnings.simplefilter("ignore", NotConservedWarning)
        rate, scale = _flow_rate(invariants.neuron_gaps, tanh, loss)
    assert _max_abs(rate) > 1e6 * EPS * float(scale)


def test_gram_gaps():
    rng = np.random.default_rng(17)
    linear = _mlp(rng, (4, 6, 5, 3), "linear", False)
    grams = invariants.gram_gaps(linear)
    w = [np.asarray(x) for x in linear.weights]
    for h, g in enumerate(grams):
        expect = w[h] @ w[h].T - w[h + 1].T @ w[h + 1]
        np.testing.assert_allclose(g, expect, rtol=1e-12, atol=1e-13)
        # Its diagonal is the per-neuron gap.
        np.testing.assert_allclose(np.diag(g), invariants.neuron_gaps(linear)[h], rtol=1e-12,
                                   atol=1e-13)
    relu = _mlp(rng, (4, 6, 3), "relu", False)
    with pytest.raises(ValueError, match=r"gram_gaps needs linear activations \(Thm 2\.2\), got "
                                         r"\('relu',\); use neuron_gaps"):
        invariants.gram_gaps(relu)


def test_tanh_not_conserved_warning():
    net = _mlp(np.random.default_rng(18), (4, 6, 3), "tanh", False)
    for fn in (invariants.neuron_gaps, invariants.layer_gaps, invariants.layer_norms):
        with pytest.warns(NotConservedWarning, match=r"activations \('tanh',\): not positively "
                                                     r"homogeneous"):
            fn(net)


def _unit(rng, d):
    v = rng.normal(size=d)
    return v / np.linalg.norm(v)


def test_alignment_and_rank_ratio_rank_one():
    """Hand-made rank-1, aligned linear net W_h = s_h u_h u_{h-1}^T: alignment 1, rank ratio 0.
    Both come from an SVD in float64, accurate to ~eps * (matrix size): 1e-12 is safe."""
    rng = np.random.default_rng(19)
    dims = (4, 6, 5, 3)
    us = [_unit(rng, d) for d in dims]
    ws = [s * np.outer(us[h + 1], us[h]) for h, s in enumerate((2.0, 0.5, 3.0))]
    net = MLP.from_weights(ws, "linear")
    np.testing.assert_allclose(invariants.alignment(net), [1.0, 1.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(invariants.rank_ratio(net), [0.0, 0.0, 0.0], rtol=0, atol=1e-12)
    # Control: a middle layer reading a direction orthogonal to u_1 is misaligned with W_1.
    w_perp = rng.normal(size=6)
    w_perp = w_perp - (w_perp @ us[1]) * us[1]
    w_perp /= np.linalg.norm(w_perp)
    bad = MLP.from_weights((ws[0], 0.5 * np.outer(us[2], w_perp), ws[2]), "linear")
    np.testing.assert_allclose(invariants.alignment(bad), [0.0, 1.0], rtol=0, atol=1e-12)
    # And a full-rank Gaussian layer is far from rank one.
    gauss = MLP.from_weights([rng.normal(size=(6, 4)), rng.normal(size=(3, 6))], "linear")
    assert np.all(np.asarray(invariants.rank_ratio(gauss)) > 0.05)
    # Matrix factorization: layers (V^T, U); rank-1 aligned when U = a p q^T, V = b r q^T.
    p, q, r = _unit(rng, 5), _unit(rng, 2), _unit(rng, 4)
    mf = MatrixFactorization(2 * np.outer(p, q), 3 * np.outer(r, q))
    np.testing.assert_allclose(invariants.alignment(mf), [1.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(invariants.rank_ratio(mf), [0.0, 0.0], rtol=0, atol=1e-12)


def test_drift_and_layer_norms_along_a_trajectory():
    # MLP_CASES[0] again (already compiled): 1000 steps of a linear net.
    rng = np.random.default_rng(3)
    net = _mlp(rng, (4, 6, 3), "linear", False)
    loss = _data(rng, 20, 4, 3, "square")
    traj = flowsim.gradient_descent(net, loss, 1000,
                                    learning_rate=flowsim.schedules.power_decay(0.4, 0.25))
    d = np.asarray(invariants.drift(traj))
    assert d.shape == (1001, 1)
    assert np.all(d[0] == 0.0), "drift is measured from the first saved state"
    w = [np.asarray(x) for x in traj.models.weights]
    gaps = (w[0] ** 2).sum((1, 2)) - (w[1] ** 2).sum((1, 2))
    # Differences of O(1) sums of squares: 1e-13 absolute.
    np.testing.assert_allclose(d[:, 0], gaps - gaps[0], rtol=0, atol=1e-13)
    norms = np.asarray(invariants.layer_norms(traj.models))
    np.testing.assert_allclose(norms[:, 0], (w[0] ** 2).sum((1, 2)) + (w[1] ** 2).sum((1, 2)),
                               rtol=1e-13)
    nd = invariants.drift(traj, invariants.neuron_gaps)
    assert [x.shape for x in nd] == [(1001, 6)]
    gd = invariants.drift(traj, invariants.gram_gaps)
    assert [x.shape for x in gd] == [(1001, 6, 6)]
    np.testing.assert_allclose(np.diagonal(gd[0], axis1=1, axis2=2), nd[0], rtol=0, atol=1e-13)
