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


def patterned_activation(name: str, z: Array, mask: Array, negative_slope: float) -> Array:
    """The activation with its slope on each entry fixed by `mask` in [0, 1] instead of sign(z).

    For ReLU the slope is `mask` (1 active, 0 inactive, in between on a kink); for leaky ReLU
    `negative_slope + (1 - negative_slope) * mask`. On the activation pattern sign(z) this equals
    the activation itself; it is linear in z, so the loss is a polynomial in the weights while
    the pattern is held fixed.
    """
    if name == "relu":
        return mask * z
    if name == "leaky_relu":
        return (negative_slope + (1 - negative_slope) * mask) * z
    if name == "linear":
        return z
    raise ValueError(f"activation {name!r} is not piecewise linear; it has no activation pattern")


def init_stds(init_std, fan_ins) -> list[float]:
    """One Gaussian standard deviation per layer from a model's `init_std`: `None` for
    1/sqrt(fan_in), a float for every layer, or one value per layer (checked)."""
    n_layers = len(fan_ins)
    if init_std is None:
        return [1.0 / float(f) ** 0.5 for f in fan_ins]
    if isinstance(init_std, int | float):
        stds = [float(init_std)] * n_layers
    else:
        stds = [float(s) for s in init_std]
        if len(stds) != n_layers:
            raise ValueError(
                f"`init_std` must have one entry per layer ({n_layers}), got {len(stds)}"
            )
    if any(not (s >= 0) for s in stds):
        raise ValueError(f"`init_std` must be non-negative, got {stds}")
    return stds


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

    def forward(self, x, pattern=None) -> tuple[Array, tuple[Array, ...]]:
        """The output and the pre-activations of every hidden layer, optionally on a fixed pattern.

        `pattern`: `None`, or one array per hidden layer shaped like its pre-activations, with
        the slope choice in [0, 1] of each entry (see `patterned_activation`). Models with
        piecewise-linear activations implement it; it drives the exact integration through
        ReLU kinks.
        """
        raise TypeError(f"{type(self).__name__} does not expose its activation pattern")

    @property
    def is_piecewise_linear(self) -> bool:
        """True when every activation is linear, ReLU or leaky ReLU (kinks, no curvature)."""
        return all(a in _HOMOGENEOUS for a in self.activations)

    @property
    def is_homogeneous(self) -> bool:
        """True when every activation is positively homogeneous (the Du–Hu–Lee setting)."""
        return all(a in _HOMOGENEOUS for a in self.activations)
