"""Validation shared by the solvers: a model (or batch of models) and a loss that fit together,
finite inputs, and the memory a run may ask for."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._jit import Memo, is_immutable_array


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


_CHECKED_MAX = 256
"""`check_loss` remembers this many (loss, model) signatures that passed; tracing the loss
again costs ~1-4 ms a call, most of a small solve's time."""
_checked: dict = {}


def _signature(tree):
    """A hashable key of `tree`'s structure and array shapes / dtypes (its non-array leaves by
    value), or None where a leaf is not hashable."""
    leaves, treedef = jax.tree.flatten(tree)
    key = [treedef]
    for x in leaves:
        if eqx.is_array(x):
            key.append((x.shape, x.dtype, getattr(x, "weak_type", False)))
        else:
            try:
                hash(x)
            except TypeError:
                return None
            key.append((type(x), x))
    return tuple(key)


def check_loss(loss, model) -> None:
    """Evaluates the loss abstractly: shape errors surface now, with the loss's own message.

    A loss and model of a signature already checked (same structure, shapes and dtypes) are not
    traced again."""
    if not callable(loss):
        raise TypeError(f"`loss` must be a callable model -> scalar, got {type(loss).__name__}")
    key = _signature((loss, model))
    if key is not None and key in _checked:
        return
    out = eqx.filter_eval_shape(loss, model)
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"`loss` must return a floating scalar, got {getattr(out, 'shape', out)} "
            f"{getattr(out, 'dtype', '')}"
        )
    if key is not None:
        if len(_checked) >= _CHECKED_MAX:
            _checked.clear()
        _checked[key] = True


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


_known_finite = Memo(maxsize=1024)
"""JAX arrays already found finite (immutable: the check holds while the array lives): the
loss's data and a model passed again are not checked again (~0.02 ms a call)."""


def _all_finite(leaves) -> bool:
    """Whether every (concrete, inexact) array in `leaves` is finite: one compiled reduction
    and one transfer for all of them, none where all are known to be finite."""
    leaves = [x for x in leaves if eqx.is_inexact_array(x) and _is_concrete(x)]
    if all(_known_finite.get((x,)) is not None for x in leaves):
        return True
    if not bool(np.all(np.asarray(_finite_flags(leaves)))):
        return False
    for x in leaves:
        if is_immutable_array(x):
            _known_finite.put((x,), True)
    return True


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _first_bad(x) -> str:
    """'NaN at index (i, j)' (or 'inf') for the first non-finite entry of a concrete array."""
    arr = np.asarray(x)
    flat = int(np.flatnonzero(~np.isfinite(arr))[0])
    value = arr.ravel()[flat]
    where = np.unravel_index(flat, arr.shape) if arr.ndim else ()
    index = tuple(int(i) for i in where)
    kind = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{kind} at index {index[0] if len(index) == 1 else index}" if index else kind


def check_finite_data(x, name: str) -> None:
    """A ValueError naming `name` if the (concrete) array `x` holds NaN or inf."""
    if not _is_concrete(x) or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
        return
    if bool(jnp.all(jnp.isfinite(x))):
        return
    count = int(jnp.sum(~jnp.isfinite(x)))
    raise ValueError(
        f"`{name}` has {count} non-finite {'entry' if count == 1 else 'entries'} (first: "
        f"{_first_bad(x)}); remove or impute them before building the loss"
    )


def check_finite_model(params, batched: bool) -> None:
    """A ValueError naming the array (and batch member) of the initial model that is not finite.

    Skipped for traced arrays (under `jax.jit` / `jax.vmap` of a solver call)."""
    if _all_finite(jax.tree.leaves(params)):
        return
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, x in leaves:
        if not _is_concrete(x) or bool(jnp.all(jnp.isfinite(x))):
            continue
        member = ""
        if batched and x.ndim:
            bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(x)).reshape(x.shape[0], -1), 1))
            member = f" (batch member {int(bad[0])})"
            x = x[int(bad[0])]
        raise ValueError(
            f"the initial `model`{member} has a non-finite parameter: "
            f"model{jax.tree_util.keystr(path)} holds {_first_bad(x)}; initialise the model "
            f"with finite values (e.g. from flowsim.models or flowsim.init)"
        )


def check_finite_inputs(params, loss, batched: bool) -> None:
    """`check_finite_model` and `check_finite_loss_data` in one compiled reduction when all is
    finite (the common case: ~0.05 ms); the detailed checks name what is not."""
    data = loss if isinstance(loss, eqx.Module) else None  # _all_finite keeps its arrays
    if _all_finite(jax.tree.leaves((params, data))):
        return
    check_finite_model(params, batched)
    check_finite_loss_data(loss)


def check_finite_loss_data(loss) -> None:
    """A ValueError naming the data array of a loss module (its fields, e.g. `loss.X`) that holds
    NaN or inf; losses that are not Equinox modules are not inspected."""
    if not isinstance(loss, eqx.Module):
        return
    arrays = eqx.filter(loss, eqx.is_inexact_array)
    if _all_finite(jax.tree.leaves(arrays)):
        return
    for path, x in jax.tree_util.tree_leaves_with_path(arrays):
        if not _is_concrete(x) or bool(jnp.all(jnp.isfinite(x))):
            continue
        count = int(jnp.sum(~jnp.isfinite(x)))
        raise ValueError(
            f"the loss data `loss{jax.tree_util.keystr(path)}` has {count} non-finite "
            f"{'entry' if count == 1 else 'entries'} (first: {_first_bad(x)}); remove or impute "
            f"them and build the loss again"
        )


def available_memory_bytes() -> int:
    """Host memory available to a new allocation, in bytes.

    `MemAvailable` of /proc/meminfo (Linux: free memory plus reclaimable caches), else the free
    physical pages (`os.sysconf`), else the total physical memory; 2**63 - 1 (no limit) when
    none of them can be read.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            continue
    return 2**63 - 1


def device_memory_bytes(device=None) -> int | None:
    """Free memory of `device` (default: the first device) where it reports it (GPUs:
    `bytes_limit - bytes_in_use`), else None (CPU: the host's memory is the device's)."""
    try:
        stats = (device or jax.devices()[0]).memory_stats()
    except Exception:  # backends without memory statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def format_bytes(n: float) -> str:
    """`n` bytes in B / kB / MB / GB / TB (powers of 1000), three significant digits."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
