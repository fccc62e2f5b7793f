"""A solve called again: what flowsim remembers about immutable inputs (checks, the auto
solver's sharpness estimate, the compiled call) and what it must not remember."""

import gc
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import flowsim
from flowsim import _solvers
from flowsim._jit import Memo, bind

from .helpers import count_compilations


def _problem(seed=0, dtype=jnp.float64):
    mf = flowsim.models.MatrixFactorization.random(2, 2, 2, scale=0.1, dtype=dtype,
                                                   key=jr.key(seed))
    return mf, flowsim.losses.factorization(jnp.diag(jnp.array([3.0, 1.0], dtype)))


def test_memo_is_by_identity_and_forgets_dead_objects():
    memo = Memo(maxsize=4)
    a, b = jnp.ones(3), jnp.ones(3)
    memo.put((a,), "fact", extra=1)
    assert memo.get((a,), 1) == "fact"
    assert memo.get((b,), 1) is None  # equal values, another object
    assert memo.get((a,), 2) is None  # another extra key
    del a
    gc.collect()
    assert len(memo._facts) == 0  # dropped with its object
    keep = [jnp.full(2, float(i)) for i in range(6)]
    for x in keep:
        memo.put((x,), True)
    assert len(memo._facts) == 4 and memo.get((keep[0],)) is None and memo.get((keep[-1],))


def test_bind_equals_filter_jit():
    def f(tree, k, flag):
        return jax.tree.map(lambda x: x * k if flag else -x, tree)

    tree = {"a": jnp.arange(3.0), "b": (np.ones(2), None)}
    for k, flag in ((2, True), (3, False)):
        got, want = bind(f, tree, k, flag)(), eqx.filter_jit(f)(tree, k, flag)
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), got, want))


def test_second_call_is_the_same_solve():
    mf, loss = _problem()
    first = flowsim.gradient_flow(mf, loss, 10.0, ts=jnp.linspace(0, 10, 5))
    with count_compilations("_flow_solve") as c:
        again = flowsim.gradient_flow(mf, loss, 10.0, ts=jnp.linspace(0, 10, 5))
        other = flowsim.gradient_flow(_problem(seed=1)[0], loss, 10.0,
                                      ts=jnp.linspace(0, 10, 5))
    assert c["n"] == 0
    for x, y in zip(jax.tree.leaves(first.models), jax.tree.leaves(again.models)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
    assert not np.allclose(np.asarray(other.loss), np.asarray(first.loss))
    # Other arguments are part of what is remembered: a new t1 is a new solve.
    longer = flowsim.gradient_flow(mf, loss, 20.0)
    assert float(longer.ts[-1]) == 20.0 and float(longer.loss[-1]) < float(first.loss[-1])


def test_sharpness_estimated_once_per_problem(monkeypatch):
    calls = []
    real = _solvers.sharpness
    monkeypatch.setattr(_solvers, "sharpness", lambda *a, **k: calls.append(1) or real(*a, **k))
    mf, loss = _problem(seed=3)
    for _ in range(3):
        _solvers.auto_solver(mf, loss, 0.0, 10.0, 8, False)
    assert len(calls) == 1
    _solvers.auto_solver(_problem(seed=3)[0], loss, 0.0, 10.0, 8, False)  # new arrays
    assert len(calls) == 2


class _NumpyLoss(eqx.Module):
    """A loss holding a NumPy array (mutable): nothing about it may be remembered."""

    target: np.ndarray

    def __call__(self, model):
        return 0.5 * jnp.sum((model.U @ model.V.T - self.target) ** 2)


def test_mutable_data_is_checked_on_every_call():
    mf, _ = _problem()
    target = np.diag([3.0, 1.0])
    loss = _NumpyLoss(target)
    flowsim.gradient_flow(mf, loss, 1.0)
    target[0, 0] = np.nan  # in place: the same loss object, new data
    with pytest.raises(ValueError, match="NaN"):
        flowsim.gradient_flow(mf, loss, 1.0)


def test_warnings_repeat_on_every_call():
    mf, loss = _problem(dtype=jnp.float32)
    for _ in range(2):
        with pytest.warns(flowsim.PrecisionWarning):
            flowsim.gradient_flow(mf, loss, 1.0, rtol=1e-8, atol=1e-8, solver="tsit5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flowsim.gradient_flow(mf, loss, 1.0, rtol=1e-4, atol=1e-4, solver="tsit5")
