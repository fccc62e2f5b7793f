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


PRECISION_FACTOR = 100.0
"""A tolerance below `PRECISION_FACTOR * eps` of the model's dtype asks for more than the dtype
resolves: rounding in every step (~eps relative, accumulated over the steps) is then as large
as the error the step control aims at. For float32, 100 eps = 1.2e-5. Only float32 and lower
precisions are warned about (float64: 2.2e-14, below the tolerances the solvers are used at)."""


class PrecisionWarning(UserWarning):
    """A solve asks for a tolerance its inputs' floating precision cannot reach (float32 or
    lower model arrays with rtol / atol below `PRECISION_FACTOR` x machine epsilon)."""


def lowest_precision(params) -> jnp.dtype:
    """The floating dtype of `params`'s arrays with the largest machine epsilon."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}
    if not dtypes:
        return default_dtype()
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps))


def warn_tolerance_precision(params, rtol: float, atol: float, stacklevel: int = 3) -> None:
    """A `PrecisionWarning` when the model is float32 or lower and rtol or atol is below what
    its dtype resolves (`PRECISION_FACTOR` x machine epsilon)."""
    dtype = lowest_precision(params)
    if dtype.itemsize > 4:
        return
    eps = float(jnp.finfo(dtype).eps)
    floor = PRECISION_FACTOR * eps
    asked = {name: tol for name, tol in (("rtol", rtol), ("atol", atol)) if tol < floor}
    if not asked:
        return
    named = " and ".join(f"{name}={tol:g}" for name, tol in asked.items())
    verb = "asks" if len(asked) == 1 else "ask"
    warnings.warn(
        f"the model is {dtype.name} (machine epsilon {eps:.2g}) but {named} {verb} for accuracy "
        f"below {PRECISION_FACTOR:g} x that: the solve runs in {dtype.name}, whose rounding "
        f"(accumulating over the steps) keeps its error at ~{eps:.0e} or more, so the tolerance "
        f"is not met as asked; for that accuracy convert the model and the loss data to float64 "
        f"(model = jax.tree.map(lambda x: x.astype(jnp.float64), model); build the loss from "
        f"float64 arrays), or pass rtol and atol >= {floor:.1e}",
        PrecisionWarning, stacklevel=stacklevel,
    )
