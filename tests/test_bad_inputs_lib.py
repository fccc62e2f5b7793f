"""Bad inputs to the library: non-finite data, models and times, schedules that turn
non-positive, runs too large for memory, float32 models, and flows that diverge."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowsim
from flowsim import _descent, _problem
from flowsim.models import MLP, MatrixFactorization

from .helpers import tree_max_abs_diff

# Every case under a time limit: a mistake must be refused, not hang (compiles included).
pytestmark = pytest.mark.timeout(120)

BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
SHOWN = {"nan": "NaN", "inf": "inf", "-inf": "-inf"}  # as the messages name them


def _net(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(4, 3)) / 2, rng.normal(size=(2, 4)) / 2]
    return MLP.from_weights([w.astype(dtype) for w in ws], "tanh")


def _batch(size=3):
    nets = [_net(seed) for seed in range(size)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *nets)


def _data(n=6, dtype=np.float64):
    rng = np.random.default_rng(1)
    return rng.normal(size=(n, 3)).astype(dtype), rng.normal(size=(n, 2)).astype(dtype)


def _loss(dtype=np.float64):
    return flowsim.losses.square(*_data(dtype=dtype))


def _gd(model, loss, batched=False, **kw):
    kw.setdefault("learning_rate", 0.1)
    return flowsim.gradient_descent(model, loss, kw.pop("steps", 4), batched=batched, **kw)


def _flow(model, loss, batched=False, **kw):
    return flowsim.gradient_flow(model, loss, kw.pop("t1", 0.1), batched=batched,
                                 solver=kw.pop("solver", "tsit5"), **kw)


SOLVERS = {"flow": _flow, "gd": _gd}


# (a) NaN / inf detected up front, naming the argument.


def _with_bad(arr, bad, index):
    arr = np.array(arr, dtype=np.float64)
    arr[index] = BAD[bad]
    return arr


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("builder, name", [
    ("square", "X"), ("square", "Y"), ("logistic", "X"), ("logistic", "y"),
    ("factorization", "M"),
])
def test_loss_constructors_refuse_non_finite_data(builder, name, bad):
    X, Y = _data()
    y = np.where(Y[:, 0] > 0, 1.0, -1.0)
    args = {"square": {"X": X, "Y": Y}, "logistic": {"X": X, "y": y},
            "factorization": {"M": np.eye(3)}}[builder]
    index = (2, 1) if args[name].ndim == 2 else 2
    args[name] = _with_bad(args[name], bad, index)
    at = r"\(2, 1\)" if args[name].ndim == 2 else "2"
    with pytest.raises(ValueError, match=rf"^`{name}` has 1 non-finite entry \(first: "
                                         rf"{SHOWN[bad]} at index {at}\); remove or impute"):
        getattr(flowsim.losses, builder)(*args.values())


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("field", ["X", "Y"])
@pytest.mark.parametrize("solve", list(SOLVERS))
def test_solvers_refuse_non_finite_loss_data(solve, field, bad):
    # A loss module whose data was replaced after construction (eqx.tree_at) is checked too.
    loss = _loss()
    loss = eqx.tree_at(lambda l: getattr(l, field), loss,
                       getattr(loss, field).at[3, 1].set(BAD[bad]))
    with pytest.raises(ValueError, match=rf"the loss data `loss\.{field}` has 1 non-finite "
                                         rf"entry \(first: {SHOWN[bad]} at index \(3, 1\)\)"):
        SOLVERS[solve](_net(), loss)


@pytest.mark.parametrize("bad", ["nan", "-inf"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("solve", list(SOLVERS))
def test_solvers_refuse_non_finite_initial_model(solve, batched, bad):
    model = _batch() if batched else _net()
    index = (1, 1, 2) if batched else (1, 2)
    model = eqx.tree_at(lambda m: m.weights[1], model, model.weights[1].at[index].set(BAD[bad]))
    member = r" \(batch member 1\)" if batched else ""
    with pytest.raises(ValueError, match=rf"the initial `model`{member} has a non-finite "
                                         rf"parameter: model\.weights\[1\] holds {SHOWN[bad]} at "
                                         rf"index \(1, 2\); initialise the model with finite "
                                         rf"values"):
        SOLVERS[solve](model, _loss(), batched=batched)


@pytest.mark.parametrize("kwargs, match", [
    ({"t0": math.nan}, r"`t0` must be finite, got nan"),
    ({"t0": -math.inf}, r"`t0` must be finite, got -inf"),
    ({"t1": math.nan}, r"`t1` must be finite and greater than t0=0.0, got nan"),
    ({"t1": math.inf}, r"`t1` must be finite and greater than t0=0.0, got inf"),
    ({"ts": [0.0, math.nan, 0.1]}, r"`ts` must hold finite times, got nan at index 1"),
    ({"ts": [0.0, 0.05, math.inf]}, r"`ts` must hold finite times, got inf at index 2"),
    ({"ts": np.array([-math.inf, 0.1])}, r"`ts` must hold finite times, got -inf at index 0"),
    ({"dt0": -0.1}, r"`dt0` must be a positive finite first step, got -0.1; pass one or leave "
                    r"it None"),
    ({"dt0": 0.0}, r"`dt0` must be a positive finite first step, got 0.0"),
    ({"dt0": math.nan}, r"`dt0` must be a positive finite first step, got nan"),
], ids=["t0-nan", "t0-inf", "t1-nan", "t1-inf", "ts-nan", "ts-inf", "ts-neginf", "dt0-neg",
        "dt0-zero", "dt0-nan"])
def test_flow_refuses_non_finite_times(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _flow(_net(), _loss(), **kwargs)


def test_traced_data_is_not_checked():
    # Under jit the data is abstract: the constructor cannot look at it and must not fail.
    X, Y = _data()
    loss = jax.jit(lambda x: flowsim.losses.square(x, Y))(jnp.asarray(X).at[0, 0].set(jnp.nan))
    assert bool(jnp.isnan(loss.X[0, 0]))


# (c) a schedule checked over every step it is used for.


def _linear(eta0, slope):
    return lambda k: eta0 - slope * jnp.asarray(k, jnp.float64)


@pytest.mark.parametrize("schedule, steps, k, shown", [
    (_linear(0.1, 0.01), 12, 10, r"-?[0-9.e-]+"),  # zero (to rounding) at step 10
    (_linear(0.05, 0.01), 8, 5, r"-?[0-9.e-]+"),  # positive at step 0, negative later
    (lambda k: jnp.where(k == 7, -0.1, 0.1), 8, 7, r"-0\.1"),  # negative at the last step
    (lambda k: jnp.where(k == 3, jnp.nan, 0.1), 8, 3, "nan"),
    (lambda k: jnp.where(k >= 2, jnp.inf, 0.1), 8, 2, "inf"),
], ids=["zero", "negative-later", "negative-last", "nan", "inf"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_schedule_must_be_positive_at_every_step(schedule, steps, k, shown, batched):
    model = _batch() if batched else _net()
    with pytest.raises(ValueError, match=rf"`learning_rate` schedule must give a positive finite "
                                         rf"step size at every step 0\.\.{steps - 1}, got eta_k = "
                                         rf"{shown} at step k = {k} "):
        _gd(model, _loss(), batched=batched, steps=steps, learning_rate=schedule)


def test_schedule_positive_over_the_steps_run_is_accepted():
    # The same decreasing schedule is fine when the run stops before it turns non-positive.
    traj = _gd(_net(), _loss(), steps=8, learning_rate=_linear(0.1, 0.01))
    assert np.all(np.asarray(traj.learning_rates) > 0)


# (e) runs too large for memory are refused, naming both numbers and the fix.


@pytest.fixture
def one_gigabyte(monkeypatch):
    monkeypatch.setattr(_descent, "available_memory_bytes", lambda: 10**9)
    monkeypatch.setattr(_descent, "device_memory_bytes", lambda: None)


@pytest.mark.parametrize("steps, save_every, batched, fix", [
    (10**8, 10**8, False, r"run fewer steps \(the per-step arrays alone take 2\.4 GB\)"),
    (10**7, 1, False, r"save fewer iterates \(a larger `save_every`, now 1\)"),
    (10**7, 1, True, r"save fewer iterates \(a larger `save_every`, now 1\)"),
    (10**11, 10**11, False, r"run fewer steps \(the per-step arrays alone take 2\.4 TB\)"),
], ids=["per-step", "saved", "saved-batched", "1e11"])
def test_gd_refuses_runs_larger_than_memory(one_gigabyte, steps, save_every, batched, fix):
    model = _batch() if batched else _net()
    with pytest.raises(ValueError, match=rf"`steps`={steps} with save_every={save_every} needs "
                                         rf"~[0-9.]+ [kMGT]?B .* but 1 GB of memory is "
                                         rf"available; {fix}"):
        _gd(model, _loss(), batched=batched, steps=steps, save_every=save_every)


def test_gd_refuses_more_steps_than_the_step_counter(monkeypatch):
    monkeypatch.setattr(_descent, "available_memory_bytes", lambda: 2**62)
    monkeypatch.setattr(_descent, "device_memory_bytes", lambda: None)
    with pytest.raises(ValueError, match=r"`steps` must be at most 2147483647 \(2\*\*31 - 1, the "
                                         r"int32 step counter\), got 2147483648"):
        _gd(_net(), _loss(), steps=2**31, save_every=2**31)


def test_available_memory_bytes(monkeypatch):
    have = _problem.available_memory_bytes()
    assert isinstance(have, int) and have > 0
    # Without /proc/meminfo: os.sysconf's free pages.
    def no_meminfo(*args, **kwargs):
        raise OSError("no /proc")
    monkeypatch.setattr("builtins.open", no_meminfo)
    fallback = _problem.available_memory_bytes()
    assert isinstance(fallback, int) and 0 < fallback < 2**63 - 1


# (d) float32 models run in float32; tolerances float32 cannot reach are warned about.


@pytest.mark.parametrize("tols, named", [
    ({}, r"rtol=1e-10 and atol=1e-10 ask"),
    ({"rtol": 1e-4, "atol": 1e-8}, r"atol=1e-08 asks"),
    ({"rtol": 1e-6, "atol": 1e-4}, r"rtol=1e-06 asks"),
], ids=["defaults", "atol", "rtol"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_float32_flow_warns_and_runs_in_float32(tols, named, batched):
    model = _batch() if batched else _net()
    model32 = jax.tree.map(lambda x: x.astype(jnp.float32), model)
    loss32, loss64 = _loss(np.float32), _loss()
    with pytest.warns(flowsim.PrecisionWarning,
                      match=rf"the model is float32 \(machine epsilon 1\.2e-07\) but {named} for "
                            rf"accuracy below 100 x that: .* x\.astype\(jnp\.float64\), model\)"):
        traj32 = _flow(model32, loss32, batched=batched, t1=0.5, **tols)
    ref = _flow(model, loss64, batched=batched, t1=0.5, rtol=1e-10, atol=1e-10)
    assert traj32.loss.dtype == jnp.float32 and traj32.models.weights[0].dtype == jnp.float32
    assert np.all(np.asarray(traj32.succeeded))
    np.testing.assert_allclose(np.asarray(traj32.loss, np.float64), ref.loss, rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-4), (np.float64, 1e-13)])
def test_no_precision_warning_within_reach(dtype, tol):
    model = jax.tree.map(lambda x: x.astype(dtype), _net())
    traj = _flow(model, _loss(dtype), rtol=tol, atol=tol)  # filterwarnings = error
    assert traj.loss.dtype == dtype


@pytest.mark.parametrize("learning_rate", [0.1, flowsim.schedules.power_decay(0.2, 0.25)],
                         ids=["constant", "power_decay"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_float32_gd_runs_and_matches_float64(learning_rate, batched):
    model = _batch() if batched else _net()
    model32 = jax.tree.map(lambda x: x.astype(jnp.float32), model)
    traj32 = _gd(model32, _loss(np.float32), batched=batched, steps=50,
                 learning_rate=learning_rate)
    traj64 = _gd(model, _loss(), batched=batched, steps=50, learning_rate=learning_rate)
    assert traj32.models.weights[0].dtype == jnp.float32
    assert traj32.loss.dtype == jnp.float32 and traj32.ts.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in traj32.ledger)
    err = tree_max_abs_diff(jax.tree.map(lambda x: x.astype(jnp.float64), traj32.models),
                            traj64.models)
    assert 0 < err < 1e-5, err  # float32 rounding over 50 steps, not float64's
    np.testing.assert_allclose(np.asarray(traj32.loss, np.float64), traj64.loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(traj32.ts, np.float64), traj64.ts, rtol=1e-6)


# (b) divergence of the flow reported as divergence, with the time reached.


class _Scalar(eqx.Module):
    theta: jax.Array


def _quartic(model):
    """L = -sum theta^4 / 4, unbounded below: theta' = theta^3 blows up at t = 1 / (2 theta0^2)."""
    return -jnp.sum(model.theta**4) / 4


