"""Initialisations: batches of random models from one PRNG key, and balanced/scaled schemes."""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import PRNGKeyArray

__all__ = ["balanced_stds", "batch", "scale"]


def batch(make: Callable[[PRNGKeyArray], eqx.Module], size: int, *, key: PRNGKeyArray):
    """B independent initialisations as one model whose arrays have a leading batch axis.

    **Arguments:**

    - `make`: a function `key -> model`, e.g. `lambda k: MLP((10, 20, 1), key=k)`.
    - `size`: the batch size B.
    - `key`: a JAX PRNG key, split into B keys.

    **Returns:** the batched model, ready for `gradient_descent(..., batched=True)` or
    `gradient_flow(..., batched=True)`.

    **Example:**

    ```python
    import jax.random as jr
    from flowsim.init import batch
    from flowsim.models import MLP
    nets = batch(lambda k: MLP((3, 5, 1), key=k), 16, key=jr.key(0))
    nets.weights[0].shape  # (16, 5, 3)
    ```
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive integer, got {size!r}")
    return eqx.filter_vmap(make)(jr.split(key, size))


def scale(model, factor: float):
    """The model with every floating array multiplied by `factor` (e.g. a small initialisation)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return eqx.combine(jax.tree.map(lambda x: factor * x, params), static)


def balanced_stds(sizes: Sequence[int], variance: float) -> tuple[float, ...]:
    """Per-layer standard deviations that balance E||W_h||_F^2 across layers.

    The last layer gets entry variance `variance`; every other layer the entry variance that
    makes its expected squared Frobenius norm equal to the last layer's. For Du, Hu, Lee (2018)
    Fig 2, sizes (1000, 100, 100, 10) and variance 1e-4 give N(0, 1e-4/100), N(0, 1e-4/10),
    N(0, 1e-4) (variances), so E||W_h||_F^2 = 0.1 for every layer. Pass the result as
    `MLP(..., init_std=balanced_stds(sizes, variance))`.
    """
    sizes = tuple(sizes)
    n_params = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    last = n_params[-1]
    return tuple((variance * last / n) ** 0.5 for n in n_params)
