"""The one-hidden-layer ReLU network of Boursier, Pillaud-Vivien and Flammarion (2022)."""

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._precision import as_float_array, default_dtype
from ._activations import ReLU
from ._base import AbstractModel, activate


class TwoLayerReLU(AbstractModel):
    """x -> sum_j a_j relu(w_j . x), with scalar output.

    **Arguments:**

    - `W`: hidden weights, shape `(m, d)` (row j is w_j).
    - `a`: output weights, shape `(m,)`.

    Use `TwoLayerReLU.random(d, m, scale=..., key=...)` for a Gaussian draw.
    """

    W: Float[Array, "m d"]
    a: Float[Array, " m"]

    def __init__(self, W, a):
        W = as_float_array(W, "W")
        a = as_float_array(a, "a")
        if W.ndim != 2 or a.ndim != 1 or a.shape[0] != W.shape[0]:
            raise ValueError(
                f"`W` must have shape (m, d) and `a` shape (m,), got W {W.shape} and a {a.shape}"
            )
        self.W = W
        self.a = a

    @classmethod
    def random(
        cls, d: int, m: int, *, scale: float = 1.0, dtype=None, key: PRNGKeyArray
    ) -> "TwoLayerReLU":
        """w_j ~ N(0, scale^2 I_d / d) and a_j ~ N(0, scale^2)."""
        if not scale >= 0:
            raise ValueError(f"`scale` must be non-negative, got {scale}")
        dtype = default_dtype() if dtype is None else dtype
        kw, ka = jr.split(key)
        W = scale / d**0.5 * jr.normal(kw, (m, d), dtype)
        return cls(W, scale * jr.normal(ka, (m,), dtype))

    @property
    def layers(self):
        return (self.W, self.a)

    @property
    def activations(self):
        return (ReLU(),)

    def hidden_units(self):
        return ((self.W, self.a[..., None]),)

    def forward(self, x, pattern=None):
        if x.ndim != 2 or x.shape[1] != self.W.shape[1]:
            raise ValueError(f"inputs must have shape (n, {self.W.shape[1]}), got {x.shape}")
        z = x @ self.W.T
        h = activate(ReLU(), z, None if pattern is None else pattern[0])
        return h @ self.a, (z,)

    def variation_norm(self) -> Float[Array, ""]:
        """sum_j |a_j| ||w_j||, the quantity minimised by the implicit bias of the flow."""
        return jnp.sum(jnp.abs(self.a) * jnp.linalg.norm(self.W, axis=-1))
