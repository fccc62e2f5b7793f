"""Exact gradient flow through ReLU kinks: events, crossings, Filippov sliding."""

import re

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import flowsim
from flowsim import invariants as inv
from flowsim._exact.host import kink_flow
from flowsim._exact.problem import _Patterned
from flowsim.models import MLP, TwoLayerReLU

from .helpers import tree_max_abs_diff

T = 100.0


def _two_neurons(seed):
    # Two ReLU neurons, three non-orthogonal points in R^2 (seed 7: a sliding mode at t ~ 3;
    # seed 26: five crossings and two sliding surfaces at once).
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    X = jr.normal(k1, (3, 2))
    y = jr.normal(k2, (3,))
    return TwoLayerReLU.random(2, 2, scale=1.0, key=k3), flowsim.losses.square(X, y)


def _three_neurons():
    # Three ReLU units, four points: eight crossings and a sliding mode before t = 100.
    k1, k2, k3 = jr.split(jr.key(5), 3)
    X = jr.normal(k1, (4, 2))
    Y = jr.normal(k2, (4, 1))
    return MLP((2, 3, 1), "relu", key=k3), flowsim.losses.square(X, Y)


PROBLEMS = {"sliding": lambda: _two_neurons(7), "slide2": lambda: _two_neurons(26),
            "mlp3": _three_neurons}


def _solve(model, loss, record=True):
    ts = np.linspace(0.0, T, 201)
    out, stats, result, pieces = kink_flow(
        model, loss, 0.0, T, ts, dfx.Tsit5(), dfx.PIDController(rtol=1e-12, atol=1e-12),
        100_000, 1000, record=record,
    )
    return out, stats, result, pieces, ts


@pytest.fixture(scope="module")
def solutions():
    return {name: (make(), _solve(*make())) for name, make in PROBLEMS.items()}


def _param_gap(a, b):
    la = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_reaches_t100_and_gd_converges_to_it(name, solutions):
    (model, loss), (out, stats, result, pieces, ts) = solutions[name]
    assert result == 0 and stats["t_reached"] == T, stats
    assert stats["num_steps"] < 5_000, stats  # a smooth adaptive solve stalls here (see below)
    assert stats["num_events"] >= 1
    assert stats["num_sliding_intervals"] >= 1, "these problems must exercise sliding"
    static = eqx.partition(model, eqx.is_inexact_array)[1]
    final = eqx.combine(jax.tree.map(lambda x: x[-1], out), static)
    etas = np.array([2e-3, 1e-3, 5e-4, 2.5e-4])
    gaps = []
    for eta in etas:
        n = round(T / eta)
        gd = flowsim.gradient_descent(model, loss, n, learning_rate=float(eta), save_every=n)
        gaps.append(_param_gap(gd.final_model(), final))
    # GD -> flow at (at least) first order. GD crosses each kink at a step boundary, which adds
    # an O(eta) term that oscillates with eta, so the fitted order is checked loosely (0.8 to 2)
    # and the smallest step must be close (a wrong flow would leave an O(1) gap).
    order = float(np.polyfit(np.log(etas), np.log(gaps), 1)[0])
    assert 0.8 <= order <= 2.0, (gaps, order)
    assert gaps[-1] <= 1e-4, gaps


