"""Models: shapes, forward order, hidden units, the rescaling symmetry, float64; and init.

Speed: eager JAX compiles every new (op, shape) pair separately, so models are built and applied
inside a few jit-compiled helpers, and reference computations are done in NumPy.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import flowsim
from flowsim import invariants
from flowsim.models import (
    MLP,
    ConvNet,
    LeakyReLU,
    Linear,
    MatrixFactorization,
    ReLU,
    TwoLayerReLU,
)

# Tolerances. A float64 forward pass rounds each operation at relative 2^-53 ~ 1.1e-16; these
# small networks chain at most ~100 roundings, so 1e-12 (relative; 1e-13 absolute for entries
# near 0) is a generous bound for "the same function computed two ways", yet 1e9 times smaller
# than the effect of a wrong unit map (the tanh / permuted-unit controls move outputs by > 1e-3).
RTOL = 1e-12
ATOL = 1e-13

MODEL_NAMES = [
    "mlp-relu", "mlp-leaky-bias", "mlp-linear-bias", "conv-relu", "conv-leaky",
    "matrix-factorization", "two-layer-relu",
]


def conv_from_arrays(in_shape, filters, head, activation="relu"):
    """A ConvNet holding the given filters and head (its structure built abstractly)."""
    filters = tuple(jnp.asarray(f) for f in filters)
    template = eqx.filter_eval_shape(
        lambda: ConvNet(in_shape, [f.shape[0] for f in filters], head.shape[0],
                        kernel_size=filters[0].shape[-1], activation=activation, key=jr.key(0))
    )
    return eqx.tree_at(lambda m: (m.filters, m.head), template, (filters, jnp.asarray(head)))


def _models(seed):
    """Every model family with an input batch, from NumPy draws: JAX's random kernels take
    seconds to compile per shape on a loaded CPU, and these tests need no JAX randomness."""
    rng = np.random.default_rng(seed)

    def n(*shape, scale=1.0):
        return scale * rng.normal(size=shape)

    x3 = jnp.asarray(n(7, 3))
    return {
        "mlp-relu": (MLP.from_weights((n(5, 3), n(4, 5), n(2, 4)), "relu"), x3),
        "mlp-leaky-bias": (
            MLP.from_weights((n(4, 4), n(4, 5), n(2, 5)), "leaky_relu", negative_slope=0.2,
                             use_bias=True),
            x3,
        ),
        "mlp-linear-bias": (MLP.from_weights((n(4, 4), n(2, 5)), "linear", use_bias=True), x3),
        "conv-relu": (
            conv_from_arrays((2, 6, 6), (n(3, 2, 3, 3), n(4, 3, 3, 3)), n(2, 4 * 2 * 2)),
            jnp.asarray(n(5, 2, 6, 6)),
        ),
        "conv-leaky": (
            conv_from_arrays((1, 5, 5), (n(2, 1, 2, 2), n(3, 2, 2, 2), n(2, 3, 2, 2)),
                             n(3, 2 * 2 * 2), "leaky_relu"),
            jnp.asarray(n(5, 1, 5, 5)),
        ),
        "matrix-factorization": (MatrixFactorization(n(4, 2), n(3, 2)), x3),
        "two-layer-relu": (TwoLayerReLU(n(6, 3), n(6)), x3),
    }


@eqx.filter_jit
def _apply(model, x):
    return model(x)


@eqx.filter_jit
def _rescale_by_hidden_units(model, h, c):
    """Scales the incoming parameters of unit i of hidden layer h by c[i] and its outgoing ones
    by 1/c[i], finding them *only* through `model.hidden_units()`: that map is linear slicing, so
    its transpose scatters a per-unit array back onto the parameters. If `hidden_units`
    mislabels any parameter, the rescaled network computes a different function."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def part(which):
        return lambda p: eqx.combine(p, static).hidden_units()[h][which]

    factor = jax.tree.map(jnp.ones_like, params)
    for which, scale in ((0, c), (1, 1.0 / c)):
        shape = part(which)(params).shape
        (scatter,) = jax.linear_transpose(part(which), zeros)(
            jnp.broadcast_to((scale - 1.0)[:, None], shape)
        )
        factor = jax.tree.map(jnp.add, factor, scatter)
    return eqx.combine(jax.tree.map(jnp.multiply, params, factor), static)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def test_float64_by_default():
    for name, (model, x) in _models(0).items():
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array))}
        assert dtypes == {jnp.dtype(jnp.float64)}, (name, dtypes)
        assert all(w.dtype == jnp.float64 for w in model.layers), name
        assert _apply(model, x).dtype == jnp.float64, name
    # Random initialisations (their dtypes, read abstractly: nothing is drawn).
    key = jr.key(0)
    for make in (lambda: MLP((3, 4, 2), key=key), lambda: ConvNet((1, 5, 5), (2, 2), 1, key=key),
                 lambda: MatrixFactorization.random(3, 2, 1, key=key),
                 lambda: TwoLayerReLU.random(3, 4, key=key)):
        leaves = jax.tree.leaves(eqx.filter_eval_shape(make))
        assert leaves and {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float64)}, leaves
    # Integer data are promoted to float64, never kept integral or downcast.
    mf = MatrixFactorization(np.ones((2, 1), int), np.ones((3, 1), int))
    assert mf.U.dtype == mf.V.dtype == jnp.float64
    tl = TwoLayerReLU(np.ones((2, 3), int), np.ones(2, int))
    assert tl.W.dtype == tl.a.dtype == jnp.float64


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hidden_units_rescaling_symmetry(name):
    """Thm 2.1 / 2.3's symmetry: scaling a unit's incoming parameters by c > 0 and its outgoing
    ones by 1/c leaves a homogeneous network unchanged, with units as `hidden_units` says."""
    model, x = _models(1)[name]
    assert model.is_homogeneous
    out = np.asarray(_apply(model, x))
    rng = np.random.default_rng(0)
    for h, (inc, _) in enumerate(model.hidden_units()):
        c = jnp.asarray(rng.uniform(0.3, 3.0, inc.shape[0]))
        rescaled = _rescale_by_hidden_units(model, h, c)
        moved = max(np.abs(a - b).max() for a, b in zip(*_np((model.layers, rescaled.layers))))
        assert moved > 1e-2, "the rescaling must actually move the parameters"
        np.testing.assert_allclose(_apply(rescaled, x), out, rtol=RTOL, atol=ATOL)


