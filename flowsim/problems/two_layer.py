"""One-hidden-layer ReLU network on orthogonal inputs (Boursier et al. 2022)."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .. import data as _data, losses as _losses
from .._precision import default_dtype
from ..models import TwoLayerReLU
from ._base import AbstractProblem, Panel, check_init

INIT_SCHEMES = ("balanced", "gaussian")


def min_variation_norm(X, y) -> float:
    """min sum_j |a_j| ||w_j|| over interpolators of pairwise orthogonal inputs X (n x d):
    ||D^-1 y_+|| + ||D^-1 y_-||, D = diag(||x_i||)."""
    X, y = np.asarray(X), np.asarray(y)
    r = y / np.linalg.norm(X, axis=1)
    return float(np.linalg.norm(np.maximum(r, 0)) + np.linalg.norm(np.minimum(r, 0)))


def balanced_two_layer(d: int, m: int, scale, *, key, dtype=None) -> TwoLayerReLU:
    """w_j ~ N(0, scale^2 I_d / d), a_j = s_j ||w_j|| with signs s_j = +1, -1, +1, ..."""
    dtype = default_dtype() if dtype is None else dtype
    W = scale / d**0.5 * jr.normal(key, (m, d), dtype)
    s = jnp.where(jnp.arange(m) % 2 == 0, 1.0, -1.0).astype(W.dtype)
    return TwoLayerReLU(W, s * jnp.linalg.norm(W, axis=-1))


class TwoLayerReLUProblem(AbstractProblem):
    """x -> sum_j a_j relu(w_j . x) of `width` units on orthogonal inputs with fixed labels."""

    X: jax.Array
    loss: Any
    scale: jax.Array
    vmin: jax.Array
    width: int = eqx.field(static=True)
    balanced: bool = eqx.field(static=True)

    panels = (
        Panel("variation norm Σ_j |a_j|‖w_j‖; black: the minimum over interpolators",
              ("variation_norm",), reference="min_variation_norm", logy=False),
    )

    def init(self, key):
        d = self.X.shape[1]
        if self.balanced:
            return balanced_two_layer(d, self.width, self.scale, key=key, dtype=self.X.dtype)
        kw, ka = jr.split(key)  # TwoLayerReLU.random's draws, with a traced scale
        W = self.scale / d**0.5 * jr.normal(kw, (self.width, d), self.X.dtype)
        return TwoLayerReLU(W, self.scale * jr.normal(ka, (self.width,), self.X.dtype))

    def metrics(self, models):
        vn = jnp.sum(jnp.abs(models.a) * jnp.linalg.norm(models.W, axis=-1), axis=-1)
        return {"variation_norm": vn, "min_variation_norm": jnp.full_like(vn, self.vmin)}


def two_layer_relu(
    dim: int,
    width: int,
    labels: Sequence[float],
    *,
    data_seed: int = 0,
    init: str = "balanced",
    variance: float = 1e-24,
) -> TwoLayerReLUProblem:
    """`len(labels)` pairwise orthogonal inputs in R^dim (`flowsim.data.orthogonal_inputs`,
    from `data_seed`) with the given labels, square loss, `width` hidden ReLU units.

    **Initialisation:** `"balanced"`: w_j ~ N(0, variance I/dim), a_j = +-||w_j|| with
    alternating signs; `"gaussian"`: `TwoLayerReLU.random` with scale sqrt(variance). From a
    small initialisation the flow goes saddle to saddle towards the interpolator of minimum
    variation norm (metrics `variation_norm` and its closed-form minimum `min_variation_norm`).
    """
    y = jnp.asarray(labels, default_dtype())
    if y.ndim != 1 or y.shape[0] < 1:
        raise ValueError(f"`labels` must be a non-empty list of numbers, got {labels}")
    check_init(init, variance, INIT_SCHEMES)
    X = _data.orthogonal_inputs(y.shape[0], int(dim), key=jr.key(data_seed))
    return TwoLayerReLUProblem(X, _losses.square(X, y), jnp.asarray(variance**0.5, X.dtype),
                               jnp.asarray(min_variation_norm(X, y), X.dtype), int(width),
                               init == "balanced")
