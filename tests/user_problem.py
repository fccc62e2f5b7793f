"""A problem of the user's own for the sweep tests (`kind = "tests.user_problem:make_problem"`).

Its model is an Equinox module that is not a `flowsim.models.AbstractModel` (an `eqx.nn.MLP`
with biases and a tanh hidden layer, wrapped in a module of our own): the sweep can run it and
record its loss, the GD-flow distance and the solver statistics, but not the balance
invariants, whose definition needs the layers of a flowsim model.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import flowsim
from flowsim.problems import AbstractProblem

IN, OUT = 3, 2


class Regressor(eqx.Module):
    """x -> mlp(x) for a batch of points: `(n, IN) -> (n, OUT)`."""

    mlp: eqx.nn.MLP

    def __call__(self, X):
        return jax.vmap(self.mlp)(X)


class UserProblem(AbstractProblem):
    """Square loss of a `Regressor` of hidden width `width` on fixed Gaussian data."""

    X: jax.Array
    loss: eqx.Module
    width: int = eqx.field(static=True)

    def init(self, key):
        mlp = eqx.nn.MLP(IN, OUT, self.width, depth=1, activation=jnp.tanh,
                         dtype=self.X.dtype, key=key)
        return Regressor(mlp)

    @property
    def inputs(self):
        return self.X


def make_problem(width: int = 8, n: int = 16, seed: int = 0) -> UserProblem:
    """`n` points x ~ N(0, I/3), targets y = A x with A ~ N(0, 1) entries (from `seed`)."""
    X, Y = flowsim.data.gaussian_regression(n, IN, OUT, key=jr.key(seed))
    return UserProblem(X, flowsim.losses.square(X, Y), int(width))


def not_a_problem(width: int = 8):
    """A factory that returns something other than a problem (for the error message test)."""
    return {"width": width}
