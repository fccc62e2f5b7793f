"""Gradient flow: exact solutions, invariants, orders, stiffness, batching, failures."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import flowsim
from flowsim import invariants as inv
from flowsim.models import MLP, ConvNet, MatrixFactorization

from .helpers import count_compilations, tree_max_abs_diff


def _spectral_problem():
    return flowsim.data.spectral_factorization(
        6, 5, [3.0, 1.0, 0.5], [1e-3, 1e-2, 1e-1], key=jr.key(0)
    )


@pytest.mark.parametrize("solver", ["kvaerno5", "tsit5", "dopri8", "rodas5p"])
def test_closed_form_balanced_factorization(solver):
    # Each mode obeys a' = 2a(s - a): a(t) = s / (1 + (s/a0 - 1) exp(-2 s t)); the modes start
    # far from their limits (a0/s down to 3e-4), so the test covers the sigmoidal transition.
    M, U0, V0, exact = _spectral_problem()
    ts = jnp.linspace(0.0, 10.0, 11)
    traj = flowsim.gradient_flow(
        MatrixFactorization(U0, V0), flowsim.losses.factorization(M), 10.0, ts=ts,
        solver=solver, rtol=1e-12, atol=1e-12,
    )
    P = traj.models.U @ jnp.swapaxes(traj.models.V, -1, -2)
    ref = jax.vmap(exact)(ts)
    rel = jnp.linalg.norm(P - ref, axis=(1, 2)) / jnp.linalg.norm(ref, axis=(1, 2))
    assert float(jnp.max(rel)) <= 1e-9, f"{solver}: max relative error {float(jnp.max(rel)):.3g}"


def _relative_drifts(traj):
    """Max over time of |gap(t) - gap(0)| / (squared norms involved), for every invariant."""
    out = {}
    norms = eqx_vmap(inv.layer_norms)(traj.models)
    out["layer"] = jnp.max(jnp.abs(inv.drift(traj, inv.layer_gaps)) / norms)
    units = eqx_vmap(lambda m: tuple(
        jnp.sum(i**2, -1) + jnp.sum(o**2, -1) for i, o in m.hidden_units()))(traj.models)
    out["neuron"] = max(
        float(jnp.max(jnp.abs(d) / u)) for d, u in zip(inv.drift(traj, inv.neuron_gaps), units)
    )
    return {k: float(v) for k, v in out.items()}


def eqx_vmap(fn):
    import equinox as eqx

    return eqx.filter_vmap(fn)


@pytest.mark.parametrize(
    "sizes,activation",
    [((3, 5, 2), "linear"), ((3, 4, 4, 2), "relu"), ((4, 3, 5, 3, 2), "leaky_relu"),
     ((3, 6, 1), "relu")],
)
def test_invariants_conserved_along_flow(sizes, activation):
    # Teacher-student data. Fixed keys: about a third of random deep ReLU instances enter a
    # sliding mode (a pre-activation pinned at a kink) where a smooth adaptive solver stalls;
    # these instances cross kinks (hundreds of rejected steps) but do not slide.
    k1, k2, k3 = jr.split(jr.key(0), 3)
    X = jr.normal(k1, (8, sizes[0]))
    Y = MLP(sizes, activation, key=k2)(X)
    net = MLP(sizes, activation, key=k3)
    traj = flowsim.gradient_flow(
        net, flowsim.losses.square(X, Y), 5.0, ts=jnp.linspace(0, 5, 6), solver="tsit5",
        rtol=1e-12, atol=1e-12,
    )
    drifts = _relative_drifts(traj)
    # The flow conserves them exactly; 1e-9 relative is the acceptance bound at tol 1e-12.
    assert drifts["layer"] <= 1e-9 and drifts["neuron"] <= 1e-9, drifts
    # Something moved: the flow changed the weights by far more than the drift.
    assert float(tree_max_abs_diff(traj.model_at(0), traj.final_model())) > 1e-2
    if activation == "linear":
        gram = inv.drift(traj, inv.gram_gaps)
        scale = float(jnp.max(inv.layer_norms(traj.final_model())))
        assert max(float(jnp.max(jnp.abs(g))) for g in gram) <= 1e-9 * scale


@pytest.mark.slow  # ~30 s of compilation; the conv example's smoke run bounds its flow drift
def test_invariants_conserved_convnet():
    # Shared filters (Thm 2.3) with ReLU. Every (sample, position, channel) is a kink surface;
    # with kinks="smooth" this instance reaches a sliding mode at t ~ 0.42 and stalls, the exact
    # kink integration (the default) passes through it.
    k1, k2, k3 = jr.split(jr.key(3), 3)
    X = jr.normal(k1, (6, 1, 6, 6))
    Y = ConvNet((1, 6, 6), (3, 2), 2, kernel_size=3, key=k2)(X)
    net = ConvNet((1, 6, 6), (3, 2), 2, kernel_size=3, key=k3)
    # To t = 1 (18 crossings, 2 sliding intervals; the run is mostly compilation).
    traj = flowsim.gradient_flow(
        net, flowsim.losses.square(X, Y), 1.0, ts=jnp.linspace(0, 1, 4), solver="tsit5",
        rtol=1e-12, atol=1e-12,
    )
    assert int(traj.stats["num_crossings"]) >= 1, "the instance should cross kinks"
    assert int(traj.stats["num_sliding_intervals"]) >= 1, "the instance should slide"
    drifts = _relative_drifts(traj)
    assert drifts["layer"] <= 1e-9 and drifts["neuron"] <= 1e-9, drifts
    assert float(traj.loss[-1]) < 0.9 * float(traj.loss[0])


def test_tanh_drift_is_visible(getkey):
    # The check can fail: tanh is not homogeneous, its gaps move at order one.
    X = jr.normal(getkey(), (8, 3))
    Y = jr.normal(getkey(), (8, 2))
    net = MLP((3, 5, 2), "tanh", key=getkey())
    traj = flowsim.gradient_flow(
        net, flowsim.losses.square(X, Y), 5.0, ts=jnp.linspace(0, 5, 6), solver="tsit5",
        rtol=1e-12, atol=1e-12,
    )
    with pytest.warns(inv.NotConservedWarning):
        drifts = _relative_drifts(traj)
    assert drifts["layer"] > 1e-3, drifts


def _fit_order(etas, errs):
    return float(np.polyfit(np.log(etas), np.log(errs), 1)[0])


def test_gd_order_against_flow_and_modified_flow(getkey):
    # GD with constant eta over a fixed horizon T: error O(eta) against the flow of L,
    # O(eta^2) against the flow of the modified loss L + eta/4 ||grad L||^2.
    M = flowsim.data.low_rank_matrix(5, 4, [2.0, 1.0], key=getkey())
    mf = MatrixFactorization.random(5, 4, 2, scale=0.3, key=getkey())
    loss = flowsim.losses.factorization(M)
    T = 2.0
    etas = np.array([0.02, 0.01, 0.005, 0.0025])
    plain, modified = [], []
    for eta in etas:
        steps = round(T / eta)
        gd = flowsim.gradient_descent(mf, loss, steps, learning_rate=float(eta), save_every=steps)
        for target, out in ((loss, plain), (flowsim.modified_flow_loss(loss, eta), modified)):
            flow = flowsim.gradient_flow(mf, target, float(gd.ts[-1]), ts=gd.ts, solver="dopri8",
                                         rtol=1e-13, atol=1e-13)
            out.append(float(flowsim.discretization_error(gd, flow).parameter[-1]))
    p1, p2 = _fit_order(etas, plain), _fit_order(etas, modified)
    assert 0.9 <= p1 <= 1.1, (p1, plain)
    assert 1.8 <= p2 <= 2.2, (p2, modified)


def _stiff_problem():
    M = flowsim.data.low_rank_matrix(20, 20, [1.0, 1e-2, 1e-4], key=jr.key(1))
    mf = MatrixFactorization.random(20, 20, 3, scale=1e-3, key=jr.key(2))
    return mf, flowsim.losses.factorization(M)


def test_stiff_long_horizon_default_solver():
    mf, loss = _stiff_problem()
    traj = flowsim.gradient_flow(mf, loss, 1e6, rtol=1e-8, atol=1e-8)
    assert traj.solver == "Rodas5P", "auto must pick the stiff solver here"
    steps = int(traj.stats["num_steps"])
    assert steps <= 300, steps  # Rodas5P: ~155 steps (Kvaerno5: 263, Tsit5: > 100,000)
    assert float(traj.loss[-1]) <= 1e-20, float(traj.loss[-1])


def test_stiff_long_horizon_explicit_needs_many_steps():
    mf, loss = _stiff_problem()
    with pytest.warns(flowsim.FlowWarning, match="maximum number of solver steps"):
        traj = flowsim.gradient_flow(mf, loss, 1e6, solver="tsit5", rtol=1e-8, atol=1e-8,
                                     max_steps=100_000, throw=False)
    # Tsit5 does not reach T = 1e6 within 100,000 steps: stability caps its step at ~3.3/2.
    assert traj.result == flowsim.RESULTS.max_steps_reached
    assert int(traj.stats["num_steps"]) == 100_000


def test_batched_equals_loop_and_compiles_once(getkey):
    X = jr.normal(getkey(), (10, 3))
    Y = jr.normal(getkey(), (10, 2))
    loss = flowsim.losses.square(X, Y)
    nets = flowsim.init.batch(lambda k: MLP((3, 4, 2), "linear", key=k), 16, key=getkey())
    ts = jnp.linspace(0, 2, 5)
    with count_compilations("_flow_solve") as c:
        batch = flowsim.gradient_flow(nets, loss, 2.0, ts=ts, solver="tsit5", batched=True)
        batch2 = flowsim.gradient_flow(nets, flowsim.losses.square(2 * X, Y), 2.0, ts=ts,
                                       solver="tsit5", batched=True)
    assert c["n"] == 1, f"batched flow compiled {c['n']} times"
    assert batch2.loss.shape == (16, 5)
    for i in range(16):
        single = flowsim.gradient_flow(_member(nets, i), loss, 2.0,
                                       ts=ts, solver="tsit5")
        assert tree_max_abs_diff(single.models, batch[i].models) <= 1e-10
        assert int(single.stats["num_steps"]) == int(batch.stats["num_steps"][i])


def _member(batch, i):
    import equinox as eqx

    dyn, static = eqx.partition(batch, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda x: x[i], dyn), static)


def test_failure_marked_per_trajectory_and_throw():
    mf, loss = _stiff_problem()
    big = MatrixFactorization.random(20, 20, 3, scale=1.0, key=jr.key(3))
    nets = jax.tree.map(lambda a, b: jnp.stack([a, b]), mf, big)
    with pytest.warns(flowsim.FlowWarning, match="trajectory 1: The maximum number of solver"):
        traj = flowsim.gradient_flow(nets, loss, 1e3, solver="tsit5", max_steps=2000,
                                     batched=True, throw=False)
    assert np.asarray(traj.succeeded).tolist() == [True, False]
    single = flowsim.gradient_flow(mf, loss, 1e3, solver="tsit5", max_steps=2000)
    assert tree_max_abs_diff(single.models, traj[0].models) <= 1e-10
    with pytest.raises(flowsim.FlowFailed, match="increase max_steps"):
        flowsim.gradient_flow(big, loss, 1e3, solver="tsit5", max_steps=2000)


def test_relu_kink_crossing_is_resolved():
    # A tiny ReLU net whose hidden unit switches off during the flow: the vector field jumps
    # there. The step controller rejects steps until the jump's local error is below tolerance
    # (about log2(h / h_kink) rejections per crossing); it does not hang, the invariants stay
    # conserved, and the solution agrees with GD at a small step to O(eta).
    X = jnp.array([[1.0, 0.2], [0.3, 1.0], [-0.8, 0.5]])
    Y = jnp.array([[1.0], [0.5], [-0.3]])
    net = MLP((2, 3, 1), "relu", init_std=0.5, key=jr.key(3))
    loss = flowsim.losses.square(X, Y)
    traj = flowsim.gradient_flow(net, loss, 10.0, ts=jnp.linspace(0, 10, 101), solver="tsit5")
    pre = jnp.einsum("nd,tjd->tnj", X, traj.models.weights[0])
    crossings = int(jnp.sum(jnp.diff(jnp.sign(pre), axis=0) != 0))
    assert crossings >= 1, "the test problem must cross a kink"
    rejected = int(traj.stats["num_rejected_steps"])
    assert rejected <= 80 * crossings, (rejected, crossings)
    gaps = inv.drift(traj, inv.neuron_gaps)[0]
    assert float(jnp.max(jnp.abs(gaps))) <= 1e-9
    errs = []
    for eta in (1e-2, 5e-3):
        gd = flowsim.gradient_descent(net, loss, round(10 / eta), learning_rate=eta,
                                      save_every=round(10 / eta))
        errs.append(tree_max_abs_diff(gd.final_model(), traj.final_model()))
    assert errs[1] < 0.6 * errs[0], errs  # first order: halving eta halves the gap


def test_bad_arguments():
    mf, loss = _stiff_problem()
    with pytest.raises(ValueError, match="`t1` must be finite and greater than t0"):
        flowsim.gradient_flow(mf, loss, -1.0)
    with pytest.raises(ValueError, match="`solver` must be a diffrax solver or one of"):
        flowsim.gradient_flow(mf, loss, 1.0, solver="rk4")
    with pytest.raises(ValueError, match="`rtol` must be a positive float"):
        flowsim.gradient_flow(mf, loss, 1.0, rtol=0.0)
    with pytest.raises(ValueError, match="`ts` must be non-decreasing and within"):
        flowsim.gradient_flow(mf, loss, 1.0, ts=[0.0, 2.0])


@pytest.mark.parametrize("solver, dense_max", [("tsit5", 2000), ("kvaerno5", 2000),
                                               ("kvaerno5", 0), ("rodas5p", 2000)])
def test_new_tolerances_and_horizon_do_not_recompile(getkey, monkeypatch, solver, dense_max):
    # Tolerances and times are traced: a tolerance sweep compiles once per solver, explicit,
    # implicit with a dense Jacobian, and matrix-free (whose GMRES atol follows atol).
    monkeypatch.setattr(flowsim._solvers, "DENSE_JACOBIAN_MAX", dense_max)
    X = jr.normal(getkey(), (10, 3))
    loss = flowsim.losses.square(X, jr.normal(getkey(), (10, 2)))
    net = MLP((3, 4, 2), "tanh", key=getkey())
    with count_compilations("_flow_solve") as c:
        for tol, t1 in ((1e-6, 1.0), (1e-8, 2.0), (1e-10, 1.5)):
            traj = flowsim.gradient_flow(net, loss, t1, solver=solver, rtol=tol, atol=tol)
            assert bool(traj.succeeded)
    assert c["n"] == 1, f"{solver}: compiled {c['n']} times for 3 tolerances"


def test_layer_gap_drift_statistic(getkey):
    # Homogeneous networks report the a-posteriori check stats["layer_gap_drift"]: max over
    # saved times and layers of |gap_t - gap_0| / max squared norm, per trajectory.
    X = jr.normal(getkey(), (12, 3))
    loss = flowsim.losses.square(X, jr.normal(getkey(), (12, 2)))
    nets = flowsim.init.batch(lambda k: MLP((3, 5, 4, 2), "linear", key=k), 3, key=getkey())
    ts = jnp.linspace(0, 3, 7)
    tight = flowsim.gradient_flow(nets, loss, 3.0, ts=ts, solver="tsit5", rtol=1e-12,
                                  atol=1e-12, batched=True)
    loose = flowsim.gradient_flow(nets, loss, 3.0, ts=ts, solver="tsit5", rtol=1e-3,
                                  atol=1e-3, batched=True)
    for traj in (tight, loose):
        d = np.asarray(traj.stats["layer_gap_drift"])
        assert d.shape == (3,)
        gaps = np.asarray(inv.drift(traj))  # (B, T, 2)
        norms = np.asarray(inv.layer_norms(traj.models))
        expected = np.max(np.abs(gaps), axis=(1, 2)) / np.max(norms, axis=(1, 2))
        np.testing.assert_allclose(d, expected, rtol=1e-12)
    # The check can fail: the loose solve drifts far more than the tight one.
    assert float(np.max(tight.stats["layer_gap_drift"])) <= 1e-9
    assert float(np.min(loose.stats["layer_gap_drift"])) >= 1e3 * float(
        np.max(tight.stats["layer_gap_drift"]))
    tanh = flowsim.gradient_flow(MLP((3, 4, 2), "tanh", key=getkey()), loss, 1.0)
    assert "layer_gap_drift" not in tanh.stats


def test_counting_field_counts_each_evaluation():
    # The instrument itself: k JVPs are k gradients and k products; a linearisation applied
    # m times is 1 gradient and m products; a dense Jacobian (vmapped JVPs) is n products.
    from flowsim import _counting

    A = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    grad = jax.grad(lambda p: 0.5 * p @ A @ p)
    token = _counting.open_counts(1)
    field = jax.jit(lambda p: _counting.counting_field(grad, jnp.asarray(token),
                                                       jnp.asarray(0))(p))
    p, v = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, 1.0, 0.0])

    def counts():
        jax.effects_barrier()
        return {k: int(n[0]) for k, n in _counting._COUNTS[token].items()}

    np.testing.assert_array_equal(field(p), -A @ p)
    assert counts() == {"grad": 1, "hvp": 0}
    for _ in range(3):
        _, hv = jax.jit(lambda p, v: jax.jvp(field, (p,), (v,)))(p, v)
    np.testing.assert_array_equal(hv, -A @ v)
    assert counts() == {"grad": 4, "hvp": 3}
    _, lin = jax.linearize(field, p)
    for _ in range(5):
        lin(v)
    assert counts() == {"grad": 5, "hvp": 8}
    np.testing.assert_array_equal(jax.jacfwd(field)(p), -A)
    assert counts() == {"grad": 6, "hvp": 11}
    _counting.close_counts(token)


@pytest.mark.parametrize("solver, dense_max", [("tsit5", 2000), ("kvaerno5", 2000),
                                               ("kvaerno5", 0)])
def test_count_evals_is_exact_and_changes_nothing(getkey, monkeypatch, solver, dense_max):
    # count_evals=True: the trajectory is bitwise the uncounted one; Tsit5's count equals
    # stages x steps + 1; every gradient is a forward pass of the loss, which an independent
    # host counter on the loss sees (Hessian products reuse a linearisation, or are vmapped
    # over the basis for a dense Jacobian: n products per Jacobian).
    monkeypatch.setattr(flowsim._solvers, "DENSE_JACOBIAN_MAX", dense_max)
    import equinox as eqx

    forward = {"n": 0}

    class CountedLoss(eqx.Module):
        loss: eqx.Module

        def __call__(self, model):
            jax.debug.callback(lambda: forward.__setitem__("n", forward["n"] + 1))
            return self.loss(model)

    X = jr.normal(getkey(), (10, 3))
    loss = CountedLoss(flowsim.losses.square(X, jr.normal(getkey(), (10, 2))))
    net = MLP((3, 4, 2), "tanh", key=getkey())
    n = sum(x.size for x in jax.tree.leaves(eqx.filter(net, eqx.is_array)))
    plain = flowsim.gradient_flow(net, loss, 2.0, solver=solver, rtol=1e-8, atol=1e-8)
    forward["n"] = 0
    counted = flowsim.gradient_flow(net, loss, 2.0, solver=solver, rtol=1e-8, atol=1e-8,
                                    count_evals=True)
    jax.effects_barrier()
    assert tree_max_abs_diff(plain.models, counted.models) == 0.0
    grads, hvps = int(counted.stats["num_grad_evals"]), int(counted.stats["num_hvp_evals"])
    passes = forward["n"] - 1  # minus the saved losses' one (vmapped) evaluation
    if solver == "tsit5":
        assert grads == passes and grads == int(plain.stats["num_grad_evals"]) and hvps == 0
    elif dense_max:
        # A dense Jacobian is n products sharing one forward pass (its gradient is unused).
        assert hvps > 0 and hvps % n == 0, (hvps, n)
        assert grads + hvps // n == passes, (grads, hvps // n, passes)
    else:  # Newton-GMRES: a linearisation (one gradient) per iteration, then GMRES products
        assert grads == passes
        assert hvps >= grads - 2 * int(counted.stats["num_steps"]), (hvps, grads)


def test_count_evals_batched_reports_lanes(getkey):
    X = jr.normal(getkey(), (10, 3))
    loss = flowsim.losses.square(X, jr.normal(getkey(), (10, 2)))
    nets = flowsim.init.batch(lambda k: MLP((3, 4, 2), "tanh", key=k), 3, key=getkey())
    batch = flowsim.gradient_flow(nets, loss, 2.0, solver="kvaerno5", batched=True,
                                  count_evals=True)
    singles = [flowsim.gradient_flow(_member(nets, i), loss, 2.0, solver="kvaerno5",
                                     count_evals=True) for i in range(3)]
    own = [int(s.stats["num_hvp_evals"]) for s in singles]
    lanes = np.asarray(batch.stats["num_hvp_evals"])
    # vmap runs every lane until the slowest member stops: each lane did at least the most
    # any member needed on its own.
    assert lanes.shape == (3,) and np.all(lanes >= max(own)), (lanes, own)
    relu = MLP((3, 4, 2), "relu", key=getkey())
    with pytest.raises(ValueError, match=r"`count_evals` is for smooth solves, but this one takes "
                                          r"the exact-kink path .* pass kinks='smooth'"):
        flowsim.gradient_flow(relu, loss, 1.0, count_evals=True)
    with pytest.raises(ValueError, match=r"`dt0` is for smooth solves"):
        flowsim.gradient_flow(relu, loss, 1.0, dt0=0.1)


class _CountingLoss(flowsim.losses.factorization(jnp.eye(2)).__class__):
    """The factorization loss, counting how often Python runs it (each trace of it)."""

    def __call__(self, model):
        _CountingLoss.calls += 1
        return super().__call__(model)


def test_a_repeated_call_does_not_trace_again():
    """The fixed cost of a call: a second solve of the same signature runs no Python of the
    loss (its check, solve and statistics are all cached), and costs less than 20 ms."""
    import time

    base = flowsim.losses.factorization(jnp.diag(jnp.array([3.0, 1.0])))
    loss = _CountingLoss(**{f: getattr(base, f) for f in base.__dataclass_fields__})
    _CountingLoss.calls = 0
    mf = MatrixFactorization.random(2, 2, 2, scale=0.1, key=jr.key(0))
    first = flowsim.gradient_flow(mf, loss, 10.0, solver="tsit5", rtol=1e-8, atol=1e-8)
    traced = _CountingLoss.calls
    assert traced > 0
    mf2 = MatrixFactorization.random(2, 2, 2, scale=0.2, key=jr.key(1))
    start = time.perf_counter()
    second = flowsim.gradient_flow(mf2, loss, 10.0, solver="tsit5", rtol=1e-8, atol=1e-8)
    elapsed = time.perf_counter() - start
    assert _CountingLoss.calls == traced, "the second call traced the loss again"
    assert float(second.loss[-1]) < 1e-8 and float(first.loss[-1]) < 1e-8
    assert elapsed < 0.02, elapsed


def test_sharpness_early_stop():
    """`rtol` stops the power iteration once two estimates agree: a lower bound close to the
    full estimate (the Hessian's top eigenvalue, here known: 2 s_1 = 6 at the balanced
    minimiser; its spectrum is {6, 4, 4, 2, 0, ...})."""
    s = jnp.array([3.0, 1.0])
    mf = MatrixFactorization(jnp.diag(jnp.sqrt(s)), jnp.diag(jnp.sqrt(s)))  # a minimiser
    loss = flowsim.losses.factorization(jnp.diag(s))
    full = float(flowsim.sharpness(mf, loss))
    fast = float(flowsim.sharpness(mf, loss, rtol=0.05))
    np.testing.assert_allclose(full, 2 * 3.0, rtol=1e-9)
    assert 0.9 * full <= fast < full  # stopped early (5.85 here), within 10 %


def test_auto_above_the_dense_limit_picks_rkc2(monkeypatch):
    """Stiff and above `DENSE_JACOBIAN_MAX` parameters: the stabilised explicit RKC2 (no
    Jacobian), which still reaches T = 1e6 on the stiff factorization where Tsit5 cannot."""
    monkeypatch.setattr(flowsim._solvers, "DENSE_JACOBIAN_MAX", 0)
    mf, loss = _stiff_problem()
    traj = flowsim.gradient_flow(mf, loss, 1e6, rtol=1e-6, atol=1e-6)
    assert traj.solver == "RKC2"
    assert bool(traj.succeeded) and float(traj.loss[-1]) <= 1e-10, float(traj.loss[-1])
    assert int(traj.stats["num_steps"]) < 20_000


def test_smooth_relu_batch_runs_as_its_members():
    # On the CPU a batch of a ReLU network on the smooth path runs the single-trajectory solve
    # over its members (flowsim._members): each member bitwise its single solve; the vmapped
    # batch (SmoothKinks(batch="vmap")) agrees to the tolerance's scale.
    X = jr.normal(jr.key(0), (16, 3))
    loss = flowsim.losses.square(X, X[:, :2])
    nets = flowsim.init.batch(lambda k: MLP((3, 6, 2), "relu", key=k), 4, key=jr.key(1))
    kw = dict(rtol=1e-8, atol=1e-8, solver="tsit5", batched=True)
    looped = flowsim.gradient_flow(nets, loss, 2.0, kinks=flowsim.SmoothKinks(), **kw)
    vmapped = flowsim.gradient_flow(nets, loss, 2.0, kinks=flowsim.SmoothKinks(batch="vmap"),
                                    **kw)
    assert looped.kinks == "smooth" and looped.loss.shape == vmapped.loss.shape == (4, 2)
    for i in range(4):
        one = flowsim.gradient_flow(jax.tree.map(lambda x, i=i: x[i], nets), loss, 2.0,
                                    kinks="smooth", rtol=1e-8, atol=1e-8, solver="tsit5")
        assert tree_max_abs_diff(looped[i].models, one.models) == 0.0
        assert int(looped.stats["num_steps"][i]) == int(one.stats["num_steps"])
    assert tree_max_abs_diff(looped.models, vmapped.models) <= 1e-6
    with pytest.raises(ValueError, match="batch"):
        flowsim.SmoothKinks(batch="threads")
