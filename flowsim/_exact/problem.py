"""The network seen on a fixed activation pattern: what the exact ReLU flow integrates.

`_Problem` holds a model's static part, its loss and the shapes of its pre-activations. On an
activation pattern (`mask`: one slope per pre-activation entry, 0 or 1 off the kinks, the
Filippov slope on a sliding one) it gives the pre-activations, the vector field -grad L, the
rates z', and, for a per-point loss, the rows of single data points (pre-activations and their
part of the field). With a dense first layer the first layer's pre-activations can be passed
in (`first`), so a pass starts after the first layer. `cond` is the conditional that stays one
under vmap.
"""

import math

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np


class _Patterned(eqx.Module):
    """A model evaluated on a fixed activation pattern (what the losses see)."""

    model: eqx.Module
    pattern: tuple

    def __call__(self, x):
        return self.model.forward(x, self.pattern)[0]


def supports_kinks(model, loss) -> bool:
    """True when `model` is a flowsim model whose activations are all linear on each side of 0
    (they have an activation pattern), some with kinks, and `loss` fits it to data."""
    from ..losses import AbstractDataLoss
    from ..models import AbstractModel, AbstractPiecewiseLinear

    return (
        isinstance(loss, AbstractDataLoss)
        and isinstance(model, AbstractModel)
        and all(isinstance(a, AbstractPiecewiseLinear) for a in model.activations)
        and model.has_kinks
    )


def cond(pred, true_fn, false_fn, *, vmapped=False, rare="true"):
    """`lax.cond(pred, true_fn, false_fn)`, or with `vmapped` a form that stays a conditional
    when the caller is vmapped.

    vmap turns a `lax.cond` on a batched predicate into a select that runs both branches for
    every lane, and the branches here are the expensive parts (a Newton step with its
    Jacobian, the sliding slopes): a vmapped piece took 4x as long (32 ms against 8 ms, 8 lanes).
    With `vmapped`, the `rare` branch ("true" or "false") runs only when some lane takes it
    (`equinox.internal.unvmap_any`), both with a per-lane select then; the other branch is
    traced twice (a larger program to compile), so `rare` names the expensive one."""
    if not vmapped:
        return jax.lax.cond(pred, true_fn, false_fn)

    def mixed():
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(), false_fn())

    if rare == "true":
        return jax.lax.cond(eqxi.unvmap_any(pred), mixed, false_fn)
    return jax.lax.cond(eqxi.unvmap_all(pred), true_fn, mixed)


_LSTSQ_RCOND = 1e-12


# `_inverse` takes the LU inverse X of J when |J X - I| stays below this (entrywise).
_INVERSE_CHECK = 1e-8


def _inverse(J, vmapped=False):
    """J^-1 from an LU factorisation where that is accurate (|J X - I| <= `_INVERSE_CHECK`,
    i.e. J is not near singular), else the pseudo-inverse with rcond `_LSTSQ_RCOND`: the same
    matrix where J is well conditioned, 2-5x cheaper (k = 896 sliding entries: 0.10 s
    against 0.23 s for the SVD, the check included). A singular J (more entries sliding than a
    unit has inputs) takes the pseudo-inverse, whose least-squares slopes give the unique
    vector field."""
    eye = jnp.eye(J.shape[0], dtype=J.dtype)
    inv = jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(J), eye)
    accurate = jnp.all(jnp.isfinite(inv)) & (jnp.max(jnp.abs(J @ inv - eye)) <= _INVERSE_CHECK)
    return cond(accurate, lambda: inv, lambda: jnp.linalg.pinv(J, rtol=_LSTSQ_RCOND),
                vmapped=vmapped, rare="false")


def _lstsq(A, b, vmapped=False):
    """The least-squares solution of A x = b (`_inverse(A) @ b`)."""
    return _inverse(A, vmapped) @ b


