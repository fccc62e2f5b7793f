"""Shared test helpers: tolerances are explicit at every call."""

import contextlib
import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol, atol) -> bool:
    """True when the two PyTrees have the same structure and all array leaves are close."""
    xa, xs = eqx.partition(x, eqx.is_array)
    ya, ys = eqx.partition(y, eqx.is_array)
    if jax.tree.structure(xa) != jax.tree.structure(ya) or xs != ys:
        return False
    return all(
        a.shape == b.shape and bool(jnp.allclose(a, b, rtol=rtol, atol=atol))
        for a, b in zip(jax.tree.leaves(xa), jax.tree.leaves(ya))
    )


def tree_max_abs_diff(x, y) -> float:
    xa = jax.tree.leaves(eqx.filter(x, eqx.is_array))
    ya = jax.tree.leaves(eqx.filter(y, eqx.is_array))
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(xa, ya))


@contextlib.contextmanager
def count_compilations(name: str):
    """Counts XLA compilations of functions whose name contains `name` inside the block."""
    counter = {"n": 0}

    class _Handler(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "Compiling" in msg and name in msg:
                counter["n"] += 1

    handler = _Handler(level=logging.DEBUG)
    loggers = [logging.getLogger(name)
               for name in ("jax._src.dispatch", "jax._src.interpreters.pxla")]
    for lg in loggers:
        lg.addHandler(handler)
    with jax.log_compiles(True):
        try:
            yield counter
        finally:
            for lg in loggers:
                lg.removeHandler(handler)


def pytree_ode(t, y, args):
    """A test ODE for solvers: non-autonomous (stage times), nonlinear, with a Jacobian that
    changes along the solution, on a PyTree state; closed form in `pytree_ode_exact`."""
    return {"a": -2.0 * (y["a"] - jnp.sin(t)) + jnp.cos(t),
            "b": 2.0 * y["b"] * (1.0 - y["b"]),
            "c": -y["c"] ** 3}


PYTREE_ODE_Y0 = {"a": 1.0, "b": 0.1, "c": 1.0}


def pytree_ode_exact(t):
    y0 = PYTREE_ODE_Y0
    return {"a": np.exp(-2.0 * t) * y0["a"] + np.sin(t),
            "b": 1.0 / (1.0 + (1.0 / y0["b"] - 1.0) * np.exp(-2.0 * t)),
            "c": 1.0 / np.sqrt(2.0 * t + 1.0 / y0["c"] ** 2)}


def fitted_order(hs, errs) -> float:
    """Least-squares slope of log error against log step."""
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])
