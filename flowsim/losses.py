"""Losses as callables `loss(model) -> scalar`.

Each builder returns an `eqx.Module` holding its data as arrays, so that a jit-compiled solver
sees new data of the same shape without recompiling. Any other callable `model -> scalar` works
wherever flowsim takes a loss; a loss that fits a model to data points is an `AbstractDataLoss`
(`square`, `logistic`), which the exact-kink path needs.
"""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._precision import as_float_array
from ._problem import check_finite_data

__all__ = [
    "AbstractDataLoss",
    "Logistic",
    "Square",
    "balancing",
    "factorization",
    "logistic",
    "square",
]


class AbstractDataLoss(eqx.Module):
    """A loss that fits a model to data: inputs `X` (leading axis: points) and their `targets`.

    Subclasses hold `X` and the targets as array fields, implement `__call__(model)` (the model
    applied to `X` and compared with the targets) and set `per_point`:

    - `per_point = True`: the loss is the mean over the points i of a term that depends only on
      row i of `X` and of every other array of the loss with one row per point (the targets).
      The loss of a single point is then the loss with those arrays cut to its row, which the
      exact-kink path uses for the sliding entries of one point.

    `flowsim.gradient_flow` integrates the kinks of a ReLU network exactly (`kinks="exact"`)
    for losses of this class.
    """

    X: eqx.AbstractVar[Float[Array, "n ..."]]
    per_point: eqx.AbstractClassVar[bool]

    @property
    @abc.abstractmethod
    def targets(self) -> Float[Array, "n ..."]:
        """What the model's outputs on `X` are fitted to, one row per point."""

    @abc.abstractmethod
    def __call__(self, model) -> Float[Array, ""]:
        """The loss of `model` on the data."""


class Square(AbstractDataLoss):
    """L = 1/(2n) sum_i ||f(x_i) - y_i||^2 (build it with `square`, which checks the data)."""

    X: Float[Array, "n ..."]
    Y: Float[Array, "n ..."]
    per_point: ClassVar[bool] = True

    @property
    def targets(self):
        return self.Y

    def __call__(self, model):
        pred = model(self.X)
        Y = self.Y
        if pred.shape != Y.shape:
            if pred.ndim == 2 and pred.shape[1] == 1 and Y.shape == pred.shape[:1]:
                pred = pred[:, 0]
            else:
                raise ValueError(
                    f"model output has shape {pred.shape} but targets `Y` have shape {Y.shape}; "
                    f"make the model's output width match Y"
                )
        n = Y.shape[0]
        return 0.5 * jnp.sum((pred - Y) ** 2) / n


class Logistic(AbstractDataLoss):
    """L = 1/n sum_i log(1 + exp(-y_i f(x_i))) (build it with `logistic`, which checks the
    labels)."""

    X: Float[Array, "n ..."]
    y: Float[Array, " n"]
    per_point: ClassVar[bool] = True

    @property
    def targets(self):
        return self.y

    def __call__(self, model):
        pred = model(self.X)
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.shape != self.y.shape:
            raise ValueError(
                f"logistic loss needs one output per sample, shape {self.y.shape}, but the model "
                f"outputs {pred.shape}; use an output width of 1"
            )
        return jnp.mean(jnp.logaddexp(0.0, -self.y * pred))


class _Factorization(eqx.Module):
    M: Float[Array, "m n"]

    def __call__(self, model):
        if not hasattr(model, "end_to_end"):
            raise TypeError(
                f"the factorization loss needs a model with end_to_end() (MatrixFactorization "
                f"or a linear MLP), got {type(model).__name__}"
            )
        P = model.end_to_end()
        if P.shape != self.M.shape:
            raise ValueError(
                f"the model's product has shape {P.shape} but `M` has shape {self.M.shape}"
            )
        return 0.5 * jnp.sum((P - self.M) ** 2)


class _Balanced(eqx.Module):
    base: eqx.Module
    lam: Float[Array, ""]

    def __call__(self, model):
        G = model.U.T @ model.U - model.V.T @ model.V
        return self.base(model) + self.lam / 8 * jnp.sum(G**2)


def _check_samples(X, Y, what: str):
    if X.ndim < 2:
        raise ValueError(f"`X` must have shape (n, features...), got {X.shape}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(
            f"`X` has {X.shape[0]} samples but `{what}` has {Y.shape[0]}; they must match"
        )


def square(X, Y) -> Square:
    """Square loss L = 1/(2n) sum_i ||f(x_i) - y_i||^2.

    **Arguments:**

    - `X`: inputs, shape `(n, features...)`.
    - `Y`: targets, shape `(n, outputs)` or `(n,)` for scalar-output models.

    **Returns:** a `Square` loss, a callable `loss(model) -> scalar`.

    **Raises:** `ValueError` if `X` or `Y` holds NaN or inf, if the sample counts differ (here)
    or if the model's output shape does not match `Y` (when the loss is first evaluated).
    """
    X = as_float_array(X, "X")
    Y = as_float_array(Y, "Y")
    check_finite_data(X, "X")
    check_finite_data(Y, "Y")
    _check_samples(X, Y, "Y")
    return Square(X, Y)


def logistic(X, y) -> Logistic:
    """Logistic loss L = 1/n sum_i log(1 + exp(-y_i f(x_i))), labels y_i in {-1, +1}.

    **Returns:** a `Logistic` loss, a callable `loss(model) -> scalar`.

    **Raises:** `ValueError` if `X` or `y` holds NaN or inf, labels are not +-1 or the sample
    counts differ.
    """
    X = as_float_array(X, "X")
    y = as_float_array(y, "y")
    check_finite_data(X, "X")
    check_finite_data(y, "y")
    _check_samples(X, y, "y")
    if y.ndim != 1:
        raise ValueError(f"`y` must have shape (n,), got {y.shape}")
    labels = np.unique(np.asarray(y))
    if not set(labels.tolist()) <= {-1.0, 1.0}:
        hint = " (for 0/1 labels pass 2*y - 1)" if set(labels.tolist()) <= {0.0, 1.0} else ""
        raise ValueError(f"`y` must hold labels -1 and +1, got values {labels[:5]}{hint}")
    return Logistic(X, y)


def factorization(M) -> eqx.Module:
    """Matrix factorization loss L = 1/2 ||f - M||_F^2 on the model's end-to-end matrix.

    **Raises:** `ValueError` if `M` is not a matrix or holds NaN or inf.
    """
    M = as_float_array(M, "M")
    check_finite_data(M, "M")
    if M.ndim != 2:
        raise ValueError(f"`M` must be a matrix, got shape {M.shape}")
    return _Factorization(M)


def balancing(loss, lam: float) -> eqx.Module:
    """`loss` plus the balancing regulariser (lam/8) ||U^T U - V^T V||_F^2 of Du et al. (Fig 1).

    For `MatrixFactorization` models.
    """
    if not lam >= 0:
        raise ValueError(f"`lam` must be non-negative, got {lam}")
    if not math.isfinite(lam):
        raise ValueError(f"`lam` must be finite, got {lam}")
    return _Balanced(loss, jnp.asarray(lam, dtype=float))
