"""The documented float64 switch.

flowsim enables `jax_enable_x64` when it is imported, because precision is the product: every
array flowsim creates is float64. Set the environment variable ``FLOWSIM_FLOAT32=1`` *before*
importing flowsim to leave JAX's setting alone; flowsim then creates float32 arrays and says so
once with a warning. flowsim never downcasts an array you pass in.
"""

import os
import warnings

import jax
import jax.numpy as jnp

_OPT_OUT = os.environ.get("FLOWSIM_FLOAT32", "").strip().lower() in {"1", "true", "yes"}

if not _OPT_OUT:
    jax.config.update("jax_enable_x64", True)
elif not jax.config.jax_enable_x64:
    warnings.warn(
        "FLOWSIM_FLOAT32 is set: flowsim creates float32 arrays; invariants and flow solutions "
        "are then accurate to ~1e-7 at best.",
        stacklevel=2,
    )


def default_dtype() -> jnp.dtype:
    """The floating dtype flowsim creates arrays in: float64 unless the float32 opt-out is on."""
    return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def as_float_array(x, name: str) -> jax.Array:
    """Converts `x` to an array of the default dtype; floating arrays keep their dtype.

    Integer and boolean data are promoted (never a downcast); a float64 array under the float32
    opt-out is an error rather than a silent downcast.
    """
    arr = jnp.asarray(x)
    if jnp.issubdtype(arr.dtype, jnp.floating):
        return arr
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {arr.dtype}")
    return arr.astype(default_dtype())
