"""Asymmetric matrix factorization 1/2 ||U V^T - M||_F^2 (Du, Hu, Lee 2018, Thm 3.1, 3.2, Fig 1)."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from .. import data as _data, invariants as _inv, losses as _losses
from ..models import MatrixFactorization
from ._base import AbstractProblem, Panel, check_init

INIT_SCHEMES = ("gaussian", "balanced")


class FactorizationProblem(AbstractProblem):
    """U (m x r) and V (n x r) fitting a fixed target M; each key draws U and V."""

    M: jax.Array
    loss: Any
    scale: jax.Array
    rank: int = eqx.field(static=True)
    balanced: bool = eqx.field(static=True)

    panels = (
        Panel("Gram gap ‖UᵀU − VᵀV‖_F", ("gram_gap",)),
        Panel("Gram-gap drift ‖G_t − G_0‖_F, G = UᵀU − VᵀV; dotted: ledger bound "
              "Σ η_k²‖∇L_k‖²", ("gram_drift",), bound="ledger_bound"),
        Panel("schedule term Σ_{i<k} η_i²: bounded iff δ > 0, ~η0² log k at δ = 0", (),
              bound="eta_sq_sum"),
        Panel("size of the iterates √(‖U‖² + ‖V‖²)", ("param_norm",), logy=False),
        Panel("relative error ‖UVᵀ − M‖_F / ‖M‖_F", ("relative_error",)),
    )

    def init(self, key):
        m, n = self.M.shape
        ku, kv = jr.split(key)
        U = self.scale * jr.normal(ku, (m, self.rank), self.M.dtype)
        V = self.scale * jr.normal(kv, (n, self.rank), self.M.dtype)
        if self.balanced:  # ||U||_F = ||V||_F: the layer gap starts at 0 (Fig 1)
            V = V * jnp.linalg.norm(U) / jnp.linalg.norm(V)
        return MatrixFactorization(U, V)

    def metrics(self, models):
        G = _inv.gram_gaps(models)[0]  # (time, r, r)
        fro = jnp.linalg.norm(G, axis=(-2, -1))
        sq = jnp.sum(models.U**2, axis=(-2, -1)) + jnp.sum(models.V**2, axis=(-2, -1))
        prod = jnp.einsum("tmr,tnr->tmn", models.U, models.V)
        return {
            "gram_gap": fro,
            "gram_drift": jnp.linalg.norm(G - G[:1], axis=(-2, -1)),
            "param_norm": jnp.sqrt(sq),
            "relative_error": jnp.linalg.norm(prod - self.M, axis=(-2, -1))
            / jnp.linalg.norm(self.M),
        }


def factorization(
    shape: Sequence[int],
    rank: int,
    spectrum: Sequence[float],
    *,
    data_seed: int = 0,
    init: str = "gaussian",
    variance: float = 1e-4,
) -> FactorizationProblem:
    """Factorization of an m x n target M = Qa diag(spectrum) Qb^T (random orthonormal Qa, Qb
    from `data_seed`, `flowsim.data.low_rank_matrix`) as U V^T of rank `rank`.

    **Initialisation:** entries N(0, `variance`); `init="balanced"` then rescales V so that
    ||V||_F = ||U||_F.

    **Metrics:** `gram_gap` ||U^T U - V^T V||_F, `gram_drift` ||G_t - G_0||_F (Thm 3.1 bounds it
    by sum eta_k^2 ||grad L_k||^2 along GD), `param_norm` sqrt(||U||^2 + ||V||^2) and
    `relative_error` ||U V^T - M||_F / ||M||_F.

    **Example:** Thm 3.1, a 20 x 20 rank-3 target:

    ```python
    p = flowsim.problems.factorization((20, 20), 3, (2.0, 1.5, 1.0), variance=1e-4)
    ```
    """
    m, n = (int(s) for s in shape)
    if int(rank) < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank}")
    check_init(init, variance, INIT_SCHEMES)
    M = _data.low_rank_matrix(m, n, spectrum, key=jr.key(data_seed))
    return FactorizationProblem(M, _losses.factorization(M), jnp.asarray(variance**0.5, M.dtype),
                                int(rank), init == "balanced")
