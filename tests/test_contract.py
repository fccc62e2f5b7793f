"""The model / loss contract: activations as modules, abstract-or-final models, data losses."""

import warnings
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowsim
from flowsim import invariants
from flowsim._exact.problem import _per_point, supports_kinks
from flowsim.losses import AbstractDataLoss, Logistic, Square
from flowsim.models import (
    MLP,
    AbstractActivation,
    AbstractModel,
    AbstractPiecewiseLinear,
    ConvNet,
    LeakyReLU,
    Linear,
    MatrixFactorization,
    ReLU,
    Tanh,
    TwoLayerReLU,
    as_activation,
)

# Entries on both sides of 0, 0 itself (both signs), tiny and large values.
Z = jnp.array([-3.5, -1e-300, -0.0, 0.0, 1e-300, 0.25, 7.0, -1e3, 1e3])


def _bits(x):
    return np.asarray(x).view(np.int64)


class Absolute(AbstractPiecewiseLinear):
    """|x|: slopes -1 and +1, a user-defined homogeneous activation."""

    has_kinks: ClassVar[bool] = True

    def __call__(self, x):
        return jnp.abs(x)

    def patterned(self, z, mask):
        return (2 * mask - 1) * z


class ScaledReLU(AbstractPiecewiseLinear):
    """scale * relu(x)."""

    scale: float = eqx.field(static=True)
    has_kinks: ClassVar[bool] = True

    def __call__(self, x):
        return self.scale * jax.nn.relu(x)

    def patterned(self, z, mask):
        return self.scale * mask * z


@pytest.mark.parametrize("act, homogeneous, piecewise_linear, has_kinks", [
    (Linear(), True, True, False),
    (ReLU(), True, True, True),
    (LeakyReLU(), True, True, True),
    (LeakyReLU(0.3), True, True, True),
    (Tanh(), False, False, False),
    (Absolute(), True, True, True),
])
def test_activation_properties(act, homogeneous, piecewise_linear, has_kinks):
    assert isinstance(act, AbstractActivation)
    assert act.homogeneous is homogeneous
    assert act.piecewise_linear is piecewise_linear
    assert act.has_kinks is has_kinks
    assert isinstance(act, AbstractPiecewiseLinear) is piecewise_linear
    if homogeneous:  # sigma(c x) = c sigma(x), c a power of two: no rounding
        np.testing.assert_array_equal(act(4.0 * Z), 4.0 * act(Z))


def test_activations_are_the_old_formulas_bitwise():
    """Each activation computes what the string-named ones did, bit for bit (signed zeros
    included), eagerly and under jit; so do their patterned forms on every mask value."""
    old = {
        Linear(): lambda x: x,
        ReLU(): jax.nn.relu,
        LeakyReLU(): lambda x: jnp.where(x >= 0, x, 0.01 * x),
        LeakyReLU(0.2): lambda x: jnp.where(x >= 0, x, 0.2 * x),
        Tanh(): jnp.tanh,
    }
    old_patterned = {
        Linear(): lambda z, m: z,
        ReLU(): lambda z, m: m * z,
        LeakyReLU(): lambda z, m: (0.01 + (1 - 0.01) * m) * z,
        LeakyReLU(0.2): lambda z, m: (0.2 + (1 - 0.2) * m) * z,
    }
    mask = jnp.linspace(0.0, 1.0, Z.shape[0])
    for act, fn in old.items():
        np.testing.assert_array_equal(_bits(act(Z)), _bits(fn(Z)), err_msg=repr(act))
        np.testing.assert_array_equal(_bits(jax.jit(act)(Z)), _bits(fn(Z)), err_msg=repr(act))
    for act, fn in old_patterned.items():
        np.testing.assert_array_equal(_bits(act.patterned(Z, mask)), _bits(fn(Z, mask)),
                                      err_msg=repr(act))


@pytest.mark.parametrize("act", [Linear(), ReLU(), LeakyReLU(), LeakyReLU(0.2), Absolute(),
                                 ScaledReLU(3.0)])
def test_patterned_on_the_sign_pattern_is_the_activation(act):
    """On mask = 1[z > 0] the patterned activation is sigma itself (equal as numbers: a
    masked-off entry may be -0.0), and it is linear in z for a fixed mask."""
    mask = (Z > 0).astype(Z.dtype)
    np.testing.assert_array_equal(act.patterned(Z, mask), act(Z))
    z2 = jnp.flip(Z)
    np.testing.assert_allclose(act.patterned(Z + z2, mask),
                               act.patterned(Z, mask) + act.patterned(z2, mask),
                               rtol=1e-15, atol=0)


