"""Problem generators: regression data, low-rank targets, separable and orthogonal inputs.

Every generator takes `key` keyword-only and returns float64 arrays (see `flowsim` on precision).
"""

from collections.abc import Sequence

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._precision import default_dtype

__all__ = ["gaussian_regression", "low_rank_matrix", "orthogonal_inputs", "separable",
           "spectral_factorization"]


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def gaussian_regression(
    n: int, d_in: int, d_out: int, *, noise: float = 0.0, key: PRNGKeyArray
) -> tuple[Float[Array, "n d_in"], Float[Array, "n d_out"]]:
    """X ~ N(0, I/d_in) rows (unit expected norm); Y = X A^T + noise with A ~ N(0, 1) entries."""
    for name, v in (("n", n), ("d_in", d_in), ("d_out", d_out)):
        _positive(name, v)
    kx, ka, kn = jr.split(key, 3)
    dtype = default_dtype()
    X = jr.normal(kx, (n, d_in), dtype) / d_in**0.5
    A = jr.normal(ka, (d_out, d_in), dtype)
    Y = X @ A.T + noise * jr.normal(kn, (n, d_out), dtype)
    return X, Y


def _orthonormal(key, m, r, dtype):
    q, _ = jnp.linalg.qr(jr.normal(key, (m, r), dtype))
    return q


def low_rank_matrix(
    m: int, n: int, singular_values: Sequence[float], *, key: PRNGKeyArray
) -> Float[Array, "m n"]:
    """M = Qa diag(s) Qb^T with random orthonormal Qa (m x r), Qb (n x r)."""
    _positive("m", m)
    _positive("n", n)
    s = jnp.asarray(singular_values, default_dtype())
    r = s.shape[0]
    if r > min(m, n):
        raise ValueError(f"rank {r} exceeds min(m, n) = {min(m, n)}")
    ka, kb = jr.split(key)
    return (_orthonormal(ka, m, r, s.dtype) * s) @ _orthonormal(kb, n, r, s.dtype).T


def spectral_factorization(
    m: int, n: int, singular_values: Sequence[float], a0: float | Sequence[float], *,
    key: PRNGKeyArray,
):
    """A balanced spectral initialisation and its target, with the closed-form flow.

    M = Qa diag(s) Qb^T and U0 = Qa diag(sqrt(a0)), V0 = Qb diag(sqrt(a0)). Gradient flow on
    1/2 ||U V^T - M||^2 keeps U = Qa diag(sqrt(a)), V = Qb diag(sqrt(a)) with a' = 2a(s - a), so
    a(t) = s / (1 + (s/a0 - 1) exp(-2 s t)).

    **Returns:** `(M, U0, V0, product_at)` where `product_at(t)` is the exact U V^T at time t.
    """
    s = jnp.asarray(singular_values, default_dtype())
    r = s.shape[0]
    a0 = jnp.broadcast_to(jnp.asarray(a0, s.dtype), (r,))
    ka, kb = jr.split(key)
    Qa, Qb = _orthonormal(ka, m, r, s.dtype), _orthonormal(kb, n, r, s.dtype)
    M = (Qa * s) @ Qb.T

    def product_at(t):
        a = s / (1 + (s / a0 - 1) * jnp.exp(-2 * s * t))
        return (Qa * a) @ Qb.T

    return M, Qa * jnp.sqrt(a0), Qb * jnp.sqrt(a0), product_at


def separable(
    n: int, d: int, *, margin: float = 0.1, key: PRNGKeyArray
) -> tuple[Float[Array, "n d"], Float[Array, " n"]]:
    """Linearly separable data: labels sign(<w*, x>), points with |<w*, x>| < margin removed by
    pushing them out to the margin along w*. Returns `(X, y)` with y in {-1, +1}."""
    _positive("n", n)
    _positive("d", d)
    kw, kx = jr.split(key)
    dtype = default_dtype()
    w = jr.normal(kw, (d,), dtype)
    w = w / jnp.linalg.norm(w)
    X = jr.normal(kx, (n, d), dtype)
    proj = X @ w
    y = jnp.where(proj >= 0, 1.0, -1.0).astype(dtype)
    X = X + jnp.outer(jnp.maximum(margin - y * proj, 0.0) * y, w)
    return X, y


def orthogonal_inputs(
    n: int, d: int, *, key: PRNGKeyArray
) -> Float[Array, "n d"]:
    """n pairwise orthogonal inputs in R^d (n <= d) with random norms in [0.5, 1.5]."""
    _positive("n", n)
    _positive("d", d)
    if n > d:
        raise ValueError(f"at most d = {d} pairwise orthogonal inputs exist, got n = {n}")
    kq, kr = jr.split(key)
    dtype = default_dtype()
    q = _orthonormal(kq, d, n, dtype).T
    return q * jr.uniform(kr, (n, 1), dtype, 0.5, 1.5)
