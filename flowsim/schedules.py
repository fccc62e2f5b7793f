"""Learning-rate schedules (optax schedules: step count k from 0 -> eta_k)."""

import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._precision import default_dtype

__all__ = ["constant", "power_decay"]


def _check_eta0(eta0) -> float:
    try:
        value = float(eta0)
    except (TypeError, ValueError):
        raise TypeError(f"`eta0` must be a positive float, got {eta0!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`eta0` must be a positive finite float, got {eta0}")
    return value


class PowerDecay(eqx.Module):
    """eta_k = eta0 * (k + 1)^-(1/2 + delta). Its fields are arrays: no recompilation per value."""

    eta0: Float[Array, ""]
    delta: Float[Array, ""]

    def __call__(self, count):
        k = jnp.asarray(count, self.eta0.dtype)
        return self.eta0 * (k + 1) ** (-(0.5 + self.delta))


class Constant(eqx.Module):
    """eta_k = eta for every k."""

    eta: Float[Array, ""]

    def __call__(self, count):
        del count
        return self.eta


def power_decay(eta0: float, delta: float) -> PowerDecay:
    """The schedule eta_k = eta0 * (k + 1)^-(1/2 + delta) of Du, Hu, Lee (2018), Thm 3.1.

    **Arguments:**

    - `eta0`: the first step size, positive.
    - `delta`: in [0, 1/2]. The theorem needs 0 < delta <= 1/2 (then sum eta_k^2 < inf and the
      layers stay balanced); delta = 0 (eta_k ~ k^-1/2, sum eta_k^2 ~ log k) is allowed for
      comparison.

    **Returns:** a callable `count -> eta_count`, usable as an optax schedule.

    **Raises:** `ValueError` for delta outside [0, 1/2] or eta0 not positive.

    **Example:**

    ```python
    from flowsim.schedules import power_decay
    sched = power_decay(0.1, 0.25)
    float(sched(0)), float(sched(3))  # (0.1, 0.1 * 4**-0.75)
    ```
    """
    eta0 = _check_eta0(eta0)
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise TypeError(f"`delta` must be a float in [0, 1/2], got {delta!r}") from None
    if not (0.0 <= d <= 0.5):
        raise ValueError(
            f"`delta` must be in [0, 1/2], got {delta} (delta > 0 for Thm 3.1; 0 for comparison)"
        )
    dtype = default_dtype()
    return PowerDecay(jnp.asarray(eta0, dtype), jnp.asarray(d, dtype))


def constant(eta: float) -> Constant:
    """The constant schedule eta_k = eta (validated: positive and finite)."""
    return Constant(jnp.asarray(_check_eta0(eta), default_dtype()))
