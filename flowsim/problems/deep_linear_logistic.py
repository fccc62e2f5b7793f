"""Deep linear network, logistic loss, separable data (Ji and Telgarsky 2018)."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from scipy import optimize

from .. import data as _data, losses as _losses
from ..models import MLP
from ._base import AbstractProblem, Panel
from .mlp import INIT_SCHEMES, mlp_stds

__all__ = ["INIT_SCHEMES", "DeepLinearLogisticProblem", "deep_linear_logistic", "max_margin"]


def max_margin(X, y) -> tuple[np.ndarray, np.ndarray, dict]:
    """The hard-margin SVM without bias, by SLSQP on the primal and L-BFGS-B on the dual.

    Returns `(w_primal, w_dual, info)`; `info["margin"]` is the maximum margin 1 / ||w||.
    """
    X, y = np.asarray(X, float), np.asarray(y, float)
    Z = y[:, None] * X
    n = Z.shape[0]
    w0 = np.linalg.lstsq(Z, np.ones(n), rcond=None)[0]
    w0 = w0 / max(np.min(Z @ w0), 1e-12) if np.min(Z @ w0) > 0 else w0
    primal = optimize.minimize(
        lambda w: 0.5 * w @ w, w0, jac=lambda w: w, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda w: Z @ w - 1.0, "jac": lambda w: Z}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    K = Z @ Z.T
    dual = optimize.minimize(
        lambda a: (0.5 * a @ K @ a - a.sum(), K @ a - 1.0), np.zeros(n), jac=True,
        method="L-BFGS-B", bounds=[(0.0, None)] * n,
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000},
    )
    w_dual = Z.T @ dual.x
    info = {
        "primal_success": bool(primal.success), "primal_message": str(primal.message),
        "dual_success": bool(dual.success), "min_constraint_primal": float(np.min(Z @ primal.x)),
        "margin": float(1.0 / np.linalg.norm(primal.x)),
        "support_vectors": int(np.sum(dual.x > 1e-8 * dual.x.max())),
    }
    return primal.x, w_dual, info


def angle(a, b):
    """Angle between directions along the last axis, accurate near 0 (unlike arccos)."""
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return 2 * jnp.arctan2(jnp.linalg.norm(a - b, axis=-1), jnp.linalg.norm(a + b, axis=-1))


class DeepLinearLogisticProblem(AbstractProblem):
    """A linear `MLP` x -> W_N ... W_1 x with one output, logistic loss on separable data."""

    X: jax.Array
    y: jax.Array
    loss: Any
    w_star: jax.Array
    gamma_star: jax.Array
    sizes: tuple[int, ...] = eqx.field(static=True)
    init_std: tuple[float, ...] = eqx.field(static=True)

    panels = (
        Panel("angle (rad) between W_N⋯W_1 and the max-margin direction", ("margin_angle",)),
        Panel("normalized margin / max margin", ("margin_ratio",), logy=False),
    )

    def init(self, key):
        return MLP(self.sizes, "linear", init_std=self.init_std, key=key)

    def metrics(self, models):
        w = jax.vmap(lambda m: m.end_to_end()[0])(models)  # (time, d)
        margin = jnp.min(self.y * (w @ self.X.T), axis=-1) / jnp.linalg.norm(w, axis=-1)
        return {"margin_angle": angle(w, self.w_star),
                "margin_ratio": margin / self.gamma_star}


def deep_linear_logistic(
    sizes: Sequence[int],
    *,
    n: int,
    margin: float = 0.1,
    data_seed: int = 0,
    init: str = "default",
    variance: float = 4e-4,
) -> DeepLinearLogisticProblem:
    """A deep linear network `sizes = (d, hidden..., 1)` on `n` linearly separable points
    (`flowsim.data.separable`, margin `margin`, from `data_seed`), logistic loss.

    Gradient flow drives the risk to 0 while the end-to-end vector W_N ... W_1 turns to the
    max-margin direction (metric `margin_angle`, radians; `margin_ratio`: its normalized margin
    over the maximum) and the layers align (the sweep's `alignment` metric). The max-margin
    direction is computed once, at construction (`max_margin`).

    **Initialisation:** as `flowsim.problems.mlp` (`init`, `variance`).
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or sizes[-1] != 1:
        raise ValueError(f"`sizes` must end with one output (last width 1), got {sizes}")
    X, y = _data.separable(n, sizes[0], margin=margin, key=jr.key(data_seed))
    w_p, _, info = max_margin(X, y)
    return DeepLinearLogisticProblem(
        X, y, _losses.logistic(X, y), jnp.asarray(w_p, X.dtype),
        jnp.asarray(info["margin"], X.dtype), sizes, mlp_stds(sizes, init, variance))
