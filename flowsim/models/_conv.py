"""Convolutional network with shared filters (Du, Hu, Lee 2018, Thm 2.3)."""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._precision import default_dtype
from ._activations import AbstractActivation, as_activation
from ._base import AbstractModel, activate, init_stds


def _conv(x, k):
    """'VALID' stride-1 convolution of x (n, c_in, h, w) with filters k (c_out, c_in, s, s), as
    image patches times the flattened filters.

    The same numbers as `lax.conv_general_dilated`, but a vmap over both x and k stays a batched
    matmul: vmapped convolutions become grouped convolutions, which XLA's partitioner cannot
    split over several devices (a sweep shards its seeds) and which are slow on CPU.
    """
    s = k.shape[-1]
    patches = jax.lax.conv_general_dilated_patches(
        x, (s, s), (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=jax.lax.Precision.HIGHEST,
    )  # (n, c_in * s * s, h', w'), features ordered (c_in, row, column) as in k
    return jnp.einsum("nfhw,of->nohw", patches, k.reshape(k.shape[0], -1),
                      precision=jax.lax.Precision.HIGHEST)


class ConvNet(AbstractModel):
    """2-d convolutions (stride 1, 'VALID' padding, no bias) with shared filters, then a dense head.

    x (channels, height, width) -> K_1 * x -> s -> K_2 * . -> s -> ... -> W_head flatten(.)

    The free parameters of a convolution are its filters, shared across positions; each output
    channel is a hidden unit whose incoming parameters are its filter and whose outgoing
    parameters are the next layer's weights on that channel.

    **Arguments:**

    - `in_shape`: input `(channels, height, width)`.
    - `channels`: output channels of each convolution (at least two convolutions).
    - `out_features`: width of the dense head.
    - `kernel_size`: side of the square filters.
    - `activation`: as for `MLP`; ReLU by default.
    - `negative_slope`: slope for negative inputs of the `"leaky_relu"` shortcut.
    - `init_std`: `None` for 1/sqrt(fan_in), a float, or one value per layer (convs then head).
    - `key`: a JAX PRNG key.
    """

    filters: tuple[Float[Array, "c_out c_in k k"], ...]
    head: Float[Array, "out features"]
    activation: AbstractActivation = eqx.field(static=True)
    in_shape: tuple[int, int, int] = eqx.field(static=True)

    def __init__(
        self,
        in_shape: Sequence[int],
        channels: Sequence[int],
        out_features: int,
        *,
        kernel_size: int = 3,
        activation: str | AbstractActivation = "relu",
        init_std: float | Sequence[float] | None = None,
        negative_slope: float = 0.01,
        dtype=None,
        key: PRNGKeyArray,
    ):
        in_shape = tuple(int(s) for s in in_shape)
        channels = tuple(int(c) for c in channels)
        if len(in_shape) != 3:
            raise ValueError(f"`in_shape` must be (channels, height, width), got {in_shape}")
        if len(channels) < 2:
            raise ValueError(f"`channels` must list at least two convolutions, got {channels}")
        activation = as_activation(activation, negative_slope=negative_slope)
        c, hgt, wid = in_shape
        hgt_out = hgt - len(channels) * (kernel_size - 1)
        wid_out = wid - len(channels) * (kernel_size - 1)
        if hgt_out < 1 or wid_out < 1:
            raise ValueError(
                f"input {in_shape} is too small for {len(channels)} valid convolutions of "
                f"kernel_size={kernel_size}"
            )
        n_layers = len(channels) + 1
        fan_ins = [ci * kernel_size**2 for ci in (c, *channels[:-1])]
        fan_ins.append(channels[-1] * hgt_out * wid_out)
        stds = init_stds(init_std, fan_ins)
        dtype = default_dtype() if dtype is None else dtype
        keys = jr.split(key, n_layers)
        self.filters = tuple(
            std * jr.normal(k, (co, ci, kernel_size, kernel_size), dtype)
            for k, std, ci, co in zip(keys, stds, (c, *channels[:-1]), channels)
        )
        self.head = stds[-1] * jr.normal(keys[-1], (out_features, fan_ins[-1]), dtype)
        self.activation = activation
        self.in_shape = in_shape

    @property
    def layers(self):
        return (*self.filters, self.head)

    @property
    def activations(self):
        return (self.activation,) * len(self.filters)

    def hidden_units(self):
        units = []
        for h, k in enumerate(self.filters):
            c_out = k.shape[-4]
            lead = k.shape[:-4]
            incoming = k.reshape(*lead, c_out, -1)
            if h + 1 < len(self.filters):
                nxt = jnp.swapaxes(self.filters[h + 1], -3, -4)  # (c_out of h, c_next, k, k)
                outgoing = nxt.reshape(*lead, c_out, -1)
            else:
                out_f = self.head.shape[-2]
                head = self.head.reshape(*lead, out_f, c_out, -1)
                outgoing = jnp.swapaxes(head, -2, -3).reshape(*lead, c_out, -1)
            units.append((incoming, outgoing))
        return tuple(units)

    def forward(self, x, pattern=None):
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"inputs must have shape (n, {', '.join(map(str, self.in_shape))}), got {x.shape}"
            )
        pre = []
        for h, k in enumerate(self.filters):
            x = _conv(x, k)
            pre.append(x)
            x = activate(self.activation, x, None if pattern is None else pattern[h])
        return x.reshape(x.shape[0], -1) @ self.head.T, tuple(pre)
