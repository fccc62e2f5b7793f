"""Type aliases shared across flowsim (jaxtyping, with shapes)."""

from collections.abc import Callable
from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, Int, PyTree

Scalar: TypeAlias = Float[Array, ""]
RealScalarLike: TypeAlias = float | int | Float[ArrayLike, ""]
Loss: TypeAlias = Callable[[Any], Scalar]
"""A loss is any callable `model -> scalar`; the builders in `flowsim.losses` return one."""
Schedule: TypeAlias = Callable[[Int[ArrayLike, ""]], Float[Array, ""]]
"""A learning-rate schedule: step count k (from 0) -> eta_k, as optax defines it."""

__all__ = ["Array", "ArrayLike", "Float", "Int", "Loss", "PyTree", "RealScalarLike", "Scalar",
           "Schedule"]
