"""gradient_descent: the update, schedules in one compiled call, batching, and Trajectory."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import flowsim
from flowsim import invariants
from flowsim.models import MLP

from .helpers import count_compilations, tree_max_abs_diff

EPS = float(np.finfo(np.float64).eps)


def _mlp(rng, sizes, activation="relu", use_bias=False, stds=None):
    extra = int(use_bias)
    if stds is None:
        stds = [1 / np.sqrt(a) for a in sizes[:-1]]
    ws = [s * rng.normal(size=(b, a + extra)) for s, a, b in zip(stds, sizes, sizes[1:])]
    return MLP.from_weights(ws, activation, use_bias=use_bias)


def test_gd_is_the_plain_update_and_trajectory_bookkeeping():
    """theta_{k+1} = theta_k - eta_k grad L(theta_k), with eta_k = eta0 (k+1)^-(1/2+delta);
    t_k = sum_{i<k} eta_i; saved iterates, losses and steps line up."""
    rng = np.random.default_rng(0)
    net = _mlp(rng, (3, 4, 2), use_bias=True)
    loss = flowsim.losses.square(rng.normal(size=(10, 3)), rng.normal(size=(10, 2)))
    sched = flowsim.schedules.power_decay(0.3, 0.25)
    traj = flowsim.gradient_descent(net, loss, 40, learning_rate=sched, save_every=4)

    etas = 0.3 * (np.arange(40) + 1.0) ** -0.75
    # pow in XLA vs NumPy: a few ulps apart.
    np.testing.assert_allclose(traj.learning_rates, etas, rtol=4 * EPS)
    np.testing.assert_array_equal(traj.steps, np.arange(0, 41, 4))
    t_all = np.concatenate([[0.0], np.cumsum(etas)])
    # ts = cumsum of learning_rates at the saved steps (40 terms of size <= 0.3: 1e-14).
    np.testing.assert_allclose(traj.ts, t_all[::4], rtol=0, atol=1e-14)
    np.testing.assert_allclose(traj.ts, np.concatenate([[0.0], np.cumsum(
        np.asarray(traj.learning_rates))])[np.asarray(traj.steps)], rtol=0, atol=1e-14)

    # The reference loop: same float64 operations, one step at a time.
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    model = net
    for k in range(41):
        if k % 4 == 0:
            saved = traj.model_at(k // 4)
            # Same arithmetic up to XLA's fusion order: 1e-13 on O(1) weights after 40 steps.
            assert tree_max_abs_diff(saved, model) < 1e-13, k
            np.testing.assert_allclose(traj.loss[k // 4], loss(model), rtol=1e-13)
        if k < 40:
            eta = etas[k]
            model = jax.tree.map(lambda p, gp, eta=eta: p - eta * gp, model, grad(model))
    assert tree_max_abs_diff(traj.final_model(), model) < 1e-13
    assert traj.model_at(-1).use_bias and traj.final_model().activation == flowsim.models.ReLU()
    assert traj.models.weights[0].shape == (11, 4, 4)  # leading time axis
    for arr in (traj.ts, traj.loss, traj.learning_rates, *traj.ledger, *traj.models.weights):
        assert arr.dtype == jnp.float64
    assert float(traj.loss[-1]) < float(traj.loss[0])
    assert int(traj.stats["diverged_at"]) == -1 and bool(traj.succeeded)
    assert traj.result == flowsim.RESULTS.successful
    assert traj.summary().startswith("[0] t=") and traj.summary().endswith(" ok")


def test_fig2_small_power_decay_10000_steps_one_compile():
    """A smaller Du-Hu-Lee Fig 2: 50 -> 20 -> 20 -> 5 ReLU, 100 Gaussian points, square loss,
    balanced small init, eta_k = 5 (k+1)^-3/4, 10,000 GD steps in one compiled call."""
    sizes = (50, 20, 20, 5)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(100, 50))
    teacher = _mlp(rng, sizes)
    Y = np.asarray(teacher(jnp.asarray(X)))
    net = _mlp(rng, sizes, stds=flowsim.init.balanced_stds(sizes, 1e-4))
    loss = flowsim.losses.square(X, Y)
    with count_compilations("_gd_solve") as compiles:  # shapes unique to this test
        traj = flowsim.gradient_descent(
            net, loss, 10_000, learning_rate=flowsim.schedules.power_decay(5.0, 0.25),
            save_every=1000,
        )
        jax.block_until_ready(traj)
    assert compiles["n"] == 1, compiles
    assert traj.loss.shape == (11,) and int(traj.stats["diverged_at"]) == -1
    # The loss leaves the saddle near the small init and drops >5x (observed 0.60 -> 0.049).
    assert float(traj.loss[-1]) < 0.2 * float(traj.loss[0]), traj.loss
    # Auto-balancing: the squared layer norms grow > 100x (observed 0.01 -> 3.4) while the layer
    # gaps stay below 0.03 (observed <= 0.003); the ledger accounts for all of their drift.
    norms = np.stack([np.sum(np.asarray(w) ** 2, axis=(1, 2)) for w in traj.models.weights])
    assert norms[:, -1].min() > 100 * norms[:, 0].max(), norms
    gaps = np.asarray(invariants.layer_gaps(traj.models))
    assert np.abs(gaps).max() < 0.03, gaps
    ledger = invariants.gd_drift_ledger(traj)
    bound = 10 * EPS * 10_000 * norms.sum(0).max()  # see tests/test_invariants.py
    assert float(ledger.max_discrepancy()) <= bound < 1e-3 * np.abs(gaps - gaps[0]).max()


def test_batched_equals_single_calls_and_compiles_once():
    """16 initialisations in one compiled call == 16 separate calls (to 1e-12); new data of the
    same shapes and a new eta0 reuse the compiled program."""
    nets = flowsim.init.batch(lambda k: MLP((3, 5, 2), "relu", use_bias=True, key=k), 16,
                              key=jr.key(0))
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
    loss = flowsim.losses.square(X, Y)
    sched = flowsim.schedules.power_decay(0.5, 0.25)
    with count_compilations("_gd_solve") as compiles:  # shapes unique to this test
        traj = flowsim.gradient_descent(nets, loss, 300, learning_rate=sched, save_every=10,
                                        batched=True)
        jax.block_until_ready(traj)
    assert compiles["n"] == 1, compiles
    assert traj.ts.shape == traj.loss.shape == (16, 31)
    div = np.asarray(traj.stats["diverged_at"])
    assert div.shape == (16,) and np.all(div == -1)
    batched_ledger = invariants.gd_drift_ledger(traj)

    # 1e-12: the batched program vectorises the same float64 operations; reductions may be
    # ordered differently, which moves O(1) results by a few ulps per step at most.
    with count_compilations("_gd_solve") as compiles:
        for b in range(16):
            one = jax.tree.map(lambda x, b=b: x[b], nets)
            single = flowsim.gradient_descent(one, loss, 300, learning_rate=sched, save_every=10)
            sel = traj[b]
            assert tree_max_abs_diff(sel.models, single.models) < 1e-12, b
            np.testing.assert_allclose(sel.loss, single.loss, rtol=1e-12, atol=0)
            np.testing.assert_allclose(sel.ts, single.ts, rtol=1e-12, atol=0)
            assert tree_max_abs_diff(sel.ledger, single.ledger) < 1e-12, b
            one_ledger = invariants.gd_drift_ledger(single)
            for m, p, mb, pb in zip(one_ledger.measured, one_ledger.predicted,
                                    batched_ledger.measured, batched_ledger.predicted):
                np.testing.assert_allclose(mb[b], m, rtol=0, atol=1e-12)
                np.testing.assert_allclose(pb[b], p, rtol=0, atol=1e-12)
    assert compiles["n"] == 1, "16 single calls share one compilation"

    X2, Y2 = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
    with count_compilations("_gd_solve") as compiles:
        other = flowsim.gradient_descent(nets, flowsim.losses.square(X2, Y2), 300,
                                         learning_rate=sched, save_every=10, batched=True)
        faster = flowsim.gradient_descent(nets, loss, 300, save_every=10, batched=True,
                                          learning_rate=flowsim.schedules.power_decay(0.7, 0.25))
        slower = flowsim.gradient_descent(nets, loss, 300, save_every=10, batched=True,
                                          learning_rate=flowsim.schedules.power_decay(0.7, 0.1))
        jax.block_until_ready((other, faster, slower))
    assert compiles["n"] == 0, "new data, a new eta0 or a new delta must not recompile"
    # ... and they did use the new values.
    assert not np.allclose(other.loss, traj.loss)
    np.testing.assert_allclose(faster.learning_rates[:3], 0.7 * np.arange(1.0, 4.0) ** -0.75,
                               rtol=4 * EPS)
    np.testing.assert_allclose(slower.learning_rates[:3], 0.7 * np.arange(1.0, 4.0) ** -0.6,
                               rtol=4 * EPS)
