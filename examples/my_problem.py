"""A problem of your own in a sweep: an Equinox model flowsim does not know, fitted by square loss.

`examples/user_factory.toml` names `make_problem` below as `kind = "my_problem:make_problem"`;
the other `[problem]` keys are its arguments (a list is a sweep axis, as everywhere). A module
next to the config file is found without installing it.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import flowsim


class ResidualNet(eqx.Module):
    """x -> x + V tanh(W x): a residual block, not one of flowsim's homogeneous models."""

    W: jax.Array
    V: jax.Array

    def __init__(self, dim: int, width: int, *, key):
        kw, kv = jr.split(key)
        self.W = jr.normal(kw, (width, dim)) / dim**0.5
        self.V = 0.1 * jr.normal(kv, (dim, width)) / width**0.5

    def __call__(self, x):
        return x + jnp.tanh(x @ self.W.T) @ self.V.T


class ResidualProblem(flowsim.problems.AbstractProblem):
    X: jax.Array
    loss: eqx.Module
    width: int = eqx.field(static=True)

    def init(self, key):
        return ResidualNet(self.X.shape[1], self.width, key=key)

    @property
    def inputs(self):
        return self.X

    def metrics(self, models):  # models: one trajectory, leading time axis
        return {"weight_norm": jnp.sqrt(jnp.sum(models.W**2, (-2, -1))
                                        + jnp.sum(models.V**2, (-2, -1)))}

    panels = (flowsim.problems.Panel("‖(W, V)‖", ("weight_norm",), logy=False),)


def make_problem(dim: int = 4, width: int = 16, n: int = 32, data_seed: int = 0):
    """Targets from a rotation of the inputs: y = Q x."""
    kx, kq = jr.split(jr.key(data_seed))
    X = jr.normal(kx, (n, dim))
    Q, _ = jnp.linalg.qr(jr.normal(kq, (dim, dim)))
    return ResidualProblem(X, flowsim.losses.square(X, X @ Q.T), width)
