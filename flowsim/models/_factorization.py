"""Asymmetric matrix factorization f = U V^T, a two-layer linear network."""

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._precision import as_float_array, default_dtype
from ._activations import Linear
from ._base import AbstractModel


class MatrixFactorization(AbstractModel):
    """The factorization U V^T seen as the linear network x -> U (V^T x): W_1 = V^T, W_2 = U.

    **Arguments:**

    - `U`: array of shape `(m, r)`.
    - `V`: array of shape `(n, r)`.

    Use `MatrixFactorization.random(m, n, r, scale=..., key=...)` for a Gaussian draw.

    **Example:**

    ```python
    import jax.random as jr
    from flowsim.models import MatrixFactorization
    mf = MatrixFactorization.random(5, 4, 2, scale=1e-3, key=jr.key(0))
    mf.end_to_end().shape  # (5, 4)
    ```
    """

    U: Float[Array, "m r"]
    V: Float[Array, "n r"]

    def __init__(self, U, V):
        U = as_float_array(U, "U")
        V = as_float_array(V, "V")
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[1]:
            raise ValueError(
                f"`U` and `V` must be 2-d with the same number of columns (the rank), "
                f"got U {U.shape} and V {V.shape}"
            )
        self.U = U
        self.V = V

    @classmethod
    def random(
        cls, m: int, n: int, rank: int, *, scale: float = 1.0, dtype=None, key: PRNGKeyArray
    ) -> "MatrixFactorization":
        """U and V with i.i.d. N(0, scale^2) entries."""
        if not scale >= 0:
            raise ValueError(f"`scale` must be non-negative, got {scale}")
        dtype = default_dtype() if dtype is None else dtype
        ku, kv = jr.split(key)
        return cls(scale * jr.normal(ku, (m, rank), dtype), scale * jr.normal(kv, (n, rank), dtype))

    @property
    def layers(self):
        return (jnp.swapaxes(self.V, -1, -2), self.U)

    @property
    def activations(self):
        return (Linear(),)

    def hidden_units(self):
        # Unit j: incoming row j of V^T (= column j of V), outgoing column j of U.
        return ((jnp.swapaxes(self.V, -1, -2), jnp.swapaxes(self.U, -1, -2)),)

    def end_to_end(self) -> Float[Array, "m n"]:
        """The product U V^T."""
        return self.U @ jnp.swapaxes(self.V, -1, -2)

    def forward(self, x, pattern=None):
        del pattern  # linear: no kinks
        if x.ndim != 2 or x.shape[1] != self.V.shape[0]:
            raise ValueError(f"inputs must have shape (n, {self.V.shape[0]}), got {x.shape}")
        return (x @ self.V) @ self.U.T, ()
