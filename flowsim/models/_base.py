"""The abstract base every flowsim model derives from."""

import abc

import equinox as eqx
from jaxtyping import Array, Float

from ._activations import AbstractActivation, AbstractPiecewiseLinear


def activate(activation: AbstractActivation, z: Array, mask: Array | None) -> Array:
    """`activation(z)`, or with `mask` its patterned form (the slopes fixed by `mask`)."""
    if mask is None:
        return activation(z)
    if not isinstance(activation, AbstractPiecewiseLinear):
        raise ValueError(
            f"activation {activation!r} is not an AbstractPiecewiseLinear (linear on each side "
            f"of 0); it has no activation pattern"
        )
    return activation.patterned(z, mask)


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
    - `activations`: the activation (an `AbstractActivation`) between each pair of adjacent
      layers, whose properties give `is_homogeneous` and `has_kinks`;
    - `forward(x, pattern)`: the output and the pre-activations of every hidden layer; calling
      the model gives the output.

    Because `hidden_units` is pure array slicing, it applies to a gradient (a PyTree shaped like
    the model) just as well as to the model itself.
    """

    @property
    @abc.abstractmethod
    def layers(self) -> tuple[Float[Array, "..."], ...]:
        """The per-layer free-parameter arrays, in forward order."""

    @property
    @abc.abstractmethod
    def activations(self) -> tuple[AbstractActivation, ...]:
        """The activation between layer h and h+1, for h = 1..N-1."""

    @abc.abstractmethod
    def hidden_units(self) -> tuple[tuple[Float[Array, "units a"], Float[Array, "units b"]], ...]:
        """For each hidden layer: (incoming, outgoing) parameters, one row per hidden unit."""

    @abc.abstractmethod
    def forward(self, x, pattern=None) -> tuple[Array, tuple[Array, ...]]:
        """The output and the pre-activations of every hidden layer, optionally on a fixed pattern.

        `x`: a batch of inputs (leading axis: samples). `pattern`: `None`, or one array per
        hidden layer shaped like its pre-activations, with the slope choice in [0, 1] of each
        entry (see `AbstractPiecewiseLinear.patterned`); it needs piecewise-linear activations
        and drives the exact integration through kinks.
        """

    def __call__(self, x: Float[Array, "n ..."]) -> Float[Array, "n ..."]:
        """The network applied to a batch of inputs (leading axis: samples)."""
        return self.forward(x)[0]

    @property
    def is_homogeneous(self) -> bool:
        """True when every activation is positively homogeneous (the Du–Hu–Lee setting)."""
        return all(a.homogeneous for a in self.activations)

    @property
    def has_kinks(self) -> bool:
        """True when some activation has kinks (ReLU, leaky ReLU): the flow meets them."""
        return any(a.has_kinks for a in self.activations)
