"""Convolutional network with shared filters on Gaussian images (Du, Hu, Lee 2018, Thm 2.3)."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.random as jr

from .. import losses as _losses
from .._precision import default_dtype
from ..models import AbstractActivation, ConvNet, as_activation
from ._base import AbstractProblem, check_init

INIT_SCHEMES = ("default", "unbalanced")


class ConvProblem(AbstractProblem):
    """A `ConvNet` of fixed shape on fixed images; each key draws its filters and head."""

    X: jax.Array
    loss: Any
    channels: tuple[int, ...] = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    kernel_size: int = eqx.field(static=True)
    activation: AbstractActivation = eqx.field(static=True)
    init_std: tuple[float, ...] = eqx.field(static=True)

    def init(self, key):
        return ConvNet(self.X.shape[1:], self.channels, self.out_features,
                       kernel_size=self.kernel_size, activation=self.activation,
                       init_std=self.init_std, dtype=self.X.dtype, key=key)


def conv(
    in_shape: Sequence[int],
    channels: Sequence[int],
    out_features: int,
    *,
    n: int,
    kernel_size: int = 3,
    activation: str | AbstractActivation = "relu",
    negative_slope: float = 0.01,
    noise: float = 0.0,
    data_seed: int = 0,
    init: str = "default",
    variance: float = 1.0,
) -> ConvProblem:
    """Convolutions with shared filters (`flowsim.models.ConvNet`) then a dense head, square
    loss on `n` images x ~ N(0, I / (c h w)) of shape `in_shape = (c, h, w)` with targets
    y = A flatten(x) + noise, A ~ N(0, 1) entries (from `data_seed`).

    **Initialisation:** `"default"`: weights N(0, variance / fan_in); `"unbalanced"`: every
    entry N(0, variance). Thm 2.3: gradient flow conserves ||K_h||^2 - ||K_{h+1}||^2 across
    the layers of shared filters (the sweep's `invariants` and `drift` metrics).
    """
    in_shape = tuple(int(s) for s in in_shape)
    channels = tuple(int(c) for c in channels)
    kernel_size, out_features = int(kernel_size), int(out_features)
    check_init(init, variance, INIT_SCHEMES)
    activation = as_activation(activation, negative_slope=negative_slope)
    # The network's own checks (shapes) first, with its messages.
    template = eqx.filter_eval_shape(
        lambda: ConvNet(in_shape, channels, out_features, kernel_size=kernel_size,
                        activation=activation, key=jr.key(0)))
    fan_ins = [k.shape[1] * k.shape[2] * k.shape[3] for k in template.filters]
    fan_ins.append(template.head.shape[1])
    if init == "default":
        stds = tuple(variance**0.5 / f**0.5 for f in fan_ins)
    else:
        stds = (variance**0.5,) * len(fan_ins)
    kx, ka, kn = jr.split(jr.key(data_seed), 3)
    dtype = default_dtype()
    d = in_shape[0] * in_shape[1] * in_shape[2]
    X = jr.normal(kx, (n, *in_shape), dtype) / d**0.5
    A = jr.normal(ka, (out_features, d), dtype)
    Y = X.reshape(n, d) @ A.T + noise * jr.normal(kn, (n, out_features), dtype)
    return ConvProblem(X, _losses.square(X, Y), channels, out_features, kernel_size, activation,
                       stds)
