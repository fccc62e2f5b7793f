"""Bad input gets one clear message; divergence is reported per trajectory."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import flowsim
from flowsim import invariants
from flowsim.models import MLP, ConvNet, MatrixFactorization, TwoLayerReLU

from .helpers import tree_max_abs_diff


def _net(sizes=(3, 4, 2), activation="relu", seed=0):
    rng = np.random.default_rng(seed)
    return MLP.from_weights([rng.normal(size=(b, a)) for a, b in zip(sizes, sizes[1:])],
                            activation)


def _square(n=10, d=3, d_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return flowsim.losses.square(rng.normal(size=(n, d)), rng.normal(size=(n, d_out)))


def test_data_model_shape_mismatch():
    with pytest.raises(ValueError, match=r"inputs must have shape \(n, 4\) for an MLP with sizes "
                                         r"\(4, 4, 2\), got \(10, 3\)"):
        flowsim.gradient_descent(_net((4, 4, 2)), _square(), 10, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"model output has shape \(10, 3\) but targets `Y` have "
                                         r"shape \(10, 2\); make the model's output width match"):
        flowsim.gradient_descent(_net((3, 4, 3)), _square(), 10, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"`X` has 10 samples but `Y` has 4; they must match"):
        flowsim.losses.square(np.zeros((10, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"inputs must have shape \(n, 2, 6, 6\), got "
                                         r"\(10, 3\)"):
        conv = eqx.filter_eval_shape(lambda: ConvNet((2, 6, 6), (2, 2), 2, key=jr.key(0)))
        conv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), conv)
        flowsim.gradient_descent(conv, _square(), 10, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"logistic loss needs one output per sample, shape "
                                         r"\(10,\), but the model outputs \(10, 2\)"):
        loss = flowsim.losses.logistic(np.zeros((10, 3)), np.ones(10))
        flowsim.gradient_descent(_net(), loss, 10, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"the model's product has shape \(3, 2\) but `M` has "
                                         r"shape \(3, 3\)"):
        mf = MatrixFactorization(np.ones((3, 1)), np.ones((2, 1)))
        flowsim.gradient_descent(mf, flowsim.losses.factorization(np.eye(3)), 10,
                                 learning_rate=0.1)
    with pytest.raises(TypeError, match=r"the factorization loss needs a model with end_to_end\(\)"
                                        r" \(MatrixFactorization or a linear MLP\), got "
                                        r"TwoLayerReLU"):
        flowsim.losses.factorization(np.eye(3))(TwoLayerReLU(np.ones((2, 3)), np.ones(2)))


def test_unknown_activation():
    msg = (r"`activation` must be one of 'linear', 'relu', 'leaky_relu', 'tanh', got "
           r"'sigmoid'")
    with pytest.raises(ValueError, match=msg):
        MLP((3, 4, 2), "sigmoid", key=jr.key(0))
    with pytest.raises(ValueError, match=msg):
        MLP.from_weights([np.ones((4, 3)), np.ones((2, 4))], "sigmoid")
    with pytest.raises(ValueError, match=msg):
        ConvNet((1, 5, 5), (2, 2), 1, activation="sigmoid", key=jr.key(0))


@pytest.mark.parametrize("delta", [0.7, -0.1, math.nan])
def test_invalid_delta(delta):
    with pytest.raises(ValueError, match=rf"`delta` must be in \[0, 1/2\], got {delta}"):
        flowsim.schedules.power_decay(0.1, delta)


@pytest.mark.parametrize("eta0", [0, -1, math.nan, math.inf])
def test_invalid_eta0(eta0):
    with pytest.raises(ValueError, match=rf"`eta0` must be a positive finite float, got {eta0}"):
        flowsim.schedules.power_decay(eta0, 0.25)
    with pytest.raises(ValueError, match=rf"`eta0` must be a positive finite float, got {eta0}"):
        flowsim.schedules.constant(eta0)
    with pytest.raises(ValueError, match=rf"`learning_rate` must be positive and finite, got "
                                         rf"{eta0}"):
        flowsim.gradient_descent(_net(), _square(), 10, learning_rate=eta0)


def test_invalid_types_for_schedule_and_learning_rate():
    with pytest.raises(TypeError, match=r"`eta0` must be a positive float, got None"):
        flowsim.schedules.power_decay(None, 0.25)
    with pytest.raises(TypeError, match=r"`delta` must be a float in \[0, 1/2\], got 'a'"):
        flowsim.schedules.power_decay(0.1, "a")
    with pytest.raises(TypeError, match=r"`learning_rate` must be a positive float or an optax "
                                        r"schedule, got '0.1'"):
        flowsim.gradient_descent(_net(), _square(), 10, learning_rate="0.1")
    with pytest.raises(ValueError, match=r"`learning_rate` schedule must give a positive finite "
                                         r"scalar at step 0, got -0.1"):
        flowsim.gradient_descent(_net(), _square(), 10, learning_rate=lambda k: -0.1)


def test_steps_and_save_every():
    with pytest.raises(ValueError, match=r"`save_every` must be a positive integer dividing "
                                         r"steps=10, got 3"):
        flowsim.gradient_descent(_net(), _square(), 10, learning_rate=0.1, save_every=3)
    with pytest.raises(ValueError, match=r"`save_every` must be a positive integer dividing "
                                         r"steps=10, got 0"):
        flowsim.gradient_descent(_net(), _square(), 10, learning_rate=0.1, save_every=0)
    for steps in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=rf"`steps` must be a positive integer, got "
                                             rf"{steps!r}"):
            flowsim.gradient_descent(_net(), _square(), steps, learning_rate=0.1)


def test_logistic_labels():
    X = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"`y` must hold labels -1 and \+1, got values \[0\. 1\.\]"
                                         r" \(for 0/1 labels pass 2\*y - 1\)"):
        flowsim.losses.logistic(X, [0.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"`y` must hold labels -1 and \+1, got values "
                                         r"\[-1\.  2\.\]$"):
        flowsim.losses.logistic(X, [-1.0, 2.0, 2.0, -1.0])
    with pytest.raises(ValueError, match=r"`y` must have shape \(n,\), got \(4, 1\)"):
        flowsim.losses.logistic(X, np.ones((4, 1)))


def test_bad_model_and_loss_arguments():
    with pytest.raises(ValueError, match=r"`batched=True` needs every model array to carry the "
                                         r"same leading batch axis, got leading sizes \[2, 4\]"):
        flowsim.gradient_descent(_net(), _square(), 10, learning_rate=0.1, batched=True)
    with pytest.raises(TypeError, match=r"`loss` must be a callable model -> scalar, got ndarray"):
        flowsim.gradient_descent(_net(), np.zeros(3), 10, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"`loss` must return a floating scalar, got \(10, 2\)"):
        flowsim.gradient_descent(_net(), lambda m: m(jnp.zeros((10, 3))), 10, learning_rate=0.1)
    with pytest.raises(TypeError, match=r"`model` has no floating-point arrays to train"):
        flowsim.gradient_descent(lambda x: x, _square(), 10, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"`sizes` must list at least two positive integer "
                                         r"widths"):
        MLP((3,), key=jr.key(0))
    with pytest.raises(ValueError, match=r"`init_std` must have one entry per layer \(2\), got 3"):
        MLP((3, 4, 2), init_std=(1.0, 1.0, 1.0), key=jr.key(0))
    with pytest.raises(ValueError, match=r"`init_std` must be non-negative, got \[1\.0, -1\.0\]"):
        MLP((3, 4, 2), init_std=(1.0, -1.0), key=jr.key(0))
    with pytest.raises(ValueError, match=r"`weights\[1\]` has shape \(2, 5\), which does not "
                                         r"follow `weights\[0\]` of shape \(4, 3\)"):
        MLP.from_weights([np.ones((4, 3)), np.ones((2, 5))])
    with pytest.raises(ValueError, match=r"`U` and `V` must be 2-d with the same number of "
                                         r"columns \(the rank\), got U \(3, 2\) and V \(4, 1\)"):
        MatrixFactorization(np.ones((3, 2)), np.ones((4, 1)))
    with pytest.raises(ValueError, match=r"`W` must have shape \(m, d\) and `a` shape \(m,\), got "
                                         r"W \(3, 2\) and a \(4,\)"):
        TwoLayerReLU(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match=r"input \(1, 4, 4\) is too small for 2 valid "
                                         r"convolutions of kernel_size=3"):
        ConvNet((1, 4, 4), (2, 2), 1, key=jr.key(0))
    with pytest.raises(ValueError, match=r"`lam` must be non-negative, got -1"):
        flowsim.losses.balancing(flowsim.losses.factorization(np.eye(2)), -1)
    with pytest.raises(ValueError, match=r"`size` must be a positive integer, got 0"):
        flowsim.init.batch(lambda k: _net(), 0, key=jr.key(0))
    with pytest.raises(ValueError, match=r"at most d = 3 pairwise orthogonal inputs exist, got "
                                         r"n = 4"):
        flowsim.data.orthogonal_inputs(4, 3, key=jr.key(0))
    with pytest.raises(ValueError, match=r"rank 3 exceeds min\(m, n\) = 2"):
        flowsim.data.low_rank_matrix(2, 4, [1.0, 1.0, 1.0], key=jr.key(0))
    with pytest.raises(ValueError, match=r"`n` must be a positive integer, got 0"):
        flowsim.data.gaussian_regression(0, 3, 1, key=jr.key(0))


def _diverging_batch():
    """Four linear nets; members 1 and 3 are scaled up 30x, too large for the step 0.1."""
    rng = np.random.default_rng(3)
    ws = [rng.normal(size=(4, 4, 3)) / np.sqrt(3), rng.normal(size=(4, 1, 4)) / 2.0]
    scale = np.array([1.0, 30.0, 1.0, 30.0])[:, None, None]
    nets = MLP.from_weights([w[0] for w in ws], "linear")
    nets = eqx.tree_at(lambda m: m.weights, nets, tuple(jnp.asarray(w * scale) for w in ws))
    loss = _square(d_out=1, seed=3)
    return nets, loss


def test_divergence_is_reported_per_trajectory():
    nets, loss = _diverging_batch()
    with pytest.warns(flowsim.DivergenceWarning) as record:
        traj = flowsim.gradient_descent(nets, loss, 40, learning_rate=0.1, batched=True)
    div = np.asarray(traj.stats["diverged_at"])
    assert div[0] == div[2] == -1 and div[1] > 0 and div[3] > 0, div
    assert len(record) == 1
    msg = str(record[0].message)
    assert f"trajectory 1 at step {div[1]}, trajectory 3 at step {div[3]}" in msg, msg
    assert "trajectory 0" not in msg and "trajectory 2" not in msg, msg
    assert np.array_equal(np.asarray(traj.succeeded), [True, False, True, False])
    assert np.array_equal(np.asarray(traj.result == flowsim.RESULTS.diverged),
                          [False, True, False, True])

    for b in (1, 3):
        sel = traj[b]
        loss_b = np.asarray(sel.loss)
        assert np.all(np.isfinite(loss_b[: div[b]])) and np.all(np.isnan(loss_b[div[b]:]))
        # Saved states after divergence repeat the last finite iterate.
        for w in sel.models.weights:
            w = np.asarray(w)
            assert np.all(np.isfinite(w))
            assert np.all(w[div[b]:] == w[div[b]])
        assert all(np.all(np.isfinite(np.asarray(x))) for x in sel.ledger)
        assert f"[{b}] t=" in traj.summary() and f"diverged at step {div[b]}" in traj.summary()

    # The other members are unaffected: exactly what they give when run alone (1e-12: the same
    # float64 operations, vectorised).
    for b in (0, 2):
        alone = flowsim.gradient_descent(jax.tree.map(lambda x, b=b: x[b], nets), loss, 40,
                                         learning_rate=0.1)
        assert tree_max_abs_diff(traj[b].models, alone.models) < 1e-12
        np.testing.assert_allclose(traj[b].loss, alone.loss, rtol=1e-12, atol=0)
        assert tree_max_abs_diff(traj[b].ledger, alone.ledger) < 1e-12

    # A diverging member alone: the same step, named as trajectory 0.
    with pytest.warns(flowsim.DivergenceWarning, match=rf"trajectory 0 at step {div[1]};"):
        alone = flowsim.gradient_descent(jax.tree.map(lambda x: x[1], nets), loss, 40,
                                         learning_rate=0.1)
    assert int(alone.stats["diverged_at"]) == div[1]

    with pytest.raises(FloatingPointError, match=rf"gradient descent diverged \(non-finite loss "
                                                 rf"or iterate\): trajectory 1 at step {div[1]}"):
        flowsim.gradient_descent(nets, loss, 40, learning_rate=0.1, batched=True, throw=True)


def test_ledger_and_trajectory_misuse():
    net, loss = _net(), _square()
    traj = flowsim.gradient_descent(net, loss, 10, learning_rate=0.1, save_every=5)
    with pytest.raises(ValueError, match=r"recomputing the ledger from `loss` needs every "
                                         r"iterate: run gradient_descent with save_every=1"):
        invariants.gd_drift_ledger(traj, loss)
    with pytest.raises(TypeError, match=r"indexing selects one trajectory of a batch; this one "
                                        r"is not batched"):
        traj[0]
    batched = jax.tree.map(lambda x: x[None], traj)
    batched = flowsim.Trajectory(ts=batched.ts, models=batched.models, loss=batched.loss,
                                 steps=traj.steps, result=batched.result,
                                 learning_rates=traj.learning_rates, batched=True)
    with pytest.raises(TypeError, match=r"select a trajectory first: traj\[i\]\.model_at\(k\)"):
        batched.model_at(0)
    with pytest.raises(ValueError, match=r"gd_drift_ledger needs a gradient-descent trajectory"):
        invariants.gd_drift_ledger(flowsim.Trajectory(ts=traj.ts, models=traj.models,
                                                      loss=traj.loss))
    with pytest.raises(TypeError, match=r"function does not describe its hidden units"):
        invariants.neuron_gaps(lambda x: x)
