"""Fully connected networks on Gaussian, teacher or separable data (Du, Hu, Lee 2018, Fig 2)."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.random as jr

from .. import data as _data, losses as _losses
from .._precision import default_dtype
from ..init import balanced_stds
from ..models import MLP, AbstractActivation, as_activation
from ._base import AbstractProblem, check_init

INIT_SCHEMES = ("balanced", "unbalanced", "default")


def mlp_stds(sizes: Sequence[int], scheme: str, variance: float) -> tuple[float, ...]:
    """Per-layer weight standard deviations of an initialisation scheme.

    `balanced`: E||W_h||_F^2 equal across layers, `variance` the entry variance of the last
    layer (`flowsim.init.balanced_stds`); `unbalanced`: every entry of variance `variance`;
    `default`: `variance / fan_in`.
    """
    check_init(scheme, variance, INIT_SCHEMES)
    if scheme == "balanced":
        return tuple(balanced_stds(sizes, variance))
    if scheme == "unbalanced":
        return (variance**0.5,) * (len(sizes) - 1)
    if scheme == "default":
        return tuple(variance**0.5 / d**0.5 for d in sizes[:-1])  # = MLP's 1/sqrt(d) at 1
    raise AssertionError(scheme)  # unreachable: check_init


class MLPProblem(AbstractProblem):
    """An `MLP` of fixed widths on fixed data; each key draws its Gaussian weights."""

    X: jax.Array
    loss: Any
    sizes: tuple[int, ...] = eqx.field(static=True)
    activation: AbstractActivation = eqx.field(static=True)
    init_std: tuple[float, ...] = eqx.field(static=True)

    def init(self, key):
        return MLP(self.sizes, self.activation, init_std=self.init_std, key=key)


def mlp(
    sizes: Sequence[int],
    *,
    n: int,
    activation: str | AbstractActivation = "relu",
    negative_slope: float = 0.01,
    data: str = "gaussian",
    noise: float = 0.0,
    margin: float = 0.1,
    loss: str = "square",
    data_seed: int = 0,
    init: str = "balanced",
    variance: float = 1.0,
) -> MLPProblem:
    """A fully connected network `sizes = (d_in, hidden..., d_out)` without biases.

    **Data** (`n` points, drawn from `data_seed`):

    - `"gaussian"`: x ~ N(0, I/d_in), y = A x + noise, A ~ N(0, 1) entries
      (`flowsim.data.gaussian_regression`);
    - `"teacher"`: x ~ N(0, I), y = a random `MLP` of the same widths and activation (default
      initialisation) applied to x: the Du-Hu-Lee Fig 2 setting;
    - `"separable"`: linearly separable points with labels +-1 (`flowsim.data.separable`), one
      output; with `loss="logistic"`.

    **Initialisation:** `init` in `"balanced"`, `"unbalanced"`, `"default"` (see `mlp_stds`).

    **Example:** the Fig 2 problem of Du, Hu, Lee (2018):

    ```python
    p = flowsim.problems.mlp((1000, 100, 100, 10), n=1000, data="teacher", variance=1e-4)
    net = p.init(jax.random.key(0))
    ```
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2:
        raise ValueError(f"`sizes` must list at least two widths, got {sizes}")
    activation = as_activation(activation, negative_slope=negative_slope)
    if noise and data != "gaussian":
        raise ValueError(f"`noise` applies to data='gaussian' only, got noise={noise} with "
                         f"data={data!r}")
    key = jr.key(data_seed)
    if data == "gaussian":
        X, Y = _data.gaussian_regression(n, sizes[0], sizes[-1], noise=noise, key=key)
    elif data == "teacher":
        kx, kt = jr.split(key)
        X = jr.normal(kx, (n, sizes[0]), default_dtype())
        Y = MLP(sizes, activation, key=kt)(X)
    elif data == "separable":
        if sizes[-1] != 1:
            raise ValueError(f"separable data has one label per point: the last width must be 1, "
                             f"got sizes {sizes}")
        X, Y = _data.separable(n, sizes[0], margin=margin, key=key)
    else:
        raise ValueError(f"`data` must be 'gaussian', 'teacher' or 'separable', got {data!r}")
    if loss == "square":
        fit = _losses.square(X, Y)
    elif loss == "logistic":
        if data != "separable":
            raise ValueError("the logistic loss needs labels: use data='separable'")
        fit = _losses.logistic(X, Y)
    else:
        raise ValueError(f"`loss` must be 'square' or 'logistic', got {loss!r}")
    return MLPProblem(X, fit, sizes, activation, mlp_stds(sizes, init, variance))