def test_as_activation():
    assert as_activation("linear") == Linear() and as_activation("relu") == ReLU()
    assert as_activation("tanh") == Tanh() and as_activation("leaky_relu") == LeakyReLU(0.01)
    assert as_activation("leaky_relu", negative_slope=0.2) == LeakyReLU(0.2)
    assert as_activation("relu", negative_slope=0.2) == ReLU()  # only leaky takes it
    act = Absolute()
    assert as_activation(act) is act
    msg = r"`activation` must be one of 'linear', 'relu', 'leaky_relu', 'tanh', got 'gelu'"
    with pytest.raises(ValueError, match=msg):
        as_activation("gelu")
    with pytest.raises(ValueError, match=msg):
        MLP((3, 4, 2), "gelu", key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"`activation` must be a name .* or a "
                                        r"flowsim.models.AbstractActivation \(subclass it"):
        MLP((3, 4, 2), jnp.tanh, key=jax.random.key(0))


def test_models_accept_activation_modules():
    """A string shortcut and its module build the same model (same static part, same treedef:
    a jit compiled for one serves the other)."""
    w = (np.arange(6.0).reshape(3, 2) - 2.5, np.arange(3.0).reshape(1, 3) - 1.0)
    by_name = MLP.from_weights(w, "leaky_relu", negative_slope=0.2)
    by_module = MLP.from_weights(w, LeakyReLU(0.2))
    assert by_name.activation == by_module.activation == LeakyReLU(negative_slope=0.2)
    assert jax.tree.structure(by_name) == jax.tree.structure(by_module)
    static = [eqx.partition(m, eqx.is_array)[1] for m in (by_name, by_module)]
    assert hash(static[0]) == hash(static[1]) and repr(static[0]) == repr(static[1])
    assert repr(by_module.activation) == "LeakyReLU(negative_slope=0.2)"
    conv = ConvNet((1, 6, 6), (2, 2), 1, activation=Tanh(), key=jax.random.key(0))
    assert conv.activations == (Tanh(), Tanh()) and not conv.is_homogeneous


def test_model_properties_from_activations():
    key = jax.random.key(0)
    cases = [
        (MLP((2, 3, 3, 1), "relu", key=key), True, True),
        (MLP((2, 3, 1), "leaky_relu", key=key), True, True),
        (MLP((2, 3, 1), "linear", key=key), True, False),
        (MLP((2, 3, 1), "tanh", key=key), False, False),
        (MLP((2, 3, 1), Absolute(), key=key), True, True),
        (TwoLayerReLU(np.ones((3, 2)), np.ones(3)), True, True),
        (MatrixFactorization(np.ones((3, 2)), np.ones((4, 2))), True, False),
    ]
    for model, homogeneous, has_kinks in cases:
        assert model.is_homogeneous is homogeneous, model
        assert model.has_kinks is has_kinks, model
    assert cases[0][0].activations == (ReLU(), ReLU())
    assert cases[5][0].activations == (ReLU(),) and cases[6][0].activations == (Linear(),)


def test_user_activation_in_an_mlp():
    """|x| as a user module: the forward pass, the patterned pass, and the rescaling symmetry
    of a homogeneous activation (so the balance gaps are invariants: no warning)."""
    rng = np.random.default_rng(0)
    W1, W2 = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    x = rng.normal(size=(5, 3))
    net = MLP.from_weights((W1, W2), Absolute())
    assert net.is_homogeneous and net.has_kinks
    # NumPy reference; a float64 product of this size: 1e-13.
    np.testing.assert_allclose(net(jnp.asarray(x)), np.abs(x @ W1.T) @ W2.T, rtol=1e-13)
    out, (z,) = net.forward(jnp.asarray(x))
    mask = (z > 0).astype(z.dtype)
    np.testing.assert_array_equal(net.forward(jnp.asarray(x), (mask,))[0], out)
    c = jnp.array([0.5, 2.0, 1.5, 0.7])
    scaled = MLP.from_weights((W1 * c[:, None], W2 / c[None, :]), Absolute())
    np.testing.assert_allclose(scaled(jnp.asarray(x)), out, rtol=1e-13, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert invariants.layer_gaps(net).shape == (1,)
    with pytest.raises(ValueError, match=r"gram_gaps needs linear activations \(Thm 2\.2\)"):
        invariants.gram_gaps(net)


def test_tanh_has_no_pattern():
    net = MLP((2, 3, 1), "tanh", key=jax.random.key(0))
    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"activation Tanh\(\) is not an AbstractPiecewiseLinear"):
        net.forward(x, (jnp.ones((4, 3)),))


