"""Fully connected networks."""

from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._precision import as_float_array, default_dtype
from ._activations import AbstractActivation, Linear, as_activation
from ._base import AbstractModel, activate, init_stds


class MLP(AbstractModel):
    """Fully connected network x -> W_N s(... s(W_1 x)), without biases by default.

    Weights use the mathematical orientation: `W_h` has shape `(sizes[h], sizes[h-1])`.
    With `use_bias=True` each layer's bias is stored as the last column of its matrix, so
    `W_h` has shape `(sizes[h], sizes[h-1] + 1)`; a bias counts as an incoming parameter of
    its unit (it scales with the unit's incoming weights).

    **Arguments:**

    - `sizes`: layer widths `(d_in, h_1, ..., d_out)`, at least two entries.
    - `activation`: an `AbstractActivation`, or a shortcut for one (`as_activation`):
      `"linear"`, `"relu"`, `"leaky_relu"` (positively homogeneous: the balancing invariants
      hold) or `"tanh"` (not homogeneous: shows that the invariants then drift).
    - `init_std`: standard deviation of the Gaussian weights: `None` for 1/sqrt(fan_in), a float for
      all layers, or a sequence with one value per layer (e.g. a balanced initialisation).
    - `negative_slope`: slope for negative inputs of the `"leaky_relu"` shortcut.
    - `use_bias`: add a bias to every layer.
    - `key`: a JAX PRNG key.

    **Example:**

    ```python
    import jax.random as jr
    import flowsim
    net = flowsim.models.MLP((4, 8, 8, 2), "relu", key=jr.key(0))
    net(jr.normal(jr.key(1), (5, 4))).shape  # (5, 2)
    ```
    """

    weights: tuple[Float[Array, "out in"], ...]
    activation: AbstractActivation = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | AbstractActivation = "relu",
        *,
        init_std: float | Sequence[float] | None = None,
        negative_slope: float = 0.01,
        use_bias: bool = False,
        dtype=None,
        key: PRNGKeyArray,
    ):
        sizes = tuple(sizes)
        if len(sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(
                f"`sizes` must list at least two positive integer widths (d_in, ..., d_out), "
                f"got {sizes}"
            )
        activation = as_activation(activation, negative_slope=negative_slope)
        n_layers = len(sizes) - 1
        stds = init_stds(init_std, sizes[:-1])
        dtype = default_dtype() if dtype is None else dtype
        keys = jr.split(key, n_layers)
        extra = 1 if use_bias else 0
        self.weights = tuple(
            std * jr.normal(k, (d_out, d_in + extra), dtype)
            for k, std, d_in, d_out in zip(keys, stds, sizes[:-1], sizes[1:])
        )
        self.activation = activation
        self.use_bias = use_bias

    @classmethod
    def from_weights(
        cls,
        weights: Sequence[Array],
        activation: str | AbstractActivation = "relu",
        *,
        negative_slope: float = 0.01,
        use_bias: bool = False,
    ) -> "MLP":
        """An MLP from given weight matrices, shapes `(out, in)` (or `(out, in+1)` with bias)."""
        weights = tuple(as_float_array(w, "weights") for w in weights)
        extra = 1 if use_bias else 0
        if not weights or any(w.ndim != 2 for w in weights):
            raise ValueError("`weights` must be a non-empty sequence of 2-d arrays")
        for h, (w, w_next) in enumerate(zip(weights[:-1], weights[1:])):
            if w_next.shape[1] != w.shape[0] + extra:
                raise ValueError(
                    f"`weights[{h + 1}]` has shape {w_next.shape}, which does not follow "
                    f"`weights[{h}]` of shape {w.shape}"
                )
        sizes = (weights[0].shape[1] - extra,) + tuple(w.shape[0] for w in weights)
        # Only the structure is needed: build it abstractly (no random draw, nothing compiled).
        template = eqx.filter_eval_shape(
            lambda: cls(sizes, activation, init_std=0.0, negative_slope=negative_slope,
                        use_bias=use_bias, dtype=weights[0].dtype, key=jr.key(0))
        )
        return eqx.tree_at(lambda m: m.weights, template, weights)

    @property
    def layers(self):
        return self.weights

    @property
    def activations(self):
        return (self.activation,) * (len(self.weights) - 1)

    @property
    def sizes(self) -> tuple[int, ...]:
        extra = 1 if self.use_bias else 0
        return (self.weights[0].shape[-1] - extra,) + tuple(w.shape[-2] for w in self.weights)

    def hidden_units(self):
        n = len(self.weights)
        units = []
        for h in range(n - 1):
            incoming = self.weights[h]
            width = incoming.shape[-2]
            # Outgoing: column i of W_{h+1}, excluding W_{h+1}'s own bias column.
            outgoing = jnp.swapaxes(self.weights[h + 1][..., :width], -1, -2)
            units.append((incoming, outgoing))
        return tuple(units)

    def forward(self, x, pattern=None):
        d_in = self.sizes[0]
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(
                f"inputs must have shape (n, {d_in}) for an MLP with sizes {self.sizes}, "
                f"got {x.shape}"
            )
        pre = []
        for h, w in enumerate(self.weights):
            if self.use_bias:
                x = x @ w[:, :-1].T + w[:, -1]
            else:
                x = x @ w.T
            if h < len(self.weights) - 1:
                pre.append(x)
                x = activate(self.activation, x, None if pattern is None else pattern[h])
        return x, tuple(pre)

    def end_to_end(self) -> Float[Array, "out in"]:
        """The product W_N ... W_1 of a linear network without biases."""
        if not isinstance(self.activation, Linear) or self.use_bias:
            raise ValueError(
                "end_to_end() needs a linear MLP without biases, got "
                f"activation={self.activation!r}, use_bias={self.use_bias}"
            )
        out = self.weights[0]
        for w in self.weights[1:]:
            out = w @ out
        return out
