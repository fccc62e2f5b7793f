"""flowsim.problems: every family builds and draws models, the sweep schema mirrors the family
functions, and each family's metrics and closed forms hold numerically (tolerances stated)."""

import importlib
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import flowsim
from flowsim import problems
from flowsim.models import MLP, MatrixFactorization, TwoLayerReLU
from flowsim.problems.deep_linear_logistic import angle, max_margin
from flowsim.problems.two_layer import min_variation_norm
from flowsim.schedules import power_decay
from flowsim.sweep._schema import INIT_SCHEMES, PROBLEM_FIELDS

# The smallest instance of each family (required arguments only).
ARGS = {
    "mlp": dict(sizes=(3, 4, 2), n=8),
    "factorization": dict(shape=(4, 3), rank=2, spectrum=(1.0, 0.5)),
    "conv": dict(in_shape=(1, 5, 5), channels=(2, 2), out_features=1, n=4),
    "two_layer_relu": dict(dim=4, width=4, labels=(1.0, -0.5, 0.3)),
    "deep_linear_logistic": dict(sizes=(3, 3, 1), n=8),
}
CASES = [(kind, scheme) for kind in ARGS for scheme in INIT_SCHEMES[kind]]


def _in_time(model):
    """A single model as a trajectory of one saved time (leading axis 1)."""
    return jax.tree.map(lambda x: x[None] if eqx.is_array(x) else x, model)


def test_families_are_the_sweep_kinds():
    assert set(problems.FAMILIES) == set(ARGS) == set(PROBLEM_FIELDS) == set(INIT_SCHEMES)


