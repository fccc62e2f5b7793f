"""The problem protocol: data, a loss, models from a key, and the metrics that make sense."""

import abc
import dataclasses
from typing import Any, ClassVar

import equinox as eqx
from jaxtyping import Array, PRNGKeyArray


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of a problem's report figure.

    - `title`: what the panel shows.
    - `metrics`: names of the problem's metrics, each drawn along GD (solid) and the flow
      (dashed), median over seeds with a 10-90 % band.
    - `bound`: optional name of a stored GD quantity drawn dotted in the same colour (e.g.
      `"ledger_bound"`, the bound sum eta_k^2 ||grad L_k||^2 on the Gram-gap drift).
    - `reference`: optional name of a metric that is constant in time (a closed-form target),
      drawn as a thin black line.
    - `logy`: logarithmic y axis.
    """

    title: str
    metrics: tuple[str, ...]
    bound: str | None = None
    reference: str | None = None
    logy: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_init(init: str, variance: float, schemes: tuple[str, ...]) -> None:
    """ValueError unless `init` is one of the family's `schemes` and `variance` is positive."""
    if init not in schemes:
        raise ValueError(f"`init` must be one of {', '.join(map(repr, schemes))}, got {init!r}")
    if not variance > 0:
        raise ValueError(f"`variance` must be positive, got {variance}")


class AbstractProblem(eqx.Module):
    """One instance of a problem family: the data and loss shared by every seed, and a model
    for each random key.

    Subclasses define:

    - `loss`: a field; a callable `model -> scalar` (an `eqx.Module`, e.g. from
      `flowsim.losses`, so that new data of the same shape does not recompile);
    - `init(key)`: a model (an Equinox module; a `flowsim.models.AbstractModel` gets the
      balance invariants, drift and ledger metrics of the sweep);

    and optionally:

    - `inputs`: the training inputs, for the distance between GD and flow predictions (by
      default those of a data-fitting loss, `flowsim.losses.AbstractDataLoss`);
    - `metrics(models)`: quantities along one trajectory (`models` stacked on a leading time
      axis), each an array of shape `(time,)`;
    - `panels`: how `flowsim report` draws those metrics (a tuple of `Panel`).

    Keep every array of the problem a field (not a closure): a sweep then compiles its solves
    once per shape, whatever the values.
    """

    loss: eqx.AbstractVar[Any]
    panels: ClassVar[tuple[Panel, ...]] = ()

    @abc.abstractmethod
    def init(self, key: PRNGKeyArray) -> eqx.Module:
        """A model drawn with the random `key`."""

    @property
    def inputs(self) -> Array | None:
        """The training inputs (leading axis: points): those of the loss when it fits data
        (a `flowsim.losses.AbstractDataLoss`), else None."""
        from ..losses import AbstractDataLoss

        return self.loss.X if isinstance(self.loss, AbstractDataLoss) else None

    def metrics(self, models) -> dict[str, Array]:
        """Problem-specific quantities along one trajectory: name -> array of shape (time,)."""
        del models
        return {}
