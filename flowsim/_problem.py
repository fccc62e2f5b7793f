"""Validation shared by the solvers: a model (or batch of models) and a loss that fit together."""

import equinox as eqx
import jax
import jax.numpy as jnp


def check_model(params, batched: bool) -> int | None:
    """Checks that `params` holds floating arrays (with one batch size when `batched`)."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise TypeError("`model` has no floating-point arrays to train; pass an Equinox model")
    if not batched:
        return None
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"`batched=True` needs every model array to carry the same leading batch axis, got "
            f"leading sizes {sorted(s for s in sizes if s is not None)}; build the batch with "
            f"flowsim.init.batch"
        )
    return sizes.pop()


def split_batch(params, static, batched: bool):
    """The first model of a batch (or the model itself)."""
    if batched:
        params = jax.tree.map(lambda x: x[0], params)
    return eqx.combine(params, static)


def check_loss(loss, model) -> None:
    """Evaluates the loss abstractly: shape errors surface now, with the loss's own message."""
    if not callable(loss):
        raise TypeError(f"`loss` must be a callable model -> scalar, got {type(loss).__name__}")
    out = eqx.filter_eval_shape(loss, model)
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"`loss` must return a floating scalar, got {getattr(out, 'shape', out)} "
            f"{getattr(out, 'dtype', '')}"
        )