@pytest.mark.parametrize(("kind", "scheme"), CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_family_builds_and_inits(kind, scheme):
    problem = problems.FAMILIES[kind](**ARGS[kind], init=scheme)
    assert isinstance(problem, problems.AbstractProblem)
    keys = jr.split(jr.key(3), 3)
    model = problem.init(keys[0])
    value = problem.loss(model)
    assert value.shape == () and bool(jnp.isfinite(value)), value
    for name, v in problem.metrics(_in_time(model)).items():
        assert v.shape == (1,) and bool(jnp.all(jnp.isfinite(v))), (name, v)
    if problem.inputs is not None:
        assert problem.inputs.shape[0] == ARGS[kind].get("n", len(ARGS[kind].get("labels", ())))
    # A batch of models drawn under vmap is the loop of single draws, bit for bit.
    batched = eqx.filter_vmap(problem.init)(keys)
    for i, key in enumerate(keys):
        single = problem.init(key)
        row = jax.tree.map(lambda x, i=i: x[i] if eqx.is_array(x) else x, batched)
        assert jax.tree.structure(row) == jax.tree.structure(single)
        for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(single)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Different keys, different models.
    first = jax.tree.leaves(eqx.filter(problem.init(keys[1]), eqx.is_array))[0]
    assert not np.array_equal(np.asarray(jax.tree.leaves(eqx.filter(model, eqx.is_array))[0]),
                              np.asarray(first))


# --- the sweep's schema is the family functions' signature ----------------------------------------

def _as_list(v):
    return list(v) if isinstance(v, tuple | list) else v


@pytest.mark.parametrize("kind", sorted(PROBLEM_FIELDS))
def test_schema_defaults_are_the_function_defaults(kind):
    params = inspect.signature(problems.FAMILIES[kind]).parameters
    for key, field in PROBLEM_FIELDS[kind].items():
        assert key in params, f"[problem].{key} of {kind!r} is not an argument of the function"
        default = params[key].default
        if field.default is None:  # required in the config: required by the function
            assert default is inspect.Parameter.empty, (kind, key, default)
        else:
            assert _as_list(field.default) == _as_list(default), (kind, key, field.default,
                                                                  default)
    # Every argument is a [problem] field, or [init] scheme / variance.
    assert set(params) == set(PROBLEM_FIELDS[kind]) | {"init", "variance"}
    assert params["init"].default in INIT_SCHEMES[kind]
    assert params["variance"].default is not inspect.Parameter.empty
    module = importlib.import_module(problems.FAMILIES[kind].__module__)
    assert tuple(INIT_SCHEMES[kind]) == tuple(module.INIT_SCHEMES)


# --- factorization: Thm 3.1's ledger, balanced init, the exact factor --------------------------

STEPS = 30


@pytest.fixture(scope="module")
def fact():
    return problems.factorization((5, 4), 2, (2.0, 1.0), variance=0.04)


@pytest.mark.parametrize("delta", [0.0, 0.25, 0.5])
def test_gram_drift_within_ledger_bound(fact, delta):
    model = fact.init(jr.key(1))
    schedule = power_decay(0.2, delta)
    traj = flowsim.gradient_descent(model, fact.loss, STEPS, learning_rate=schedule,
                                    save_every=1)
    bound = np.asarray(traj.stats["ledger_bound"])
    drift = np.asarray(fact.metrics(traj.models)["gram_drift"])
    assert bound.shape == drift.shape == (STEPS + 1,)
    assert bound[0] == 0.0 and drift[0] == 0.0
    # ||G_k - G_0||_F <= sum_{i<k} eta_i^2 ||grad L_i||^2 at every step (to rounding).
    assert np.all(drift <= bound * (1 + 1e-12)), np.max(drift / np.maximum(bound, 1e-300))
    assert drift[-1] > 1e-3 * bound[-1]  # the iterates did move: not a vacuous comparison
    # The bound recomputed from the saved iterates: eta_i^2 ||grad L(theta_i)||^2 summed.
    grads = eqx.filter_vmap(eqx.filter_grad(fact.loss))(traj.models)
    g_sq = sum(jnp.sum(g**2, axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads))
    etas = schedule(jnp.arange(STEPS))
    expect = np.concatenate([[0.0], np.cumsum(np.asarray(etas**2 * g_sq[:STEPS]))])
    np.testing.assert_allclose(bound, expect, rtol=1e-12, atol=0)
    np.testing.assert_allclose(np.asarray(traj.learning_rates), np.asarray(etas), rtol=1e-15)


def test_balanced_init_has_equal_norms():
    p = problems.factorization((6, 3), 2, (1.0, 0.5), init="balanced", variance=1e-2)
    models = eqx.filter_vmap(p.init)(jr.split(jr.key(0), 8))
    nu = jnp.linalg.norm(models.U, axis=(-2, -1))
    nv = jnp.linalg.norm(models.V, axis=(-2, -1))
    np.testing.assert_allclose(np.asarray(nv), np.asarray(nu), rtol=1e-13)
    # Not balanced by default: the Gaussian draw leaves a gap (the test above can fail).
    g = problems.factorization((6, 3), 2, (1.0, 0.5), variance=1e-2)
    mg = eqx.filter_vmap(g.init)(jr.split(jr.key(0), 8))
    gap = jnp.abs(jnp.linalg.norm(mg.U, axis=(-2, -1)) - jnp.linalg.norm(mg.V, axis=(-2, -1)))
    assert float(jnp.max(gap / jnp.linalg.norm(mg.U, axis=(-2, -1)))) > 1e-3


def test_relative_error_at_the_exact_factor(fact):
    M = np.asarray(fact.M)
    a, s, bt = np.linalg.svd(M)
    r = fact.rank
    U, V = a[:, :r] * np.sqrt(s[:r]), bt[:r].T * np.sqrt(s[:r])
    exact = MatrixFactorization(jnp.asarray(U), jnp.asarray(V))
    out = fact.metrics(_in_time(exact))
    assert float(out["relative_error"][0]) <= 1e-14
    assert float(fact.loss(exact)) <= 1e-28
    # And the target has the spectrum asked for.
    np.testing.assert_allclose(s[:r], [2.0, 1.0], rtol=1e-14)
    assert s[r:].max() <= 1e-14
    # The Gram gap of this balanced factor is 0, its norm sqrt(||U||^2 + ||V||^2) = sqrt(2 sum s).
    assert float(out["gram_gap"][0]) <= 1e-14
    np.testing.assert_allclose(float(out["param_norm"][0]), np.sqrt(2 * 3.0), rtol=1e-14)


# --- two-layer ReLU: the minimum variation norm --------------------------------------------------

def test_min_variation_norm_is_the_two_neuron_interpolator():
    labels = (1.0, -0.5, 0.3, -2.0, 0.7)
    p = problems.two_layer_relu(6, 4, labels)
    X, y = np.asarray(p.X), np.asarray(labels)
    np.testing.assert_allclose(X @ X.T - np.diag(np.sum(X**2, 1)), 0, atol=1e-14)  # orthogonal
    # w_+ = sum_{y_i>0} y_i x_i/||x_i||^2, a_+ = 1; w_- = sum_{y_i<0} (-y_i) x_i/||x_i||^2, a_- = -1
    # (each point activates only its own sign's neuron: the inputs are orthogonal).
    scaled = X / np.sum(X**2, axis=1, keepdims=True)
    w_plus = (np.maximum(y, 0)[:, None] * scaled).sum(0)
    w_minus = (np.maximum(-y, 0)[:, None] * scaled).sum(0)
    net = TwoLayerReLU(jnp.asarray(np.stack([w_plus, w_minus])), jnp.asarray([1.0, -1.0]))
    np.testing.assert_allclose(np.asarray(net(p.X)), y, rtol=0, atol=1e-12)
    vn = float(net.variation_norm())
    np.testing.assert_allclose(float(p.vmin), vn, rtol=1e-12)
    np.testing.assert_allclose(min_variation_norm(X, y), vn, rtol=1e-12)
    out = p.metrics(_in_time(net))
    np.testing.assert_allclose(float(out["variation_norm"][0]), vn, rtol=1e-12)
    np.testing.assert_allclose(float(out["min_variation_norm"][0]), vn, rtol=1e-12)
    # One neuron per point also interpolates, with a larger variation norm (l1 >= l2 per sign).
    W = np.abs(y)[:, None] * scaled
    per_point = TwoLayerReLU(jnp.asarray(W), jnp.asarray(np.sign(y)))
    np.testing.assert_allclose(np.asarray(per_point(p.X)), y, rtol=0, atol=1e-12)
    assert float(per_point.variation_norm()) > vn * (1 + 1e-3)


# --- deep linear logistic: the max-margin direction ----------------------------------------------

@pytest.fixture(scope="module")
def dll():
    return problems.deep_linear_logistic((4, 3, 1), n=24, margin=0.1)


def test_max_margin_direction(dll):
    X, y = np.asarray(dll.X), np.asarray(dll.y)
    w = np.asarray(dll.w_star)
    margin = float(np.min(y * (X @ w)) / np.linalg.norm(w))
    np.testing.assert_allclose(margin, float(dll.gamma_star), rtol=1e-6)
    w_p, w_d, info = max_margin(X, y)
    np.testing.assert_allclose(info["margin"], float(dll.gamma_star), rtol=1e-12)
    assert info["dual_success"] and info["support_vectors"] >= 1
    np.testing.assert_allclose(info["min_constraint_primal"], 1.0, rtol=1e-9)
    # Primal (SLSQP) and dual (L-BFGS-B) agree on the direction: it is the optimum. (SLSQP's
    # own flag is not asserted: at ftol 1e-15 it may stop with "Positive directional
    # derivative for linesearch" at the optimum; the agreement with the dual is the check.)
    assert float(angle(jnp.asarray(w_p), jnp.asarray(w_d))) <= 1e-6
    # The data's own separator (margin >= 0.1 by construction) does no better.
    assert margin >= 0.1 * (1 - 1e-6)


def _linear_net(w):
    """A linear (d, 3, 1) MLP whose end-to-end vector W_2 W_1 is w."""
    u = jnp.asarray([1.0, -2.0, 0.5])
    return MLP.from_weights([jnp.outer(u, w), (u / (u @ u))[None, :]], "linear")


def test_margin_metrics_at_the_max_margin_direction(dll):
    net = _linear_net(3.0 * dll.w_star)
    np.testing.assert_allclose(np.asarray(net.end_to_end()[0]), 3.0 * np.asarray(dll.w_star),
                               rtol=1e-13)
    out = dll.metrics(_in_time(net))
    assert float(out["margin_angle"][0]) <= 1e-7
    np.testing.assert_allclose(float(out["margin_ratio"][0]), 1.0, rtol=1e-6)
    # Another direction: a positive angle and a smaller margin (the metrics can fail).
    other = _linear_net(dll.w_star + 0.3 * jnp.asarray([1.0, 0.0, 0.0, 0.0]))
    out = dll.metrics(_in_time(other))
    assert float(out["margin_angle"][0]) > 1e-2
    assert float(out["margin_ratio"][0]) < 1.0


# --- conv: data scale and initialisation ---------------------------------------------------------

def test_conv_data_scale():
    p = problems.conv((2, 6, 6), (2, 2), 1, n=4000)
    sq = np.sum(np.asarray(p.X).reshape(4000, -1) ** 2, axis=1)
    # ||x||^2 ~ chi^2_72 / 72: mean 1, std of the mean sqrt(2 / (72 * 4000)) = 2.6e-3; 8 sigma.
    assert abs(sq.mean() - 1.0) < 0.02, sq.mean()


@pytest.mark.parametrize("scheme", ["default", "unbalanced"])
def test_conv_init_std(scheme):
    in_shape, channels, k, variance = (2, 6, 6), (3, 2), 3, 2.0
    p = problems.conv(in_shape, channels, 1, n=4, init=scheme, variance=variance)
    models = eqx.filter_vmap(p.init)(jr.split(jr.key(7), 400))
    side = in_shape[1] - len(channels) * (k - 1)
    fan_ins = [in_shape[0] * k * k, channels[0] * k * k, channels[1] * side * side]
    for w, fan_in in zip((*models.filters, models.head), fan_ins):
        want = (variance / fan_in) ** 0.5 if scheme == "default" else variance**0.5
        n = w.size
        got = float(jnp.sqrt(jnp.mean(w**2)))  # the mean is 0: the RMS estimates the std
        # Relative standard error of the RMS of n Gaussians: 1/sqrt(2n); 6 sigma.
        assert abs(got / want - 1) < 6 / (2 * n) ** 0.5, (fan_in, got, want)
        assert abs(float(jnp.mean(w))) < 6 * want / n**0.5


def test_conv_flow_conserves_layer_gaps():
    # The gradient flow of a ConvNet with a positively homogeneous activation conserves
    # ||K_h||^2 - ||K_{h+1}||^2 (Thm 2.3). Linear activation: a smooth field, so Tsit5 at rtol
    # 1e-10 follows it (ReLU with kinks="smooth" stalls at that tolerance: 100k steps; exact
    # kinks are tested in test_kinks). The gaps move < 1e-8 of the layer norms; GD over the
    # same times moves them 1e3 x more.
    p = problems.conv((1, 5, 5), (2, 2), 1, n=6, activation="linear", variance=1.0)
    model = p.init(jr.key(2))
    gd = flowsim.gradient_descent(model, p.loss, 20, learning_rate=0.1, save_every=5)
    flow = flowsim.gradient_flow(model, p.loss, float(gd.ts[-1]), ts=gd.ts, solver="tsit5",
                                 rtol=1e-10, atol=1e-10, kinks="smooth")
    gaps = flowsim.invariants.layer_gaps(flow.models)
    scale = float(jnp.max(flowsim.invariants.layer_norms(flow.models)))
    flow_drift = float(jnp.max(jnp.abs(gaps - gaps[:1])))
    g = flowsim.invariants.layer_gaps(gd.models)
    gd_drift = float(jnp.max(jnp.abs(g - g[:1])))
    assert flow_drift < 1e-8 * scale, (flow_drift, scale)
    assert gd_drift > 1e3 * flow_drift, (gd_drift, flow_drift)
    assert float(flow.loss[-1]) < float(flow.loss[0])
