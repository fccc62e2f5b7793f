"""The abstract base every flowsim model derives from."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_ACTIVATIONS = ("linear", "relu", "leaky_relu", "tanh")
_HOMOGENEOUS = ("linear", "relu", "leaky_relu")


def check_activation(activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {', '.join(map(repr, _ACTIVATIONS))}, got {activation!r}"
        )


def apply_activation(name: str, x: Array, negative_slope: float) -> Array:
    if name == "linear":
        return x
    if name == "relu":
        # jax.nn.relu's derivative at 0 is 0; any value would keep sigma'(x) x = sigma(x).
        return jax.nn.relu(x)
    if name == "leaky_relu":
        return jnp.where(x >= 0, x, negative_slope * x)
    return jnp.tanh(x)


class AbstractModel(eqx.Module):
    """A network whose parameters come in layers, with hidden units between them.

    Every model exposes:

    - `layers`: the tuple of per-layer free-parameter arrays in forward order;
    - `hidden_units()`: for each pair of adjacent layers (h, h+1), the parameters flowing into and
      out of each hidden unit between them, as two matrices with one row per unit. Rescaling a
      unit's incoming row by c > 0 and its outgoing row by 1/c leaves the function unchanged when
      the activation is positively homogeneous; this is what `flowsim.invariants` measures;
    - `activations`: the activation name between each pair of adjacent layers.

    Because `hidden_units` is pure array slicing, it applies to a gradient (a PyTree shaped like
    the model) just as well as to the model itself.
    """

    @property
    @abc.abstractmethod
    def layers(self) -> tuple[Float[Array, "..."], ...]:
        """The per-layer free-parameter arrays, in forward order."""

    @property
    @abc.abstractmethod
    def activations(self) -> tuple[str, ...]:
        """Activation name between layer h and h+1, for h = 1..N-1."""

    @abc.abstractmethod
    def hidden_units(self) -> tuple[tuple[Float[Array, "units a"], Float[Array, "units b"]], ...]:
        """For each hidden layer: (incoming, outgoing) parameters, one row per hidden unit."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "n ..."]) -> Float[Array, "n ..."]:
        """The network applied to a batch of inputs (leading axis: samples)."""

    @property
    def is_homogeneous(self) -> bool:
        """True when every activation is positively homogeneous (the Du–Hu–Lee setting)."""
        return all(a in _HOMOGENEOUS for a in self.activations)
