"""Curvature of the loss from Hessian-vector products (no Hessian is ever formed)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


def hvp_fn(loss, static):
    """v -> H(p) v for the loss as a function of the model's arrays `p` (forward-over-reverse)."""

    def grad(p):
        return eqx.filter_grad(lambda q: loss(eqx.combine(q, static)))(p)

    def hvp(p, v):
        return jax.jvp(grad, (p,), (v,))[1]

    return grad, hvp


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _normalise(v):
    n = jnp.sqrt(_dot(v, v))
    return jax.tree.map(lambda x: x / n, v)


def _power(hvp, p, v, shift, iters: int, rtol):
    """`iters` power iterations on H - shift I, or fewer: it stops once two successive
    Rayleigh quotients agree to `rtol` (never with rtol = 0)."""

    def cond(state):
        k, _, lam, prev = state
        settled = (k >= 2) & (jnp.abs(lam - prev) <= rtol * jnp.abs(lam))
        return (k < iters) & ~settled

    def body(state):
        k, v, lam, _ = state
        hv = jax.tree.map(lambda a, b: a - shift * b, hvp(p, v), v)
        return k + 1, _normalise(hv), _dot(v, hv), lam

    zero = jnp.zeros((), jax.tree.leaves(p)[0].dtype)
    state = (jnp.asarray(0), _normalise(v), zero, zero)
    _, _, lam, _ = jax.lax.while_loop(cond, body, state)
    return lam + shift


@eqx.filter_jit
def _sharpness(params, static, loss, key, iters: int, rtol=0.0):
    # One compiled function per (model structure, loss type, iters): the loss's arrays are
    # traced, so new data or a new initialisation reuses it. The start vector is drawn inside:
    # one dispatch for the whole estimate.
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(key, len(leaves))
    v = jax.tree.unflatten(treedef, [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    _, hvp = hvp_fn(loss, static)
    lam = _power(hvp, params, v, jnp.zeros((), lam_dtype(params)), iters, rtol)
    lam_pos = jax.lax.cond(lam < 0, lambda: _power(hvp, params, v, lam, iters, rtol),
                           lambda: lam)
    return jnp.maximum(lam_pos, 0.0)


def lam_dtype(params):
    return jax.tree.leaves(params)[0].dtype


def sharpness(
    model, loss, *, iters: int = 50, key: PRNGKeyArray | None = None, rtol: float = 0.0
) -> Float[Array, ""]:
    """Estimate of lambda_max(Hessian of `loss` at `model`), the largest positive eigenvalue.

    Power iteration with Hessian-vector products. When the eigenvalue of largest magnitude is
    negative (a saddle), a second run on H - lambda_neg I finds the largest positive one. The
    estimate is a lower bound that tightens with `iters`; it is what `gradient_flow(solver="auto")`
    compares with the horizon. With `rtol > 0` the iteration stops early, once two successive
    estimates agree to `rtol` (relative).

    **Example:**

    ```python
    import jax.numpy as jnp, jax.random as jr, flowsim
    mf = flowsim.models.MatrixFactorization.random(4, 4, 2, scale=1.0, key=jr.key(0))
    lam = flowsim.sharpness(mf, flowsim.losses.factorization(jnp.eye(4)))
    ```
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    key = _DEFAULT_KEY if key is None else key
    return _sharpness(params, static, loss, key, iters, rtol)


_DEFAULT_KEY = np.zeros(2, np.uint32)
"""The key data of `jax.random.key(0)` (threefry), as NumPy: no dispatch per call."""