class _Problem(eqx.Module):
    """The model's static part, the loss and the shapes of the pre-activations."""

    static: eqx.Module
    loss: eqx.Module
    shapes: tuple = eqx.field(static=True)
    # Traced under vmap: conditionals that stay conditionals there (`cond`).
    vmapped: bool = eqx.field(static=True, default=False)

    def cond(self, pred, true_fn, false_fn, rare="true"):
        return cond(pred, true_fn, false_fn, vmapped=self.vmapped, rare=rare)

    def _inverse(self, J):
        return _inverse(J, self.vmapped)

    def model(self, p):
        return eqx.combine(p, self.static)

    @property
    def dense_first(self) -> bool:
        """The first parameter leaf is a dense first layer W_1 applied to the data's rows."""
        from ..models import MLP, TwoLayerReLU

        return isinstance(self.static, MLP | TwoLayerReLU) and self.loss.X.ndim == 2

    def unflatten(self, v):
        out, i = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(v[i:i + size].reshape(shape))
            i += size
        return tuple(out)

    def first(self, p):
        """The first layer's pre-activations of every data point, X W_1^T (+ W_1's bias
        column), computed as the model does (`dense_first` models). Linear in p: applied to a
        vector field it gives their rate of change."""
        return self._first_of(jax.tree.leaves(p)[0])

    def _first_of(self, W1):
        X = self.loss.X
        if W1.shape[-1] == X.shape[-1] + 1:
            return X @ W1[:, :-1].T + W1[:, -1]
        return X @ W1.T

    def _after_first(self, p, z1):
        """p with W_1 an identity (and a zero bias column) and the loss on inputs z1: the same
        network and loss when z1 are the first layer's pre-activations (`first`)."""
        leaves, treedef = jax.tree.flatten(p)
        h1 = leaves[0].shape[0]
        bias = leaves[0].shape[-1] == self.loss.X.shape[-1] + 1
        eye = jnp.eye(h1, h1 + bias, dtype=z1.dtype)
        return (jax.tree.unflatten(treedef, [eye] + leaves[1:]),
                eqx.tree_at(lambda l: l.X, self.loss, z1))

    def pre(self, p, mask, z1=None):
        """All pre-activations on the pattern `mask`, flat; with `z1` (the first layer's, from
        `first`) only the layers after the first are evaluated."""
        if z1 is None:
            _, zs = self.model(p).forward(self.loss.X, self.unflatten(mask))
        else:
            q, _ = self._after_first(p, z1)
            _, zs = self.model(q).forward(z1, self.unflatten(mask))
        return jnp.concatenate([z.ravel() for z in zs])

    def field(self, p, mask, z1=None):
        """-grad L on the pattern `mask`. With `z1` (the first layer's pre-activations, from
        `first`) the forward pass starts there: the gradient of W_1 is then G^T X with G the
        loss's gradient in z1, one product with the data where the full pass takes two."""
        pattern = self.unflatten(mask)
        if z1 is None:
            g = eqx.filter_grad(lambda q: self.loss(_Patterned(self.model(q), pattern)))(p)
            return jax.tree.map(jnp.negative, g)

        def loss_after_first(q, z):
            q, loss = self._after_first(q, z)
            return loss(_Patterned(self.model(q), pattern))

        g, G = jax.grad(loss_after_first, argnums=(0, 1))(p, z1)
        leaves, treedef = jax.tree.flatten(g)
        g1 = jax.vjp(self._first_of, jax.tree.leaves(p)[0])[1](G)[0]
        return jax.tree.map(jnp.negative, jax.tree.unflatten(treedef, [g1] + leaves[1:]))

    def zdot(self, p, mask):
        """z'(theta) along the patterned vector field, for every entry."""
        return jax.jvp(lambda q: self.pre(q, mask), (p,), (self.field(p, mask),))[1]

    def row_mask(self, mask, pts):
        """The slopes of data points `pts` as rows laid out like `rows`' (points, width)."""
        return jnp.concatenate([z[pts].reshape(pts.shape[0], -1)
                                for z in self.unflatten(mask)], axis=1)

    def _row_pattern(self, rowmask):
        out, c = [], 0
        for shape in self.shapes:
            width = math.prod(shape[1:])
            out.append(rowmask[:, c:c + width].reshape((rowmask.shape[0],) + shape[1:]))
            c += width
        return tuple(out)

    def rows(self, p, mask, pts):
        """The pre-activations of data points `pts` on the pattern `mask`, one row per point."""
        return self.rows_at(p, self.row_mask(mask, pts), pts)

    def rows_at(self, p, rowmask, pts, x=None):
        """`rows` with the points' slopes given as rows (`row_mask`); `x`: inputs to use in
        place of the points' rows of the data."""
        x = self.loss.X[pts] if x is None else x
        _, zs = self.model(p).forward(x, self._row_pattern(rowmask))
        return jnp.concatenate([z.reshape(z.shape[0], -1) for z in zs], axis=1)

    def rows_field(self, p, rowmask, pts, weights, x=None):
        """-grad of sum_i weights_i loss_{pts_i} on the points' slopes `rowmask`: the field's
        part from points `pts` (`x`: inputs in place of their rows of the data).

        The loss is the mean of per-point terms (`per_point`), so loss_n is the loss on the
        single row n (scaled by 1 / n_points by the caller's weights).
        """
        n = self.loss.X.shape[0]
        x = self.loss.X[pts] if x is None else x

        def point_loss(q, i, row, x_i):
            loss = jax.tree.map(lambda a: a[i][None] if jnp.ndim(a) and a.shape[0] == n else a,
                                self.loss)
            loss = eqx.tree_at(lambda l: l.X, loss, x_i[None])
            return loss(_Patterned(self.model(q), self._row_pattern(row[None])))

        total = lambda q: jnp.sum(weights * jax.vmap(  # noqa: E731
            lambda i, row, x_i: point_loss(q, i, row, x_i))(pts, rowmask, x))
        return jax.tree.map(jnp.negative, eqx.filter_grad(total)(p))


def _per_point(loss) -> bool:
    """The loss is the mean of per-point terms (`AbstractDataLoss.per_point`)."""
    from ..losses import AbstractDataLoss

    return isinstance(loss, AbstractDataLoss) and loss.per_point


def _locate(idx, shapes):
    """Data points and columns in the points' rows of pre-activations (`_Problem.rows`) of the
    flat entries `idx` of the concatenated pre-activations with per-layer `shapes`."""
    sizes = np.array([math.prod(s) for s in shapes])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    widths = np.array([math.prod(s[1:]) for s in shapes])  # entries per point, per layer
    cols = np.concatenate([[0], np.cumsum(widths)[:-1]])
    layer = np.searchsorted(starts, idx, side="right") - 1
    point, unit = np.divmod(idx - starts[layer], widths[layer])
    return point, cols[layer] + unit