def test_user_activation_exact_kinks():
    """The exact-kink path takes a user piecewise-linear activation. For
    sigma = c relu, theta(t) = c^-1/2 theta_relu(c t) with theta_relu(0) = c^1/2 theta(0)
    (one hidden layer: the loss is L_relu(c^1/2 theta)). Both solves cross a kink; their
    steps differ, so they agree to ~ rtol x steps (1e-9 allowed at rtol 1e-12)."""
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(6, 2)), rng.normal(size=(6, 1))
    W1, W2 = rng.normal(size=(4, 2)), rng.normal(size=(1, 4))
    c = 4.0
    loss = flowsim.losses.square(X, Y)
    kw = dict(kinks="exact", rtol=1e-12, atol=1e-12)
    scaled = flowsim.gradient_flow(MLP.from_weights((W1, W2), ScaledReLU(c)), loss, 1.0,
                                   ts=[0.5, 1.0], **kw)
    relu = flowsim.gradient_flow(MLP.from_weights((c**0.5 * W1, c**0.5 * W2), "relu"), loss,
                                 c, ts=[0.5 * c, c], **kw)
    assert int(np.sum(np.asarray(scaled.events.valid))) >= 1
    for a, b in zip(scaled.models.weights, relu.models.weights):
        np.testing.assert_allclose(a, b / c**0.5, rtol=0, atol=1e-9)


def test_abstract_classes_cannot_be_instantiated():
    for cls in (AbstractActivation, AbstractPiecewiseLinear, AbstractModel, AbstractDataLoss):
        with pytest.raises(TypeError, match="abstract"):
            cls()

    class NoKinksFlag(AbstractPiecewiseLinear):
        def __call__(self, x):
            return x

        def patterned(self, z, mask):
            return z

    with pytest.raises(TypeError, match="abstract"):
        NoKinksFlag()


def test_abstract_or_final():
    """Concrete classes implement the abstract methods and override nothing concrete: the
    models' `__call__` is AbstractModel's (output of `forward`)."""
    for cls in (MLP, ConvNet, MatrixFactorization, TwoLayerReLU):
        assert cls.__call__ is AbstractModel.__call__, cls
        assert "forward" in vars(cls), cls
        assert not hasattr(cls, "is_piecewise_linear"), cls
    for cls in (Square, Logistic):
        assert "__call__" in vars(cls) and "targets" in vars(cls)


def test_data_losses():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    y = np.where(rng.normal(size=5) > 0, 1.0, -1.0)
    sq, lg = flowsim.losses.square(X, Y), flowsim.losses.logistic(X, y)
    assert isinstance(sq, Square) and isinstance(lg, Logistic)
    for loss, targets in ((sq, Y), (lg, y)):
        assert isinstance(loss, AbstractDataLoss) and loss.per_point and _per_point(loss)
        np.testing.assert_array_equal(loss.X, X)
        np.testing.assert_array_equal(loss.targets, targets)
    fac = flowsim.losses.factorization(np.eye(2))
    for loss in (fac, flowsim.losses.balancing(fac, 1.0)):
        assert not isinstance(loss, AbstractDataLoss) and not _per_point(loss)


def test_user_data_loss_and_kinks_support():
    """A user's AbstractDataLoss: the exact path supports it (not per point here), a loss that
    merely has an `X` field is not a data loss."""

    class Cubic(AbstractDataLoss):
        X: jax.Array
        Y: jax.Array
        per_point: ClassVar[bool] = False

        @property
        def targets(self):
            return self.Y

        def __call__(self, model):
            return jnp.sum((model(self.X) - self.Y) ** 2) ** 1.5

    class HasX(eqx.Module):
        X: jax.Array

        def __call__(self, model):
            return jnp.sum(model(self.X))

    X, Y = jnp.ones((3, 2)), jnp.zeros((3, 1))
    relu = MLP((2, 3, 1), "relu", key=jax.random.key(0))
    assert supports_kinks(relu, Cubic(X, Y)) and not _per_point(Cubic(X, Y))
    assert not supports_kinks(relu, HasX(X))
    assert supports_kinks(MLP((2, 3, 1), Absolute(), key=jax.random.key(0)), Cubic(X, Y))
    for model in (MLP((2, 3, 1), "linear", key=jax.random.key(0)),
                  MLP((2, 3, 1), "tanh", key=jax.random.key(0))):
        assert not supports_kinks(model, Cubic(X, Y))


def test_problem_inputs_from_the_data_loss():
    p = flowsim.problems.mlp((3, 4, 2), n=6)
    assert p.inputs is p.loss.X and p.activation == ReLU()
    leaky = flowsim.problems.mlp((3, 4, 2), n=6, activation="leaky_relu", negative_slope=0.2)
    assert leaky.init(jax.random.key(0)).activation == LeakyReLU(0.2)
    f = flowsim.problems.factorization((3, 3), 1, (1.0,))
    assert f.inputs is None