def test_rescaling_controls():
    """The symmetry test can fail: tanh is not homogeneous, and a wrong unit map breaks it."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    x = jnp.asarray(rng.normal(size=(7, 3)))
    c = jnp.array([0.5, 2.0, 1.5, 0.7])
    tanh = MLP.from_weights((w1, w2), "tanh")
    assert not tanh.is_homogeneous
    moved = np.abs(_apply(_rescale_by_hidden_units(tanh, 0, c), x) - _apply(tanh, x)).max()
    assert moved > 1e-3, f"tanh output should change under unit rescaling, moved {moved}"
    relu = MLP.from_weights((w1, w2), "relu")
    wrong = MLP.from_weights((w1 * c[:, None], w2 / c[::-1][None, :]), "relu")  # units permuted
    moved = np.abs(_apply(wrong, x) - _apply(relu, x)).max()
    assert moved > 1e-3, f"a mismatched rescaling should change the output, moved {moved}"


@pytest.mark.parametrize("activation", ["linear", "relu", "leaky_relu"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_mlp_explicit_unit_rescaling(activation, use_bias):
    """Row i of W_h (its bias included) times c_i, column i of W_{h+1} times 1/c_i: same net."""
    rng = np.random.default_rng(2)
    extra = int(use_bias)
    w1, w2, w3 = (rng.normal(size=s) for s in ((6, 4 + extra), (5, 6 + extra), (3, 5 + extra)))
    x = jnp.asarray(rng.normal(size=(9, 4)))
    c1, c2 = rng.uniform(0.2, 5.0, 6), rng.uniform(0.2, 5.0, 5)
    inv1 = np.concatenate([1 / c1, np.ones(extra)])  # W_{h+1}'s bias column is no unit's
    inv2 = np.concatenate([1 / c2, np.ones(extra)])
    net = MLP.from_weights((w1, w2, w3), activation, use_bias=use_bias)
    scaled = MLP.from_weights(
        (w1 * c1[:, None], w2 * inv1[None, :] * c2[:, None], w3 * inv2[None, :]),
        activation, use_bias=use_bias,
    )
    np.testing.assert_allclose(_apply(scaled, x), _apply(net, x), rtol=RTOL, atol=ATOL)


def test_convnet_per_channel_rescaling():
    """Channel i of conv h: filter i times c_i, channel i of the next filters (or of the dense
    head) times 1/c_i. For ReLU the output is unchanged: the symmetry behind Thm 2.3."""
    net, x = _models(2)["conv-relu"]
    k1, k2 = (np.asarray(f) for f in net.filters)
    rng = np.random.default_rng(3)
    c1, c2 = rng.uniform(0.2, 5.0, 3), rng.uniform(0.2, 5.0, 4)
    head = np.asarray(net.head).reshape(2, 4, -1) / c2[None, :, None]
    new = ((k1 * c1[:, None, None, None], k2 * c2[:, None, None, None] / c1[None, :, None, None]),
           head.reshape(net.head.shape))
    scaled = eqx.tree_at(lambda m: (m.filters, m.head), net, jax.tree.map(jnp.asarray, new))
    np.testing.assert_allclose(_apply(scaled, x), _apply(net, x), rtol=RTOL, atol=ATOL)
    # Control: with tanh channels the same rescaling changes the output.
    tanh0 = conv_from_arrays((2, 6, 6), net.filters, net.head, "tanh")
    tanh = conv_from_arrays((2, 6, 6), scaled.filters, scaled.head, "tanh")
    assert np.abs(_apply(tanh, x) - _apply(tanh0, x)).max() > 1e-3


def test_hidden_units_partition_layers_and_gaps():
    """Every parameter of layer h is an incoming parameter of exactly one unit between h and h+1,
    and the layer gap is the sum of the neuron gaps (Cor 2.1 from Thm 2.1)."""
    for name, (model, _) in _models(3).items():
        units = _np(model.hidden_units())
        layers = _np(model.layers)
        assert len(units) == len(layers) - 1 == len(model.activations), name
        for h, (inc, out) in enumerate(units):
            assert inc.shape[0] == out.shape[0], "one outgoing row per unit"
            # The same squares summed in another order: relative 1e-12.
            np.testing.assert_allclose((inc**2).sum(), (layers[h] ** 2).sum(), rtol=RTOL)
            assert (out**2).sum() <= (layers[h + 1] ** 2).sum() * (1 + RTOL), name
        layer = np.asarray(invariants.layer_gaps(model))
        neuron = _np(invariants.neuron_gaps(model))
        sums = np.array([n.sum() for n in neuron])
        direct = np.array([(i**2).sum() - (o**2).sum() for i, o in units])
        # Sums of <= 50 terms of size <= 10 in float64: error <= 50 * 10 * eps ~ 1e-13.
        np.testing.assert_allclose(layer, sums, rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(layer, direct, rtol=0, atol=1e-12, err_msg=name)


def test_layer_gap_is_frobenius_gap_without_bias():
    model, _ = _models(4)["mlp-relu"]
    w = _np(model.weights)
    expect = [(w[h] ** 2).sum() - (w[h + 1] ** 2).sum() for h in range(2)]
    np.testing.assert_allclose(invariants.layer_gaps(model), expect, rtol=RTOL, atol=ATOL)
    # With biases, W_{h+1}'s bias column is not an outgoing parameter of layer h's units.
    model, _ = _models(4)["mlp-leaky-bias"]
    w = _np(model.weights)
    expect = [(w[h] ** 2).sum() - (w[h + 1][:, :-1] ** 2).sum() for h in range(2)]
    np.testing.assert_allclose(invariants.layer_gaps(model), expect, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("use_bias", [False, True])
def test_mlp_shapes_and_forward_order(use_bias):
    rng = np.random.default_rng(4)
    extra = int(use_bias)
    shapes = [(6, 4 + extra), (5, 6 + extra), (3, 5 + extra)]
    weights = [rng.normal(size=s) for s in shapes]
    net = MLP.from_weights(weights, "leaky_relu", negative_slope=0.1, use_bias=use_bias)
    assert [w.shape for w in net.layers] == shapes
    assert net.sizes == (4, 6, 5, 3)
    assert net.activations == (LeakyReLU(0.1),) * 2
    x = rng.normal(size=(8, 4))
    a = x  # NumPy reference: .layers applied in order, activation between layers only
    for h, w in enumerate(weights):
        a = a @ w[:, : w.shape[1] - extra].T + (w[:, -1] if use_bias else 0.0)
        if h < 2:
            a = np.where(a >= 0, a, 0.1 * a)
    np.testing.assert_allclose(_apply(net, jnp.asarray(x)), a, rtol=RTOL, atol=ATOL)
    units = net.hidden_units()
    assert [(i.shape, o.shape) for i, o in units] == [((6, 4 + extra), (6, 5)),
                                                      ((5, 6 + extra), (5, 3))]
    drawn = eqx.filter_eval_shape(lambda: MLP((4, 6, 5, 3), use_bias=use_bias, key=jr.key(0)))
    assert [w.shape for w in drawn.layers] == shapes


def test_mlp_init_scale_and_end_to_end():
    net = MLP((400, 300, 1), "relu", key=jr.key(5))
    # Default std 1/sqrt(fan_in): the sample variance of 120,000 N(0, 1/400) entries is within
    # 5% of 1/400 (its relative standard error is sqrt(2/120000) ~ 0.4%).
    np.testing.assert_allclose(np.var(np.asarray(net.weights[0])) * 400, 1.0, rtol=0.05)
    zero = MLP((400, 300, 1), init_std=0.0, key=jr.key(5))
    assert all(np.abs(np.asarray(w)).max() == 0.0 for w in zero.weights)
    rng = np.random.default_rng(5)
    w1, w2, w3 = rng.normal(size=(3, 4)), rng.normal(size=(5, 3)), rng.normal(size=(2, 5))
    lin = MLP.from_weights((w1, w2, w3), "linear")
    np.testing.assert_allclose(lin.end_to_end(), w3 @ w2 @ w1, rtol=RTOL, atol=ATOL)
    x = rng.normal(size=(6, 4))
    np.testing.assert_allclose(_apply(lin, jnp.asarray(x)), x @ (w3 @ w2 @ w1).T,
                               rtol=RTOL, atol=ATOL)


def _np_conv(x, k):
    """Valid cross-correlation (NCHW input, OIHW filters) in NumPy."""
    win = np.lib.stride_tricks.sliding_window_view(x, k.shape[-2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, k)


def test_convnet_shapes_and_forward():
    for name, k, act in (("conv-relu", 3, lambda a: np.maximum(a, 0)),
                         ("conv-leaky", 2, lambda a: np.where(a >= 0, a, 0.01 * a))):
        net, x = _models(6)[name]
        chans = [f.shape[0] for f in net.filters]
        c_in, hgt, wid = net.in_shape
        ins = [c_in, *chans[:-1]]
        assert [f.shape for f in net.filters] == [(co, ci, k, k) for co, ci in zip(chans, ins)]
        side = (hgt - len(chans) * (k - 1)) * (wid - len(chans) * (k - 1))
        assert net.head.shape[1] == chans[-1] * side
        assert len(net.layers) == len(chans) + 1
        assert net.layers[0] is net.filters[0] and net.layers[-1] is net.head
        assert net.activations == (net.activation,) * len(chans)
        a = np.asarray(x)
        for f in net.filters:
            a = act(_np_conv(a, np.asarray(f)))
        expect = a.reshape(a.shape[0], -1) @ np.asarray(net.head).T
        np.testing.assert_allclose(_apply(net, x), expect, rtol=RTOL, atol=ATOL, err_msg=name)
    net, _ = _models(6)["conv-relu"]
    units = net.hidden_units()
    assert [(i.shape, o.shape) for i, o in units] == [((3, 18), (3, 36)), ((4, 27), (4, 8))]


def test_matrix_factorization():
    rng = np.random.default_rng(7)
    U, V = rng.normal(size=(5, 2)), rng.normal(size=(4, 2))
    mf = MatrixFactorization(U, V)
    np.testing.assert_allclose(mf.end_to_end(), U @ V.T, rtol=RTOL, atol=ATOL)
    W1, W2 = _np(mf.layers)
    np.testing.assert_array_equal(W1, V.T)  # forward order: x -> V^T x -> U (V^T x)
    np.testing.assert_array_equal(W2, U)
    x = rng.normal(size=(3, 4))
    np.testing.assert_allclose(_apply(mf, jnp.asarray(x)), x @ V @ U.T, rtol=RTOL, atol=ATOL)
    ((inc, out),) = _np(mf.hidden_units())
    np.testing.assert_array_equal(inc, V.T)  # unit j: column j of V in, column j of U out
    np.testing.assert_array_equal(out, U.T)
    assert mf.activations == (Linear(),)
    rnd = MatrixFactorization.random(30, 40, 20, scale=1e-2, key=jr.key(7))
    assert rnd.U.shape == (30, 20) and rnd.V.shape == (40, 20)
    # 600 N(0, 1e-4) entries: the sample std is within 10% of 1e-2 (standard error ~3%).
    np.testing.assert_allclose(np.std(np.asarray(rnd.U)), 1e-2, rtol=0.1)


def test_two_layer_relu():
    rng = np.random.default_rng(8)
    W, a, x = rng.normal(size=(6, 3)), rng.normal(size=6), rng.normal(size=(8, 3))
    net = TwoLayerReLU(W, a)
    expect = np.array([sum(a[j] * max(W[j] @ xi, 0.0) for j in range(6)) for xi in x])
    np.testing.assert_allclose(_apply(net, jnp.asarray(x)), expect, rtol=RTOL, atol=ATOL)
    assert _apply(net, jnp.asarray(x)).shape == (8,)
    vn = sum(abs(a[j]) * np.linalg.norm(W[j]) for j in range(6))
    np.testing.assert_allclose(net.variation_norm(), vn, rtol=RTOL)
    # Output and variation norm are invariant under (w_j, a_j) -> (c_j w_j, a_j / c_j).
    c = rng.uniform(0.2, 5.0, 6)
    scaled = TwoLayerReLU(W * c[:, None], a / c)
    np.testing.assert_allclose(scaled.variation_norm(), vn, rtol=RTOL)
    np.testing.assert_allclose(_apply(scaled, jnp.asarray(x)), expect, rtol=RTOL, atol=ATOL)
    assert [l.shape for l in net.layers] == [(6, 3), (6,)]
    ((inc, out),) = net.hidden_units()
    assert inc.shape == (6, 3) and out.shape == (6, 1)
    rnd = TwoLayerReLU.random(3, 6, key=jr.key(8))
    assert rnd.W.shape == (6, 3) and rnd.a.shape == (6,)


def test_hidden_units_with_leading_batch_axes():
    """hidden_units() and the invariants work on batched (or time-stacked) models."""
    members = [_models(seed)["mlp-linear-bias"][0] for seed in range(4)]
    nets = jax.tree.map(lambda *a: jnp.stack(a), *members)
    ((inc, out),) = nets.hidden_units()
    assert inc.shape == (4, 4, 4) and out.shape == (4, 4, 2)
    gaps = np.asarray(invariants.layer_gaps(nets))
    assert gaps.shape == (4, 1)
    w1, w2 = _np(nets.weights)
    expect = (w1**2).sum((1, 2)) - (w2[:, :, :-1] ** 2).sum((1, 2))
    np.testing.assert_allclose(gaps[:, 0], expect, rtol=RTOL)
    conv, _ = _models(9)["conv-relu"]
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a, 3 * a]), conv)
    assert [i.shape for i, _ in stacked.hidden_units()] == [(3, 3, 18), (3, 4, 27)]
    # Scaling every parameter by s scales every gap by s^2.
    np.testing.assert_allclose(invariants.layer_gaps(stacked),
                               np.outer([1, 4, 9], invariants.layer_gaps(conv)), rtol=RTOL)


def test_init_batch_and_scale():
    key = jr.key(10)
    # The batch test_descent.py trains (same shapes: JAX reuses the compiled draws).
    nets = flowsim.init.batch(lambda k: MLP((3, 5, 2), "relu", use_bias=True, key=k), 16,
                              key=key)
    assert nets.weights[0].shape == (16, 5, 4)
    keys = jr.split(key, 16)
    single = MLP((3, 5, 2), "relu", use_bias=True, key=keys[3])  # member b is make(split[b])
    np.testing.assert_allclose(nets.weights[1][3], single.weights[1], rtol=RTOL)
    w = np.asarray(nets.weights[0])
    assert np.abs(w[0] - w[1]).max() > 0.1, "members are independent draws"
    small = flowsim.init.scale(nets, 1e-3)
    np.testing.assert_allclose(small.weights[0], 1e-3 * w, rtol=RTOL)
    assert small.activation == ReLU() and small.use_bias


def test_balanced_stds_fig2():
    sizes = (1000, 100, 100, 10)
    stds = flowsim.init.balanced_stds(sizes, 1e-4)
    # Du, Hu, Lee Fig 2: variances 1e-4/100, 1e-4/10, 1e-4; E||W_h||_F^2 = 0.1 for every layer.
    np.testing.assert_allclose(np.square(stds), [1e-6, 1e-5, 1e-4], rtol=1e-14)
    params = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    np.testing.assert_allclose([p * s**2 for p, s in zip(params, stds)], 0.1, rtol=1e-14)
