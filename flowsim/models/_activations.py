"""Activations as modules, with the properties the rest of flowsim asks about.

`homogeneous` decides whether the balance invariants hold (`flowsim.invariants`), `has_kinks`
whether the flow meets kinks, and an `AbstractPiecewiseLinear` activation gives the network on
a fixed activation pattern (`patterned`), which the exact-kink path integrates.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array


class AbstractActivation(eqx.Module):
    """An elementwise activation sigma, with the properties flowsim's checks rely on.

    Subclasses implement `__call__` and set three class variables:

    - `homogeneous`: sigma(c x) = c sigma(x) for every c > 0 (linear, ReLU, leaky ReLU); the
      balance gaps of `flowsim.invariants` are then conserved by gradient flow;
    - `piecewise_linear`: sigma is linear between finitely many kinks;
    - `has_kinks`: sigma's slope jumps somewhere (the flow then meets kinks).

    Its fields are configuration (a model stores its activation as a static field): plain
    Python values, no arrays.
    """

    homogeneous: eqx.AbstractClassVar[bool]
    piecewise_linear: eqx.AbstractClassVar[bool]
    has_kinks: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def __call__(self, x: Array) -> Array:
        """sigma applied to every entry of `x`."""


class AbstractPiecewiseLinear(AbstractActivation):
    """An activation linear on each side of 0: sigma(z) = s_+ z for z > 0 and s_- z for z < 0.

    Such an activation is positively homogeneous. On a fixed activation pattern (`patterned`)
    the network is a polynomial in its weights, which is what the exact-kink path integrates
    (`kinks="exact"`).
    """

    homogeneous: ClassVar[bool] = True
    piecewise_linear: ClassVar[bool] = True

    @abc.abstractmethod
    def patterned(self, z: Array, mask: Array) -> Array:
        """sigma with each entry's slope fixed by `mask` instead of by the sign of `z`.

        `mask` (shaped like `z`) holds 1 where the entry is on the positive side, 0 on the
        negative side, and in between the weight of the positive side in a convex combination
        (an entry sliding along a kink): the slope is s_- + (s_+ - s_-) * mask. On the pattern
        of z's signs this equals `sigma(z)`; it is linear in z.
        """


class Linear(AbstractPiecewiseLinear):
    """sigma(x) = x."""

    has_kinks: ClassVar[bool] = False

    def __call__(self, x):
        return x

    def patterned(self, z, mask):
        del mask
        return z


class ReLU(AbstractPiecewiseLinear):
    """sigma(x) = max(x, 0)."""

    has_kinks: ClassVar[bool] = True

    def __call__(self, x):
        # jax.nn.relu's derivative at 0 is 0; any value would keep sigma'(x) x = sigma(x).
        return jax.nn.relu(x)

    def patterned(self, z, mask):
        return mask * z


class LeakyReLU(AbstractPiecewiseLinear):
    """sigma(x) = x for x >= 0, `negative_slope` * x below."""

    negative_slope: float = eqx.field(default=0.01, static=True, converter=float)
    has_kinks: ClassVar[bool] = True

    def __call__(self, x):
        return jnp.where(x >= 0, x, self.negative_slope * x)

    def patterned(self, z, mask):
        return (self.negative_slope + (1 - self.negative_slope) * mask) * z


class Tanh(AbstractActivation):
    """sigma(x) = tanh(x): smooth and not homogeneous (the balance gaps drift)."""

    homogeneous: ClassVar[bool] = False
    piecewise_linear: ClassVar[bool] = False
    has_kinks: ClassVar[bool] = False

    def __call__(self, x):
        return jnp.tanh(x)


_SHORTCUTS = {"linear": Linear, "relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh}


def as_activation(
    activation: "str | AbstractActivation", *, negative_slope: float = 0.01
) -> AbstractActivation:
    """The activation module of a shortcut name, or `activation` itself if it is one.

    **Arguments:**

    - `activation`: `"linear"`, `"relu"`, `"leaky_relu"`, `"tanh"` or an `AbstractActivation`.
    - `negative_slope`: the slope of the `"leaky_relu"` shortcut for negative inputs.

    **Returns:** an `AbstractActivation`.

    **Raises:** `ValueError` for another string, `TypeError` for anything else.
    """
    if isinstance(activation, AbstractActivation):
        return activation
    if isinstance(activation, str):
        if activation == "leaky_relu":
            return LeakyReLU(negative_slope)
        if activation in _SHORTCUTS:
            return _SHORTCUTS[activation]()
        raise ValueError(
            f"`activation` must be one of {', '.join(map(repr, _SHORTCUTS))}, got {activation!r}"
        )
    raise TypeError(
        f"`activation` must be a name ({', '.join(map(repr, _SHORTCUTS))}) or a "
        f"flowsim.models.AbstractActivation (subclass it for another function), got "
        f"{activation!r}"
    )


def describe(activations) -> tuple:
    """The activations for a message: the shortcut name where one fits, else the module."""
    names = {cls: name for name, cls in _SHORTCUTS.items()}
    return tuple(names.get(type(a), a) for a in activations)