def _reference_piece(model, loss, piece):
    """Integrates one recorded piece again with scipy's DOP853 at rtol 1e-13: the fixed-pattern
    polynomial ODE, plus, on sliding entries, the Filippov combination solved from the two
    one-sided fields (F = F0 + sum_k lam_k (F_k+ - F_k-), lam from z_S' = 0)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat0, unravel = jax.flatten_util.ravel_pytree(piece["p0"])
    shapes = [z.shape for z in model.forward(loss.X)[1]]

    def unflat(m):
        out, i = [], 0
        for s in shapes:
            n = int(np.prod(s))
            out.append(m[i:i + n].reshape(s))
            i += n
        return tuple(out)

    @jax.jit
    def field_and_zgrad(theta, mask):
        p = unravel(theta)
        pattern = unflat(mask)
        g = jax.grad(lambda q: loss(_Patterned(eqx.combine(q, static), pattern)))(p)
        F = -jax.flatten_util.ravel_pytree(g)[0]

        def z(th):
            zs = eqx.combine(unravel(th), static).forward(loss.X, pattern)[1]
            return jnp.concatenate([v.ravel() for v in zs])

        J = jax.jacfwd(z)(theta)
        return F, J

    mask = np.asarray(piece["mask"], float)
    sliding = piece["sliding"]

    def rhs(t, theta):
        theta = jnp.asarray(theta)
        base = mask.copy()
        base[sliding] = 0.0
        F0, J = field_and_zgrad(theta, jnp.asarray(base))
        F0, J = np.asarray(F0), np.asarray(J)
        if not sliding:
            return F0
        cols = []
        for j in sliding:
            m = base.copy()
            m[j] = 1.0
            cols.append(np.asarray(field_and_zgrad(theta, jnp.asarray(m))[0]) - F0)
        D = np.stack(cols, axis=1)  # F(lam) = F0 + D lam: affine for one hidden layer
        lam = np.linalg.solve(J[sliding] @ D, -J[sliding] @ F0)
        return F0 + D @ lam

    sol = solve_ivp(rhs, (piece["t0"], piece["t1"]), np.asarray(flat0), method="DOP853",
                    rtol=1e-13, atol=1e-13)
    assert sol.success
    return sol.y[:, -1], np.asarray(jax.flatten_util.ravel_pytree(piece["p1"])[0])


@pytest.mark.parametrize("name", ["sliding", "mlp3"])
def test_smooth_pieces_match_independent_reference(name, solutions):
    (model, loss), (_, _, _, pieces, _) = solutions[name]
    worst = 0.0
    for piece in pieces:
        ref, ours = _reference_piece(model, loss, piece)
        worst = max(worst, float(np.max(np.abs(ref - ours)) / max(1.0, np.max(np.abs(ref)))))
    assert worst <= 1e-9, worst


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_neuron_invariants_through_crossings_and_sliding(name, solutions):
    (model, _), (out, _, _, pieces, ts) = solutions[name]
    static = eqx.partition(model, eqx.is_inexact_array)[1]
    models = eqx.combine(jax.tree.map(jnp.asarray, out), static)
    gaps = eqx.filter_vmap(inv.neuron_gaps)(models)
    units = eqx.filter_vmap(lambda m: tuple(
        jnp.sum(i**2, -1) + jnp.sum(o**2, -1) for i, o in m.hidden_units()))(models)
    # Also at every event: the states that ended each piece.
    ends = [eqx.combine(p["p1"], static) for p in pieces]
    end_gaps = [inv.neuron_gaps(m) for m in ends]
    rel = 0.0
    for h, (g, u) in enumerate(zip(gaps, units)):
        rel = max(rel, float(jnp.max(jnp.abs(g - g[0]) / u)))
        for eg in end_gaps:
            rel = max(rel, float(jnp.max(jnp.abs(eg[h] - g[0]) / u[0])))
    assert rel <= 1e-10, rel


@pytest.mark.parametrize("arch", ["two_layer", "mlp", "mlp_bias"])
def test_field_and_pre_from_first_layer_equal_full_pass(arch):
    # With the first layer's pre-activations z1 = X W_1^T given (carried in a piece's state),
    # `pre` evaluates the later layers only and `field` gets W_1's gradient as G^T X: the same
    # numbers as the full pass, to rounding (here exactly equal is not required: 1e-14
    # relative).
    from flowsim._exact.problem import _Problem

    k1, k2, k3 = jr.split(jr.key(11), 3)
    X = jr.normal(k1, (7, 3))
    if arch == "two_layer":
        net, Y = TwoLayerReLU.random(3, 5, key=k3), jr.normal(k2, (7,))
    else:
        net, Y = MLP((3, 5, 4, 2), "relu", use_bias=arch == "mlp_bias", key=k3), \
            jr.normal(k2, (7, 2))
    loss = flowsim.losses.square(X, Y)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    zs = net.forward(X)[1]
    problem = _Problem(static, loss, tuple(z.shape for z in zs))
    z = jnp.concatenate([v.ravel() for v in zs])
    # Slopes in between too, as on sliding entries.
    mask = (z > 0).astype(z.dtype).at[jnp.array([2, z.size - 3])].set(jnp.array([0.3, 0.7]))
    z1 = problem.first(params)
    assert float(jnp.max(jnp.abs(z1 - zs[0]))) <= 1e-14 * float(jnp.max(jnp.abs(zs[0])))
    full, short = problem.pre(params, mask), problem.pre(params, mask, z1)
    assert float(jnp.max(jnp.abs(full - short))) <= 1e-14 * float(jnp.max(jnp.abs(full)))
    full, short = problem.field(params, mask), problem.field(params, mask, z1)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(full))
    assert tree_max_abs_diff(full, short) <= 1e-14 * scale


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_carried_first_layer_changes_no_event(name, solutions, monkeypatch):
    # Wide inputs (`_FIRST_STATE_MIN_INPUTS`; here any width) make each piece carry the first
    # layer's pre-activations in its state (the event function reads them off; `_WithFirst`);
    # the fixture's solves, on two inputs, take a product with the data at every event
    # evaluation. The steps (the controller's norm sees the parameters only), the events and
    # the states agree, to rounding.
    from flowsim._exact import events
    from flowsim._exact.problem import _Problem

    (model, loss), (out, stats, _, _, _) = solutions[name]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    problem = _Problem(static, loss, tuple(z.shape for z in model.forward(loss.X)[1]))
    controller = dfx.PIDController(rtol=1e-12, atol=1e-12)
    assert not events._carries_first(problem, dfx.Tsit5(), controller)
    monkeypatch.setattr(events, "_FIRST_STATE_MIN_INPUTS", 0)
    assert events._carries_first(problem, dfx.Tsit5(), controller)
    assert not events._carries_first(problem, dfx.Kvaerno5(), controller)  # implicit
    carried, carried_stats, result, _, _ = _solve(model, loss, record=False)
    assert result == 0 and carried_stats == stats, (carried_stats, stats)
    # Measured: 4e-15 to 2e-14 (states of size ~1).
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(out), jax.tree.leaves(carried))) <= 1e-12


def test_inverse_by_lu_falls_back_to_pseudo_inverse():
    # The sliding slopes' Jacobian is inverted by LU where that is accurate, by the
    # pseudo-inverse where J is singular (more entries sliding than a unit has inputs).
    from flowsim._exact.problem import _LSTSQ_RCOND, _inverse

    rng = np.random.default_rng(0)
    J = rng.standard_normal((40, 40))
    X = np.asarray(_inverse(jnp.asarray(J)))
    assert np.max(np.abs(X - np.linalg.inv(J))) <= 1e-12 * np.max(np.abs(X))
    # Rank 39: the LU inverse would be ~1e15 large; the fallback gives the pseudo-inverse.
    S = rng.standard_normal((40, 39)) @ rng.standard_normal((39, 40))
    X = np.asarray(_inverse(jnp.asarray(S)))
    P = np.linalg.pinv(S, rcond=_LSTSQ_RCOND)
    assert np.max(np.abs(X - P)) <= 1e-10 * np.max(np.abs(P))
    assert np.max(np.abs(S @ X @ S - S)) <= 1e-10 * np.max(np.abs(S))


def test_smooth_solver_stalls_where_exact_succeeds():
    model, loss = _two_neurons(7)
    with pytest.warns(flowsim.FlowWarning, match="maximum number of solver steps"):
        smooth = flowsim.gradient_flow(model, loss, T, solver="tsit5", kinks="smooth",
                                       max_steps=5_000, throw=False)
    assert float(smooth.stats["t_reached"]) < 10.0  # stuck in the sliding mode near t ~ 3
    exact = flowsim.gradient_flow(model, loss, T, solver="tsit5")
    assert bool(exact.succeeded) and int(exact.stats["num_sliding_intervals"]) == 1


def test_orthogonal_inputs_unit_stays_at_kink():
    # Boursier et al.: with orthogonal inputs, a unit whose pre-activation on x_n reaches zero
    # from the active side receives no more gradient along x_n: it stays exactly at the kink.
    X = jnp.eye(3)[:2] * jnp.array([[1.0], [0.7]])
    y = jnp.array([1.0, -0.5])
    W = jnp.array([[0.3, 0.2, 0.1], [0.05, -0.3, 0.2]])
    a = jnp.array([0.4, -0.2])
    model, loss = TwoLayerReLU(W, a), flowsim.losses.square(X, y)
    out, stats, result, pieces, ts = _solve(model, loss)
    assert result == 0
    # Unit 0 is active on x_1 (label -0.5 but a_0 > 0): its pre-activation falls to zero.
    z = np.einsum("nd,tjd->tnj", np.asarray(X), out.W)
    entry = 1 * 2 + 0  # (sample 1, unit 0) in the flattened (n, units) pre-activations
    cross_t = next((p["t1"] for p in pieces if ("cross", entry) in p["events"]), None)
    assert cross_t is not None, [p["events"] for p in pieces]
    after = ts > cross_t
    assert np.max(np.abs(z[after, 1, 0])) <= 1e-14, np.max(np.abs(z[after, 1, 0]))
    assert float(np.min(z[~after, 1, 0])) > 0


def test_leaky_relu_and_batched_exact(tmp_path):
    k1, k2, k3 = jr.split(jr.key(4), 3)
    X = jr.normal(k1, (4, 2))
    Y = jr.normal(k2, (4, 1))
    nets = flowsim.init.batch(lambda k: MLP((2, 3, 1), "leaky_relu", key=k), 2, key=k3)
    loss = flowsim.losses.square(X, Y)
    kw = dict(solver="tsit5", rtol=1e-12, atol=1e-12)
    kinks = flowsim.ExactKinks(checkpoint=tmp_path / "b.npz")
    batch = flowsim.gradient_flow(nets, loss, 5.0, batched=True, kinks=kinks, **kw)
    assert np.all(np.asarray(batch.succeeded))
    # One checkpoint per member; a rerun returns the finished members from their files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-0.npz", "b-1.npz"]
    again = flowsim.gradient_flow(nets, loss, 5.0, batched=True, kinks=kinks, **kw)
    assert tree_max_abs_diff(again.models, batch.models) == 0.0
    assert int(np.sum(np.asarray(batch.stats["num_events"]))) >= 1
    for i in range(2):
        single = flowsim.gradient_flow(jax.tree.map(lambda x, i=i: x[i], nets), loss, 5.0, **kw)
        assert _param_gap(single.final_model(), batch[i].final_model()) <= 1e-12
    d = inv.drift(batch, inv.neuron_gaps)[0]
    assert float(jnp.max(jnp.abs(d))) <= 1e-10


def test_orthogonal_four_units_no_missed_crossing():
    # Regression: a hit with a far side at rounding level (z' = 0 exactly with orthogonal
    # inputs) was taken for sliding with slope 0, and its release condition, negative from
    # the start, hid every later crossing. The flow must follow GD as eta -> 0.
    X = flowsim.data.orthogonal_inputs(4, 4, key=jr.key(0))
    y = jnp.array([1.0, 0.8, -0.5, -0.3])
    kw, _ = jr.split(jr.key(20))
    W = 1e-3 * jr.normal(kw, (4, 4))
    net = TwoLayerReLU(W, jnp.linalg.norm(W, axis=1) * jnp.array([1.0, 1.0, -1.0, -1.0]))
    loss = flowsim.losses.square(X, y)
    flow = flowsim.gradient_flow(net, loss, 60.0, rtol=1e-10, atol=1e-12)
    errs = []
    for eta in (1e-2, 1e-3):
        gd = flowsim.gradient_descent(net, loss, round(60 / eta), learning_rate=eta,
                                      save_every=round(60 / eta))
        errs.append(abs(float(gd.loss[-1]) / float(flow.loss[-1]) - 1))
    assert errs[1] < 0.3 * errs[0] and errs[1] <= 1e-3, errs  # GD(eta) -> flow, O(eta)


def _coupled_sliding(bias=False):
    """Point 0 on the kinks of layer-1 unit 0 and layer-2 unit 1 of a 3-4-4-2 ReLU MLP
    (`bias`: with biases): (problem, params, mask, sliding entries)."""
    from flowsim._exact.problem import _Problem

    k1, k2, k3 = jr.split(jr.key(0), 3)
    X = jr.normal(k1, (5, 3))
    Y = jr.normal(k2, (5, 2))
    e = int(bias)
    W1, W2, W3 = (jr.normal(k, s) for k, s in zip(jr.split(k3, 3),
                                                   [(4, 3 + e), (4, 4 + e), (2, 4 + e)]))
    one = jnp.ones(e)
    x0 = jnp.concatenate([X[0], one])
    W1 = W1.at[0].add(-(W1[0] @ x0) / (x0 @ x0) * x0)
    h0 = jnp.concatenate([jax.nn.relu(W1 @ x0), one])
    W2 = W2.at[1].add(-(W2[1] @ h0) / (h0 @ h0) * h0)
    net = MLP.from_weights([W1, W2, W3], "relu", use_bias=bias)
    loss = flowsim.losses.square(X, Y)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    zs = net.forward(X)[1]
    problem = _Problem(static, loss, tuple(z.shape for z in zs))
    z = jnp.concatenate([v.ravel() for v in zs])
    sliding = [0 * 4 + 0, 5 * 4 + 0 * 4 + 1]  # (point 0, unit 0) in layer 1, (0, 1) in layer 2
    assert float(jnp.max(jnp.abs(z[jnp.array(sliding)]))) <= 1e-14
    return problem, params, (z > 0).astype(z.dtype), sliding


def test_sliding_slopes_solve_coupled_layers():
    # Regression: two sliding entries of one data point in consecutive layers make z' bilinear
    # in their slopes; one Newton step left |z'| ~ 1e-5 there, the solution released one of
    # them at once and the flow chattered (thousands of slide/release events). The slopes must
    # make z' vanish on every sliding surface to rounding.
    from flowsim._exact.sliding import _sliding_arrays, solve_slopes

    problem, params, mask, sliding = _coupled_sliding()
    # The per-point path (rows of the sliding entries' points only) and the full one agree.
    new_mask, lam, field = solve_slopes(problem, params, mask,
                                        _sliding_arrays(sliding, problem.shapes, True))
    full_mask, full_lam, _ = solve_slopes(problem, params, mask,
                                          _sliding_arrays(sliding, problem.shapes, False))
    assert float(jnp.max(jnp.abs(lam - full_lam))) <= 1e-12, (lam, full_lam)
    reference = problem.field(params, new_mask)
    scale_f = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(reference))
    assert tree_max_abs_diff(field, reference) <= 1e-14 * scale_f
    zdot = problem.zdot(params, new_mask)

    def z_sliding(l1, l2):
        return problem.zdot(params, mask.at[jnp.array(sliding)].set(jnp.array([l1, l2])))

    scale = float(jnp.max(jnp.abs(problem.zdot(params, mask))))
    # Coupled: the mixed second difference of z' in the two slopes is not zero (bilinear).
    mixed = z_sliding(0.0, 0.0) + z_sliding(1.0, 1.0) - z_sliding(1.0, 0.0) - z_sliding(0.0, 1.0)
    assert float(jnp.max(jnp.abs(mixed[jnp.array(sliding)]))) >= 1e-3 * scale
    # One chord step from the affine solution left |z'| = 9 x scale here; Newton: 3e-18.
    assert float(jnp.max(jnp.abs(zdot[jnp.array(sliding)]))) <= 1e-12 * scale, zdot[:2]
    assert np.all(np.isfinite(np.asarray(lam)))


@pytest.mark.slow  # 30 s; an optimisation of the host-side reference loop only
def test_separate_event_conditions_match_their_minimum(monkeypatch):
    # Crossings and releases are located as two conditions (a crossing then costs forward
    # passes only); when a crossing was located but a release came first, the piece is re-run
    # with their minimum. Always using the minimum gives the same events and states.
    # Three neurons on four points in R^2, seed 45: 7 crossings, 2 sliding intervals, 2
    # releases, one re-run.
    from flowsim._exact import host

    k1, k2, k3 = jr.split(jr.key(45), 3)
    model = TwoLayerReLU.random(2, 3, scale=1.0, key=k3)
    loss = flowsim.losses.square(jr.normal(k1, (4, 2)), jr.normal(k2, (4,)))
    ts = np.linspace(0.0, 30.0, 31)
    piece, combined = host._piece, []

    def run():
        return kink_flow(model, loss, 0.0, 30.0, ts, dfx.Tsit5(),
                         dfx.PIDController(rtol=1e-10, atol=1e-10), 100_000, 1000)

    def counting(*args, **kwargs):
        combined.append(kwargs.get("combined", False))
        return piece(*args, **kwargs)

    monkeypatch.setattr(host, "_piece", counting)
    out, stats, result, _ = run()
    assert result == 0 and stats["num_releases"] >= 1 and any(combined), stats
    monkeypatch.setattr(host, "_piece", lambda *a, **k: piece(*a, **{**k, "combined": True}))
    out_min, stats_min, _, _ = run()
    for key in ("num_events", "num_crossings", "num_sliding_intervals", "num_releases"):
        assert stats[key] == stats_min[key], (key, stats, stats_min)
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(out), jax.tree.leaves(out_min))) <= 1e-10


@pytest.mark.parametrize("per_point", [True, False])
def test_sliding_entry_zero_next_to_padding(per_point):
    # Regression: the sliding set is padded to a power of two with index 0; when entry 0 itself
    # slid, the padding's write raced its slope in the scatter, the slope had no effect, z'
    # stayed nonzero there and the entry chattered (slide, release, 2e-10 later slide again:
    # 2,000 events on a two-neuron problem). Three entries (padded to four), entry 0 first.
    from flowsim._exact.problem import _Problem
    from flowsim._exact.sliding import _sliding_arrays, solve_slopes

    k1, k2, k3 = jr.split(jr.key(1), 3)
    X = jr.normal(k1, (5, 3))
    W1, W2 = jr.normal(k3, (4, 3)), jr.normal(k2, (1, 4))
    for unit in range(3):  # unit u on the kink of point u: entries 0, 5, 10
        x = X[unit]
        W1 = W1.at[unit].add(-(W1[unit] @ x) / (x @ x) * x)
    net = MLP.from_weights([W1, W2], "relu")
    loss = flowsim.losses.square(X, jr.normal(k2, (5, 1)))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    zs = net.forward(X)[1]
    problem = _Problem(static, loss, tuple(z.shape for z in zs))
    z = jnp.concatenate([v.ravel() for v in zs])
    sliding = [0, 5, 10]
    assert float(jnp.max(jnp.abs(z[jnp.array(sliding)]))) <= 1e-14
    mask = (z > 0).astype(z.dtype)
    mask_s, lam, _ = eqx.filter_jit(solve_slopes)(
        problem, params, mask, _sliding_arrays(sliding, problem.shapes, per_point))
    zdot = problem.zdot(params, mask_s)
    assert float(jnp.max(jnp.abs(zdot[jnp.array(sliding)]))) <= 1e-12 * float(
        jnp.max(jnp.abs(zdot))), (lam, zdot[jnp.array(sliding)])


@pytest.mark.parametrize("per_point, rowwise_min", [(True, 16), (True, 0), (False, 16)])
def test_sliding_chord_from_guess_equals_newton(per_point, rowwise_min, monkeypatch):
    # Over a piece the slopes are solved by chord iterations from the piece's start
    # (`slope_guess`: slopes and the Jacobian's pseudo-inverse there), Newton taking over if
    # they stall; without a guess, by chord iterations with the Jacobian at slopes 0. On the
    # bilinear (coupled-layer) system, for moves of theta from a piece's typical size to ones
    # that change the slopes by O(1) (further on, no real root exists: Newton from 0 does not
    # converge either), both reach the slopes of plain Newton from 0 (written out here); with
    # a useless Jacobian (negated: the chord diverges) Newton restarts from 0 and gives them,
    # with the forward-mode Jacobian or (`rowwise_min` 0, as with many entries sliding) the
    # row-wise one.
    import dataclasses

    from flowsim._exact import sliding as slopes
    from flowsim._exact.sliding import _sliding_arrays, slope_guess, slope_system, solve_slopes

    monkeypatch.setattr(slopes, "_ROWWISE_MIN", rowwise_min)
    problem, params, mask, sliding = _coupled_sliding()
    solve = eqx.filter_jit(lambda p, sl: solve_slopes(problem, p, mask, sl))
    plain = _sliding_arrays(sliding, problem.shapes, per_point)
    guess = slope_guess(problem, params, mask, plain)
    assert float(jnp.max(jnp.abs(guess.lam - solve(params, plain)[1]))) == 0.0
    direction = jax.tree.map(lambda x: jr.normal(jr.key(x.size), x.shape), params)
    bad = dataclasses.replace(guess, pinv=-guess.pinv)
    k = plain.idx.shape[0]
    both = plain.valid[:, None] & plain.valid[None, :]

    @eqx.filter_jit
    def newton_slopes(p):
        _, _, residual, jac = slope_system(problem, p, mask, plain, rowwise=False)

        def step(_, lam):
            J = jnp.where(both, jac(lam), jnp.eye(k))
            return lam - jnp.linalg.lstsq(J, residual(lam))[0]
        return jax.lax.fori_loop(0, 30, step, jnp.zeros(k))

    for size, sl in ((1e-4, guess), (1e-2, guess), (3e-2, guess), (1e-2, bad)):
        moved = jax.tree.map(lambda x, d, size=size: x + size * d, params, direction)
        newton = solve(moved, plain)
        lam_newton = newton_slopes(moved)
        assert float(jnp.max(jnp.abs(newton[1] - lam_newton))) <= 1e-12, size
        chord = solve(moved, sl)
        zdot = problem.zdot(moved, chord[0])
        assert float(jnp.max(jnp.abs(zdot[jnp.array(sliding)]))) <= 1e-12 * float(
            jnp.max(jnp.abs(zdot))), size
        assert float(jnp.max(jnp.abs(chord[1] - newton[1]))) <= 1e-12, (size, chord[1],
                                                                         newton[1])
        scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(newton[2]))
        assert tree_max_abs_diff(chord[2], newton[2]) <= 1e-12 * scale


@pytest.mark.parametrize("arch", ["mlp", "mlp_bias", "two_layer"])
def test_sliding_jacobian_from_rows_equals_forward_mode(arch):
    # For a per-point loss the slopes' Jacobian is built from one row per sliding entry
    # (A B^T + D, `_sliding_jacobian`, the first layer's part of A B^T from the outer-product
    # structure, with the bias column appended to the inputs, u and v from each point as a
    # network with input 1); it must equal forward-mode autodiff through the residual. The
    # identity holds at any state and slopes, so it is checked away from the solution too:
    # five entries (MLP: two points with entries in both layers, two in one layer, point 0
    # among them, so next to the padding of the bucket of 8), random slopes.
    from flowsim._exact.problem import _Problem
    from flowsim._exact.sliding import _sliding_arrays, slope_system

    if arch == "two_layer":
        X = jr.normal(jr.key(3), (5, 3))
        net = TwoLayerReLU(jr.normal(jr.key(4), (4, 3)), jr.normal(jr.key(5), (4,)))
        loss = flowsim.losses.square(X, jr.normal(jr.key(6), (5,)))
        params, static = eqx.partition(net, eqx.is_inexact_array)
        z = net.forward(X)[1][0]
        problem = _Problem(static, loss, (z.shape,))
        mask = (z.ravel() > 0).astype(z.dtype)
        entries = [0, 2, 1 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3]
    else:
        problem, params, mask, _ = _coupled_sliding(arch == "mlp_bias")
        entries = [0, 2, 5 * 4 + 0 * 4 + 1, 5 * 4 + 3 * 4 + 2, 3 * 4 + 1]
    assert problem.dense_first
    sl = _sliding_arrays(entries, problem.shapes, True)
    assert sl.idx.shape[0] == 8
    _, _, residual, jac = slope_system(problem, params, mask, sl)
    for key in range(3):
        lam = jr.uniform(jr.key(key), (8,), dtype=mask.dtype)
        rows = jax.jit(jac)(lam)
        forward = jax.jit(jax.jacfwd(residual))(lam)
        scale = float(jnp.max(jnp.abs(forward)))
        assert scale > 0
        assert float(jnp.max(jnp.abs((rows - forward)[:5, :5]))) <= 1e-13 * scale, (rows,
                                                                                 forward)


def test_auto_is_exact_up_to_the_surface_limit():
    # kinks="auto": exact up to EXACT_KINKS_MAX_SURFACES (points x hidden units), smooth above;
    # Trajectory.kinks records the choice, an explicit "exact" is honoured at any size.
    from flowsim.kinks import EXACT_KINKS_MAX_SURFACES

    units = 100
    net = MLP((2, units, 1), "relu", key=jr.key(0))
    for n, expected in ((EXACT_KINKS_MAX_SURFACES // units, "exact"),
                        (EXACT_KINKS_MAX_SURFACES // units + 1, "smooth")):
        X = jr.normal(jr.key(1), (n, 2))
        loss = flowsim.losses.square(X, jnp.zeros((n, 1)))
        if expected == "smooth":  # never silently: the warning says why and how to insist
            with pytest.warns(flowsim.KinksWarning, match=r"kinks='auto'.*pass kinks='exact'"):
                traj = flowsim.gradient_flow(net, loss, 1e-3, solver="tsit5", rtol=1e-6,
                                             atol=1e-6)
        else:
            traj = flowsim.gradient_flow(net, loss, 1e-3, solver="tsit5", rtol=1e-6, atol=1e-6)
        assert traj.kinks == expected, (n, traj.kinks)
        assert ("num_events" in traj.stats) == (expected == "exact")
    for kinks in ("exact", flowsim.ExactKinks()):
        forced = flowsim.gradient_flow(net, loss, 1e-3, solver="tsit5", rtol=1e-6, atol=1e-6,
                                       kinks=kinks)
        assert forced.kinks == "exact"
    smooth = flowsim.gradient_flow(net, loss, 1e-3, solver="tsit5", rtol=1e-6, atol=1e-6,
                                   kinks=flowsim.SmoothKinks())
    assert smooth.kinks == "smooth" and smooth.events is None
    tanh = MLP((2, 3, 1), "tanh", key=jr.key(0))
    assert flowsim.gradient_flow(tanh, loss, 1e-3).kinks is None


@pytest.mark.parametrize(
    "name, f, lower, upper, root, max_evals",
    [
        # a simple root: superlinear (bisection needs 2 + 52 evaluations on [0, 1])
        ("smooth", lambda t: 0.3 - t + 0.2 * t**2, 0.0, 1.0, (5 - 19**0.5) / 2, 12),
        ("steep", lambda t: jnp.exp(-50 * t) - 1e-3, 0.0, 1.0, np.log(1e3) / 50, 25),
        # a min over entries, kinked in t (the event function of several pre-activations)
        ("min", lambda t: jnp.minimum(0.7 - t, 1.2 * (0.5 - t) + 0.1), 0.0, 1.0, 7 / 12, 12),
        # a scaled event function (`_event_weights`): near-linear and concave, secant points
        # close in from below superlinearly; no bisection while |f| falls a thousandfold a
        # step (8 evaluations with a bisection on the third step)
        ("scaled", lambda t: 1 - t / 2.4265e-4 - 1e-5 * (t / 2.4265e-4) ** 2, 0.0, 3.24e-3,
         (-1 + (1 + 4e-5) ** 0.5) / 2e-5 * 2.4265e-4, 7),
        # a triple root: regula falsi stalls, the bisection safeguard bounds the cost
        ("triple", lambda t: -((t - 0.25) ** 3), 0.0, 1.0, 0.25, 3 * 54),
        # a tiny bracket on an event time far from 0 (rtol matters)
        ("offset", lambda t: 20.0 + 1e-7 - t, 19.9, 20.1, 20.0 + 1e-7, 12),
    ],
)
def test_illinois_event_root_finder(name, f, lower, upper, root, max_evals):
    import optimistix as optx

    from flowsim._exact.illinois import _ROOT_FINDER

    calls = {"n": 0}

    def fn(t, args):
        jax.debug.callback(lambda: calls.__setitem__("n", calls["n"] + 1))
        return f(t)

    sol = optx.root_find(fn, _ROOT_FINDER, jnp.asarray(upper),
                         options=dict(lower=lower, upper=upper), throw=False)
    jax.effects_barrier()
    t = float(sol.value)
    tol = 1e-15 + 1e-15 * abs(root)
    # Within the bracket tolerance (plus rounding of the root itself), on the far side.
    assert abs(t - root) <= 4 * tol + 4 * np.spacing(root), (name, t - root)
    assert float(f(jnp.asarray(t))) <= 0.0
    assert calls["n"] <= max_evals, (name, calls["n"])


def test_event_weights_keep_the_first_root_and_speed_its_location():
    # The event function is min_j w_j (s_j z_j + offset_j): positive weights keep every
    # entry's root, so the first root of the min is the first hit; `_event_weights` makes
    # each term 1 at the piece's start. Unweighted, the entry handled at the last event
    # (offset 1e-13, moving away) is the min near the start and secant points land next to
    # it; weighted, the min falls from 1 to 0 nearly linearly. Entries on quadratic paths.
    import optimistix as optx

    from flowsim._exact.events import _event_weights
    from flowsim._exact.illinois import _ROOT_FINDER

    n = 40
    k0, k1, k2, k3 = jr.split(jr.key(7), 4)
    z0 = np.array(jr.uniform(k0, (n,), minval=0.1, maxval=1.0))
    zd = np.array(jr.uniform(k1, (n,), minval=-1.0, maxval=1.0))
    zdd = np.asarray(jr.normal(k2, (n,)))
    sign = np.where(np.asarray(jr.bernoulli(k3, 0.5, (n,))), 1.0, -1.0)
    z0 *= sign  # every entry on its side
    offset = np.zeros(n)
    # entry 0 crossed at the start (z = 0 now on its new side, moving away); entry 1 slides;
    # entry 2 is the first to hit, at t = 2.4e-4
    z0[0], zd[0], sign[0], offset[0] = 0.0, 1e-3, 1.0, 1e-13
    sign[1] = 0.0
    zd[2] = -sign[2] * abs(z0[2]) / 2.4e-4
    w = _event_weights(sign, offset, z0)
    on = sign != 0
    assert np.all(np.isfinite(w)) and np.all(w > 0) and np.all(w[~on] == 1.0)
    assert np.max(np.abs(w[on] * (sign[on] * z0[on] + offset[on]) - 1)) <= 4e-16

    def value(weights):
        def f(t, args):
            z = z0 + t * zd + 0.5 * t**2 * zdd
            jax.debug.callback(lambda: calls.__setitem__("n", calls["n"] + 1))
            return jnp.min(jnp.where(on, weights * (sign * z + offset), jnp.inf))
        return f

    # The first root: of entry 2's quadratic, the earliest of all entries' (checked).
    a, b, c = 0.5 * sign[on] * zdd[on], sign[on] * zd[on], sign[on] * z0[on] + offset[on]
    disc = np.sqrt(np.maximum(b**2 - 4 * a * c, 0.0))
    q = -0.5 * (b + np.copysign(disc, b))  # the roots without cancellation: q / a, c / q
    roots_on = np.stack([q / a, c / q])
    roots = np.full(n, np.inf)
    roots[on] = np.where((roots_on > 0) & (b**2 >= 4 * a * c), roots_on, np.inf).min(axis=0)
    first = float(np.min(np.where(on, roots, np.inf)))
    assert np.argmin(np.where(on, roots, np.inf)) == 2
    counts = {}
    for name, weights in (("plain", np.ones(n)), ("weighted", w)):
        calls = {"n": 0}
        sol = optx.root_find(value(jnp.asarray(weights)), _ROOT_FINDER, jnp.asarray(3.24e-3),
                             options=dict(lower=0.0, upper=3.24e-3), throw=False)
        jax.effects_barrier()
        assert abs(float(sol.value) - first) <= 4 * (1e-15 + 1e-15 * first), name  # 4 tol
        counts[name] = calls["n"]
    assert counts["weighted"] <= 14 and counts["plain"] >= 3 * counts["weighted"], counts


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_sliding_rows_equal_full_field(arch):
    # The per-point sliding solve (rows of the sliding entries' points) against the full one
    # for entries in different layers and points, on an MLP and on a ConvNet (whose
    # pre-activations are (points, channels, height, width)); the algebra holds off the
    # surfaces too, so any entries will do.
    from flowsim._exact.problem import _Problem
    from flowsim._exact.sliding import _sliding_arrays, solve_slopes
    from flowsim.models import ConvNet

    k1, k2, k3 = jr.split(jr.key(4), 3)
    if arch == "mlp":
        X = jr.normal(k1, (6, 3))
        net = MLP((3, 5, 4, 2), "relu", key=k3)
        Y = jr.normal(k2, (6, 2))
    else:
        X = jr.normal(k1, (4, 1, 6, 6))
        net = ConvNet((1, 6, 6), (3, 2), 2, kernel_size=3, key=k3)
        Y = jr.normal(k2, (4, 2))
    loss = flowsim.losses.square(X, Y)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    zs = net.forward(X)[1]
    problem = _Problem(static, loss, tuple(z.shape for z in zs))
    z = jnp.concatenate([v.ravel() for v in zs])
    mask = (z > 0).astype(z.dtype)
    first = zs[0].size
    sliding = [1, 7, first + 3, z.size - 2]  # two points of layer 1, two of layer 2
    rows = solve_slopes(problem, params, mask, _sliding_arrays(sliding, problem.shapes, True))
    full = solve_slopes(problem, params, mask, _sliding_arrays(sliding, problem.shapes, False))
    assert float(jnp.max(jnp.abs(rows[1] - full[1]))) <= 1e-10, (rows[1], full[1])
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(full[2]))
    assert tree_max_abs_diff(rows[2], full[2]) <= 1e-12 * scale
    assert tree_max_abs_diff(rows[2], problem.field(params, full[0])) <= 1e-12 * scale


def test_event_budget_failure_names_max_events():
    X = jnp.array([[1.0, 0.2], [0.3, 1.0], [-0.8, 0.5]])
    Y = jnp.array([[1.0], [0.5], [-0.3]])
    net = MLP((2, 3, 1), "relu", init_std=0.5, key=jr.key(3))
    loss = flowsim.losses.square(X, Y)
    with pytest.raises(flowsim.FlowFailed, match="more kink events than max_events") as err:
        flowsim.gradient_flow(net, loss, 10.0, kinks=flowsim.ExactKinks(max_events=0))
    assert "max_steps" not in str(err.value)
    with pytest.warns(flowsim.FlowWarning, match=r"raise ExactKinks\(max_events=") as warned:
        traj = flowsim.gradient_flow(net, loss, 10.0, kinks=flowsim.ExactKinks(max_events=0),
                                     throw=False)
    # The warning does not advise passing the throw=False that was passed.
    assert "pass throw=False" not in str(warned[0].message)
    assert traj.result == flowsim.RESULTS.max_events_reached
    assert float(traj.stats["t_reached"]) < 10.0


@pytest.mark.parametrize("kinks", ["exact", "smooth"])
def test_progress_bar_changes_nothing(kinks, capsys):
    X = jnp.array([[1.0, 0.2], [0.3, 1.0], [-0.8, 0.5]])
    Y = jnp.array([[1.0], [0.5], [-0.3]])
    net = MLP((2, 3, 1), "relu", init_std=0.5, key=jr.key(3))
    loss = flowsim.losses.square(X, Y)
    quiet = flowsim.gradient_flow(net, loss, 10.0, kinks=kinks, solver="tsit5")
    capsys.readouterr()
    shown = flowsim.gradient_flow(net, loss, 10.0, kinks=kinks, solver="tsit5", progress=True)
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert re.search(r"\d%\|", err) and ("exact kinks" in err) == (kinks == "exact"), err[-300:]
    assert tree_max_abs_diff(quiet.models, shown.models) == 0.0


def test_checkpoint_resumes_bitwise_after_interrupt(solutions, tmp_path, monkeypatch):
    # Interrupted while an entry slides, the solve resumes from its checkpoint to the very
    # same solution and statistics as the uninterrupted one (slide2: 5 crossings, 2 slides).
    from flowsim._exact import host

    (model, loss), (full, full_stats, *_) = solutions["slide2"]
    path = tmp_path / "slide2.npz"
    monkeypatch.setattr(host, "CHECKPOINT_SECONDS", 0.0)  # save at every piece start
    piece, calls = host._piece, []

    def interrupted(*args, **kw):
        calls.append(None)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return piece(*args, **kw)

    monkeypatch.setattr(host, "_piece", interrupted)
    args = (model, loss, 0.0, T, np.linspace(0.0, T, 201), dfx.Tsit5(),
            dfx.PIDController(rtol=1e-12, atol=1e-12), 100_000, 1000)
    with pytest.raises(KeyboardInterrupt):
        kink_flow(*args, checkpoint=path)
    saved = host._Checkpoint(path, eqx.filter(model, eqx.is_inexact_array), loss, 0.0, T,
                             args[4], args[5], args[6]).load()
    assert saved["sliding"] and not saved["done"] and 0 < saved["t"] < T, saved["t"]
    monkeypatch.setattr(host, "_piece", piece)
    out, stats, result, _ = kink_flow(*args, checkpoint=path)
    assert result == 0 and stats == full_stats
    assert tree_max_abs_diff(out, full) == 0.0
    # The file's history: a row [t, events, sliding, seconds] per write, kept over the resume.
    history = np.array(host.checkpoint_info(path)["history"])
    assert history.shape[1] == 4 and history.shape[0] > len(calls)
    assert history[-1, 0] == T and history[-1, 1] == full_stats["num_events"]
    assert np.all(np.diff(history[:, :2], axis=0) >= 0)
    # A finished solve is returned from its file without integrating again.
    monkeypatch.setattr(host, "_piece", None)
    again = kink_flow(*args, checkpoint=path)
    assert again[2] == 0 and tree_max_abs_diff(again[0], full) == 0.0
    # Another problem's file is refused, naming the argument and the fix.
    other = args[:6] + (dfx.PIDController(rtol=1e-11, atol=1e-12),) + args[7:]
    with pytest.raises(ValueError, match=r"^checkpoint: .* different problem.*delete it"):
        kink_flow(*other, checkpoint=path)
    with pytest.raises(ValueError, match=r"^checkpoint: the folder of .* does not exist"):
        kink_flow(*args, checkpoint=tmp_path / "missing" / "run.npz")
    # A checkpoint never silently unused: AutoKinks that would go smooth (here: a surface
    # limit below this problem's) refuses it.
    auto = flowsim.AutoKinks(exact=flowsim.ExactKinks(checkpoint=path), max_surfaces=1)
    with pytest.raises(ValueError, match="`checkpoint` is for the exact-kink path, but "
                                         "AutoKinks takes the smooth path"):
        flowsim.gradient_flow(model, loss, 1.0, kinks=auto)


def test_sliding_bucket_sizes():
    # Sliding sets are padded to a few sizes (each compiles once): powers of two up to 64,
    # then multiples of an eighth of the next power of two, padding below a quarter.
    from flowsim._exact.sliding import _bucket

    sizes = np.array([_bucket(k) for k in range(1, 4097)])
    ks = np.arange(1, 4097)
    assert _bucket(0) == 0 and np.all(sizes >= ks) and np.all(np.diff(sizes) >= 0)
    small = sizes[:64]
    assert np.all(small & (small - 1) == 0)  # powers of two
    assert np.all(sizes[64:] < 1.25 * ks[64:])
    assert len(set(sizes.tolist())) == 7 + 4 * 6  # 1 ... 64, then 4 per doubling to 4096


def test_checkpoint_guess_repadded_to_another_bucket():
    # A checkpoint's sliding guess written under one padding resumes under another: the valid
    # block of the pseudo-inverse of the masked Jacobian is padding-independent.
    from flowsim._exact.sliding import _repad

    n = 3
    J = np.asarray(jr.normal(jr.key(1), (n, n)))
    lam = np.asarray(jr.uniform(jr.key(2), (n,)))

    def padded(k):
        Jk = np.eye(k)
        Jk[:n, :n] = J
        lam_k = np.zeros(k)
        lam_k[:n] = lam
        return lam_k, np.asarray(jnp.linalg.pinv(jnp.asarray(Jk), rtol=1e-12))

    lam8, pinv8 = padded(8)
    lam4, pinv4 = _repad(lam8, pinv8, n, 4)
    ref_lam, ref_pinv = padded(4)
    assert np.array_equal(lam4, ref_lam)
    assert np.max(np.abs(pinv4 - ref_pinv)) <= 1e-13 * np.max(np.abs(ref_pinv))
    assert _repad(lam8, pinv8, n, 8)[1] is pinv8 and _repad(lam8, None, n, 4)[1] is None


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_compiled_loop_equals_host_loop(name, solutions):
    # gradient_flow's exact path (one compiled lax.while_loop, flowsim._exact) against the
    # host-side loop `kink_flow` (one Python iteration per event, the reference kept for
    # this): the same events, in order, at the same times, and the same saved states.
    # Measured: identical (0.0) on all three problems.
    (model, loss), (out, stats, _, pieces, ts) = solutions[name]
    traj = flowsim.gradient_flow(model, loss, T, ts=ts, solver="tsit5", rtol=1e-12, atol=1e-12,
                                 kinks=flowsim.ExactKinks(max_events=1000))
    assert traj.result == flowsim.RESULTS.successful
    for key in ("num_steps", "num_events", "num_crossings", "num_sliding_intervals",
                "num_releases", "num_sliding_now"):
        assert int(traj.stats[key]) == stats[key], (key, traj.stats[key], stats[key])
    names = {"cross": "crossing", "slide": "slide", "release": "release"}
    host = [(p["t1"], names[kind], j) for p in pieces for kind, j in p["events"]]
    ev = traj.events
    valid = np.asarray(ev.valid)
    shapes = [z.shape for z in model.forward(loss.X)[1]]
    starts = np.cumsum([0] + [int(np.prod(s)) for s in shapes[:-1]])
    entries = [int(starts[layer] + point * shapes[layer][1] + unit) for layer, point, unit in
               zip(np.asarray(ev.layer)[valid], np.asarray(ev.point)[valid],
                   np.asarray(ev.unit)[valid])]
    ours = list(zip(np.asarray(ev.t)[valid].tolist(), ev.names(), entries))
    assert [(k, j) for _, k, j in ours] == [(k, j) for _, k, j in host]
    assert np.max(np.abs(np.array([t for t, *_ in ours]) - [t for t, *_ in host]),
                  initial=0.0) <= 1e-12
    saved = eqx.filter(traj.models, eqx.is_inexact_array)
    assert max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
               zip(jax.tree.leaves(saved), jax.tree.leaves(out))) <= 1e-12