@pytest.mark.parametrize("solver", ["tsit5", "kvaerno5"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_finite_time_blow_up_is_reported_as_divergence(solver, batched):
    # theta0 = 1 blows up at t = 1/2 < t1 = 1; theta0 = 0.5 (batched) at t = 2, after t1.
    theta0 = jnp.array([[1.0], [0.5]]) if batched else jnp.array([1.0])
    with pytest.warns(flowsim.FlowWarning, match=r"trajectory 0: diverged \(.*\) at t = 0\.5.* "
                                                 r"the loss is unbounded below or the flow "
                                                 r"blows up in finite time") as record:
        traj = flowsim.gradient_flow(_Scalar(theta0), _quartic, 1.0, solver=solver,
                                     batched=batched, throw=False)
    msg = str(record[0].message)
    assert "increase max_steps" not in msg and "trajectory 1" not in msg, msg
    result = np.atleast_1d(np.asarray(traj.result == flowsim.RESULTS.diverged))
    ok = np.atleast_1d(np.asarray(traj.succeeded))
    t_reached = np.atleast_1d(np.asarray(traj.stats["t_reached"]))
    assert result[0] and not ok[0]
    assert abs(t_reached[0] - 0.5) < 1e-3, t_reached
    if batched:  # the other member reaches t1 and matches theta(t) = (theta0^-2 - 2t)^-1/2
        assert ok[1] and t_reached[1] == 1.0
        assert abs(float(traj.models.theta[1, -1, 0]) - (4.0 - 2.0) ** -0.5) < 1e-8
    with pytest.raises(flowsim.FlowFailed, match=r"diverged .* at t = 0\.5.*t1 < 0\.5") as err:
        flowsim.gradient_flow(_Scalar(theta0), _quartic, 1.0, solver=solver, batched=batched)
    assert "increase max_steps" not in str(err.value)


def test_non_finite_user_loss_is_divergence_at_t0():
    # A closure loss is not inspected up front; its NaN is a divergence at t0, not max_steps.
    X, Y = _data()
    X = X.copy()
    X[0, 0] = np.nan
    with pytest.raises(flowsim.FlowFailed, match=r"trajectory 0: diverged \(non-finite state or "
                                                 r"loss\) at t = 0\. the loss or its gradient is "
                                                 r"not finite at the initial model"):
        _flow(_net(), lambda m: jnp.mean((m(jnp.asarray(X)) - Y) ** 2), max_steps=50)


def test_max_steps_failure_is_not_divergence():
    # A stiff factorization that runs out of steps: a bounded loss never counts as diverged.
    M = jnp.diag(jnp.array([100.0, 1.0]))
    mf = MatrixFactorization(jnp.eye(2), jnp.eye(2))
    with pytest.warns(flowsim.FlowWarning, match=r"trajectory 0: The maximum number of solver "
                                                 r"steps was reached.*increase max_steps") as rec:
        traj = flowsim.gradient_flow(mf, flowsim.losses.factorization(M), 10.0, solver="tsit5",
                                     max_steps=20, throw=False)
    assert traj.result == flowsim.RESULTS.max_steps_reached
    assert "diverged" not in str(rec[0].message)
