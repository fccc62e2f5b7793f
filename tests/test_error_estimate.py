"""`flowsim.estimate_error(...)`: the a-posteriori global error estimate from a
second solve at tolerances / ERROR_ESTIMATE_FACTOR, checked against true errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import flowsim
from flowsim.models import MLP, MatrixFactorization

from .helpers import count_compilations
from .test_kinks import _three_neurons


def _flat(models):
    leaves = jax.tree.leaves(eqx.filter(models, eqx.is_inexact_array))
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _true_error(traj, ref):
    """max_t ||theta(t) - theta_ref(t)|| / max_t ||theta_ref(t)||: what the estimate estimates."""
    a, b = _flat(traj.models), _flat(ref.models)
    return np.max(np.linalg.norm(a - b, axis=1)) / np.max(np.linalg.norm(b, axis=1))


def _factorization():
    M = jnp.diag(jnp.array([3.0, 1.0, 0.5]))
    return (MatrixFactorization.random(3, 3, 3, scale=0.1, key=jr.key(0)),
            flowsim.losses.factorization(M))


@pytest.mark.parametrize("tol", [1e-6, 1e-9])
def test_estimate_matches_true_error_smooth_problem(tol):
    # A smooth flow: the true error against Dopri8 at 1e-14 (its own error ~1e-14). With
    # tolerance proportionality the estimate is the true error less the tight solve's tenth:
    # measured ratio 0.92 at both tolerances; the bound [0.5, 2] fails for an estimate off by
    # more than a factor 2 (e.g. from comparing the solve with itself: ratio 0).
    mf, loss = _factorization()
    ts = jnp.linspace(0.0, 10.0, 11)
    ref = flowsim.gradient_flow(mf, loss, 10.0, ts=ts, solver="dopri8", rtol=1e-14, atol=1e-14)
    traj = flowsim.estimate_error(mf, loss, 10.0, ts=ts, solver="tsit5", rtol=tol, atol=tol)
    est, true = float(traj.stats["error_estimate"]), _true_error(traj, ref)
    assert 0.5 <= est / true <= 2.0, (est, true)
    plain = flowsim.gradient_flow(mf, loss, 10.0, ts=ts, solver="tsit5", rtol=tol, atol=tol)
    assert "error_estimate" not in plain.stats
    # The returned solution is the one at the requested tolerances.
    np.testing.assert_array_equal(_flat(plain.models), _flat(traj.models))


@pytest.fixture(scope="module")
def relu_reference():
    # The 2 -> 3 -> 1 ReLU network on 4 points of tests/test_kinks.py (its compiled pieces are
    # shared): 8 crossings before t = 10, no sliding yet. Reference: the exact path at 1e-13.
    net, loss = _three_neurons()
    ts = jnp.linspace(0.0, 10.0, 11)
    ref = flowsim.gradient_flow(net, loss, 10.0, ts=ts, solver="tsit5", rtol=1e-13, atol=1e-13,
                                kinks="exact")
    assert int(ref.stats["num_crossings"]) == 8 and int(ref.stats["num_sliding_intervals"]) == 0
    return net, loss, ts, ref


def test_estimate_through_kinks_exact_path(relu_reference):
    # The exact-kink path: its error follows the tolerance through every event, and so does
    # the estimate (measured: 2.34e-6 against a true 2.54e-6 at tol 1e-6).
    net, loss, ts, ref = relu_reference
    traj = flowsim.estimate_error(net, loss, 10.0, ts=ts, solver="tsit5", rtol=1e-6, atol=1e-6,
                                 kinks="exact")
    est, true = float(traj.stats["error_estimate"]), _true_error(traj, ref)
    assert 0.5 <= est / true <= 2.0, (est, true)
    assert true <= 1e-5


def test_estimate_flags_smooth_solve_through_kinks(relu_reference):
    # The smooth path steps through the 8 crossings under error control alone: at tol 1e-6 it
    # ends 3.2e-4 (relative) from the exact flow, 300x its tolerance, with no failure. The
    # estimate sees it (measured 3.0e-4); the tolerance alone would not.
    net, loss, ts, ref = relu_reference
    traj = flowsim.estimate_error(net, loss, 10.0, ts=ts, solver="tsit5", rtol=1e-6, atol=1e-6,
                                 kinks="smooth")
    est, true = float(traj.stats["error_estimate"]), _true_error(traj, ref)
    assert true >= 100 * 1e-6, true
    assert 0.5 <= est / true <= 2.0, (est, true)


def test_estimate_batched_equals_loop_and_compiles_once():
    # Per member, vmap equals the loop; the tight solve reuses the compiled solve (tolerances
    # are traced): one compilation of the smooth solve for the batch, one for a single member.
    X = jr.normal(jr.key(1), (10, 3))
    loss = flowsim.losses.square(X, jr.normal(jr.key(2), (10, 2)))
    nets = flowsim.init.batch(lambda k: MLP((3, 5, 2), "tanh", key=k), 3, key=jr.key(3))
    kw = dict(solver="tsit5", rtol=1e-7, atol=1e-7)
    with count_compilations("_flow_solve") as c:
        batch = flowsim.estimate_error(nets, loss, 2.0, batched=True, **kw)
    assert c["n"] == 1, c
    est = np.asarray(batch.stats["error_estimate"])
    assert est.shape == (3,) and np.all((est > 0) & (est < 1e-5)), est
    for i in range(3):
        one = flowsim.estimate_error(jax.tree.map(lambda x, i=i: x[i], nets), loss, 2.0, **kw)
        np.testing.assert_allclose(float(one.stats["error_estimate"]), est[i], rtol=1e-6)


def test_failed_tight_solve_gives_nan_and_warns():
    # max_steps just enough for the requested tolerances: the tight solve runs out of steps,
    # and the estimate is NaN with a warning that names the fix, never a silent number.
    mf, loss = _factorization()
    steps = int(flowsim.gradient_flow(mf, loss, 10.0, solver="tsit5", rtol=1e-6,
                                      atol=1e-6).stats["num_steps"])
    with pytest.warns(flowsim.FlowWarning, match=r"no error estimate .* raise max_steps"):
        traj = flowsim.estimate_error(mf, loss, 10.0, solver="tsit5", rtol=1e-6, atol=1e-6,
                                     max_steps=steps)
    assert bool(traj.succeeded) and np.isnan(float(traj.stats["error_estimate"]))
    with pytest.raises(ValueError, match=r"`factor` must be a number above 1, got 0\.5"):
        flowsim.estimate_error(mf, loss, 1.0, factor=0.5)
