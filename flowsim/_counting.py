"""Counting the gradients and Hessian-vector products a solve evaluates (`count_evals=True`).

The vector field gets a custom JVP whose callbacks add to a host-side count. The counts are
keyed by a per-solve token passed into the compiled solve as an argument: callbacks are static
parts of a compiled program, so a counter object of its own per solve would recompile it.
"""

import itertools
import threading

import jax
import numpy as np

# Evaluation counts of the solves run with `count_evals=True`: token -> {kind: per-member counts}.
_COUNTS: dict[int, dict[str, np.ndarray]] = {}
_COUNTS_LOCK = threading.Lock()
_TOKENS = itertools.count()


def _tick(kind: str, token, member, probe):
    """A zero that, when computed, adds one `kind` evaluation per lane to member's host count.

    `probe` is a scalar of the evaluated point (or tangent): it ties the callback to each
    evaluation, also inside `jax.linearize`d and `jax.jacfwd`ed (vmapped) Hessian products,
    where every lane of the vmap is one evaluation.
    """

    def count(token, member, probe):
        member, probe = np.broadcast_arrays(member, probe)
        with _COUNTS_LOCK:
            counts = _COUNTS[int(np.ravel(token)[0])][kind]
            np.add.at(counts, member.ravel(), 1)
        return np.zeros(probe.shape, probe.dtype)

    return jax.pure_callback(
        count, jax.ShapeDtypeStruct((), probe.dtype), token, member, probe,
        vmap_method="expand_dims",
    )


def _probe(tree):
    # One entry of every leaf: batched (one count per lane) when any leaf's tangent is, as in
    # a Jacobian built leaf by leaf (Rodas5P), where the other leaves' tangents are zeros.
    return sum(x.ravel()[0] for x in jax.tree.leaves(tree))


def counting_field(grad, token, member):
    """-grad L with a custom JVP (-H v) that counts each gradient and each Hessian-vector product.

    The values are unchanged (each gets + 0.0 from the counting callback); diffrax's implicit
    solvers only ever differentiate the vector field forward (Newton: JVPs; dense Jacobians:
    vmapped JVPs), which is what the JVP rule sees.
    """

    @jax.custom_jvp
    def field(p, token, member):
        zero = _tick("grad", token, member, _probe(p))
        return jax.tree.map(lambda g: -(g + zero), grad(p))

    @field.defjvp
    def field_jvp(primals, tangents):
        p, token, member = primals
        g, hv = jax.jvp(grad, (p,), (tangents[0],))
        # The gradient once per linearisation, the product once per tangent (per application).
        g_zero = _tick("grad", token, member, _probe(p))
        # The probe holds the point too: a Jacobian's tangents are constant basis vectors, and
        # a callback on constants alone would be hoisted out of the solver's loop (run once).
        hv_zero = _tick("hvp", token, member, _probe(tangents[0]) + _probe(p))
        return (jax.tree.map(lambda a: -(a + g_zero), g),
                jax.tree.map(lambda h: -(h + hv_zero), hv))

    return lambda p: field(p, token, member)


def open_counts(lanes: int) -> int:
    """A new token whose counts (one per vmap lane) start at zero."""
    token = next(_TOKENS)
    with _COUNTS_LOCK:
        _COUNTS[token] = {"grad": np.zeros(lanes, np.int64), "hvp": np.zeros(lanes, np.int64)}
    return token


def close_counts(token: int) -> dict[str, np.ndarray]:
    """The counts of `token` ({"grad": ..., "hvp": ...}), forgotten from here on."""
    with _COUNTS_LOCK:
        return _COUNTS.pop(token)
