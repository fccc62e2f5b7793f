"""Exact gradient flow through ReLU kinks: piecewise-smooth integration, events, sliding.

On a fixed activation pattern the gradient flow of a (leaky-)ReLU network is a polynomial ODE.
`kink_flow` integrates one such piece at a time with diffrax, stops at the first pre-activation
that reaches zero (a `diffrax.Event` on min_j s_j z_j(theta), located by a bracketing
regula falsi, `Illinois`, on the step's dense output), decides what happens there, and restarts:

- **crossing**: the other side's vector field carries z_j on through zero: flip the entry.
- **sliding** (Filippov): both sides push into the surface z_j = 0. The solution then moves
  along the surface with the convex combination of the two sides that keeps z_j' = 0. Because
  the loss is affine in the slope of an entry at z_j = 0, that combination is the vector field
  with the entry's slope sigma'(0) = lambda in [0, 1] (the Clarke subgradient element that
  keeps the trajectory on the surface). lambda is solved for at every evaluation; several
  surfaces can slide at once (the field is multilinear in the slopes of entries of one data
  point in different layers): Newton's method at the start of a piece, then chord iterations
  with that Jacobian, one residual each, for the evaluations over the piece.
- **release**: a sliding entry leaves when its lambda reaches 0 or 1 (a second event
  condition).

Any slope choice satisfies sigma'(z) z = sigma(z), so the Du–Hu–Lee invariants are conserved
through crossings and sliding, to the tolerance of the smooth pieces.

The cost per step is one forward pass over all surfaces for the event function on top of the
gradient; each event costs a restart of the solver (from the last piece's step size), about ten
forward passes to locate it and one gradient per side of each entry that reached its surface.
So the kink treatment costs in proportion to the crossings met, not to the number of surfaces.
For a dense first layer of at least 512 inputs and a per-point loss with an explicit solver, a
piece carries the first layer's pre-activations X W_1^T in its state (`_WithFirst`): they move
linearly with W_1, so their stages are X dW_1^T, the event function's forward passes start
after the first layer, and a gradient takes one product with the data where the full pass
takes two (10 % less time per event on the Fig 2 network at t = 6, the same events and event
times).
"""

import dataclasses
import hashlib
import json
import math
import os
import time

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import tqdm


class _Patterned(eqx.Module):
    """A model evaluated on a fixed activation pattern (what the losses see)."""

    model: eqx.Module
    pattern: tuple

    def __call__(self, x):
        return self.model.forward(x, self.pattern)[0]


def supports_kinks(model, loss) -> bool:
    """True when `model` is piecewise linear with kinks and `loss` exposes its inputs `X`."""
    acts = getattr(model, "activations", ())
    return (
        hasattr(loss, "X")
        and getattr(model, "is_piecewise_linear", False)
        and any(a in ("relu", "leaky_relu") for a in acts)
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
        from .models import MLP, TwoLayerReLU

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

    def sliding(self, p, mask, sl, jacobian=False, z1=None):
        """The sliding entries' slopes chosen so that z_idx' = 0, and the vector field there.

        Returns `(mask with the slopes, slopes, field)`. z_idx' is affine in each slope but
        multilinear in all of them when sliding entries of the same data point sit in different
        layers (the slope of layer l scales what layer l + 1 sees). The slopes are found by
        chord iterations (steps by a fixed pseudo-inverse of the Jacobian, one residual each)
        until the error estimated from their rate of convergence is below `_SLOPE_TOL`;
        Newton's method (a Jacobian per step) takes over if a chord step fails to halve the
        last, or after `_CHORD_STEPS`, for at most `_SLOPE_NEWTON_MAX` iterations in all.
        With a guess in `sl` (`sl.lam`, `sl.pinv`: the slopes and the Jacobian's
        pseudo-inverse at the start of the piece, from `slope_guess`) they start there;
        without, from the slopes `sl.lam` (0 where absent: at entries that just joined, or all
        without) with the Jacobian there: the first step is Newton's, exact when the system is
        affine (the next confirms it), a coupled pair takes a few more. The Jacobian
        (`slope_system`) costs k residuals by forward-mode autodiff, or for a per-point loss k
        rows and a k x k product over the parameters (`_sliding_jacobian`).

        The slopes only change the loss terms of the sliding entries' data points, so for a
        per-point loss (`flowsim.losses.square` / `logistic`) the field at slopes lambda is
        F(0) - F_P(0) + F_P(lambda) with F_P the part from those points, and z_idx' needs only
        their rows: one full gradient per call, whatever the number of points. Other losses
        take the full field at every Newton iteration.
        """
        idx, valid = sl.idx, sl.valid
        k = idx.shape[0]
        # The row-wise Jacobian where it is needed at every piece start, and for Newton's rare
        # fallbacks inside the vector field when many entries slide; forward mode (k residuals,
        # cheaper to compile) for those with few (`_ROWWISE_MIN`).
        rowwise = jacobian or k >= _ROWWISE_MIN
        with_slopes, field_at, residual, jac = self.slope_system(p, mask, sl, rowwise=rowwise,
                                                                 z1=z1)
        both = valid[:, None] & valid[None, :]
        eye = jnp.eye(k, dtype=mask.dtype)

        def masked(J):
            # Least squares: when more surfaces slide than a unit has inputs (a unit collapsing
            # onto the origin) the slopes are not unique, the vector field still is.
            return jnp.where(both, J, eye)

        def newton_step(lam):
            J = masked(jac(lam))
            return _lstsq(J, residual(lam), self.vmapped), J

        zeros = jnp.zeros(k, mask.dtype)
        if sl.pinv is None:
            # No guess: the Jacobian at the start (the slopes in `sl` where it has them, those
            # that slid on the last piece, 0 for entries that just joined; else 0) serves the
            # chord iterations; its first step is Newton's. Where z_idx' is affine in the
            # slopes (sliding entries of distinct points, or of one layer) the Jacobian does
            # not depend on them: one Jacobian in all, where Newton took a second to confirm.
            start = zeros if sl.lam is None else jnp.where(valid, sl.lam, 0.0)
            J_start = masked(jac(start))
            pinv = self._inverse(J_start)
        else:
            start, pinv = jnp.where(valid, sl.lam, 0.0), sl.pinv
        # Where Newton restarts if a chord step fails: the start without a guess, else 0 (the
        # last piece's slopes, whose chord iterations failed, are no better).
        restart = start if sl.pinv is None else zeros

        # Chord iterations with the Jacobian's pseudo-inverse: one residual (no Jacobian) per
        # iteration, converging fast while the Jacobian stays near the one taken (theta near
        # the piece's start). Newton's method takes over after _CHORD_STEPS of them, or from
        # `restart` as soon as a chord step fails to halve the previous one (slopes coupled
        # across layers, far from the start).
        def chord(lam, size, i, J):
            step = pinv @ residual(lam)
            new = jnp.max(jnp.abs(step))
            failed = (i > 0) & (new > 0.5 * size)
            # The chord converges linearly: from the rate r of the last two steps the slopes
            # are within new * r / (1 - r) of the limit (Hairer & Wanner, Solving ODEs II,
            # IV.8), so the step that would only confirm it is skipped.
            rate = new / size
            err = jnp.where(i > 0, new * rate / (1 - rate), new)
            return (jnp.where(failed, restart, lam - step), jnp.where(failed, jnp.inf, new),
                    jnp.where(failed, jnp.inf, err), failed | (i + 1 >= _CHORD_STEPS), J)

        def newton_(lam, size, i, J):
            step, J = newton_step(lam)
            new = jnp.max(jnp.abs(step))
            return lam - step, new, new, jnp.asarray(True), J

        def iterate(carry):
            lam, size, _, i, use_newton, J = carry
            lam, size, err, use_newton, J = self.cond(
                use_newton, lambda: newton_(lam, size, i, J), lambda: chord(lam, size, i, J))
            return lam, size, err, i + 1, use_newton, J

        def keep_going(carry):
            _, _, err, i, _, _ = carry
            return (err > _SLOPE_TOL) & (i < _SLOPE_NEWTON_MAX)

        inf = jnp.asarray(jnp.inf, mask.dtype)
        carry = (start, inf, inf, jnp.asarray(0), jnp.asarray(False), eye)
        lam, _, _, _, newton_ran, J = jax.lax.while_loop(keep_going, iterate, carry)
        lam = jnp.where(valid, lam, 0.0)
        if jacobian:
            # The pseudo-inverse for the chord iterations over the piece: Newton's last
            # Jacobian (taken one step before the slopes, a step below _SLOPE_TOL once
            # converged), else the one taken at the start here, else (chord iterations from
            # the last piece's guess, theta has moved) a fresh one.
            if sl.pinv is None:
                return lam, self.cond(newton_ran, lambda: self._inverse(J), lambda: pinv)
            J = self.cond(newton_ran, lambda: J, lambda: masked(jac(lam)), rare="false")
            return lam, self._inverse(J)
        return with_slopes(lam), lam, field_at(lam)

    def slope_system(self, p, mask, sl, rowwise=True, z1=None):
        """The sliding slopes' equations at p: `(with_slopes, field_at, residual, jac)`, each a
        function of the slopes lambda (padded like `sl`): the mask with them, the vector field
        there, z_idx' there (zero on padding) and its Jacobian: for a per-point loss with
        `rowwise`, from one row per entry (`_sliding_jacobian`), else by forward mode. `z1`:
        the first layer's pre-activations at p, for the full gradient (`field`)."""
        idx, valid = sl.idx, sl.valid
        k = idx.shape[0]

        def with_slopes(lam):
            # Padding points past the end and is dropped: padding at a real entry's index (0)
            # would race its slope in the scatter.
            return mask.at[jnp.where(valid, idx, mask.shape[0])].set(lam, mode="drop")

        if sl.pts is None:
            def field_at(lam):
                return self.field(p, with_slopes(lam), z1)

            def residual(lam):
                m = with_slopes(lam)
                return jnp.where(valid, self.zdot(p, m)[idx], 0.0)

            def jac(lam):
                return jax.jacfwd(residual)(lam)
        else:
            pts, slot, sub = sl.pts, sl.slot, sl.sub
            weights = sl.pts_valid / self.loss.X.shape[0]
            base = self.row_mask(mask, pts)
            # Padding's slot points past the end and is dropped (see with_slopes).
            slot_or_drop = jnp.where(valid, slot, k)

            def rows_with(lam):
                return base.at[slot_or_drop, sub].set(lam, mode="drop")

            no_slopes = jnp.zeros(k, mask.dtype)
            rest = jax.tree.map(jnp.subtract, self.field(p, with_slopes(no_slopes), z1),
                                self.rows_field(p, rows_with(no_slopes), pts, weights))

            def field_at(lam):
                return jax.tree.map(jnp.add, rest, self.rows_field(p, rows_with(lam), pts, weights))

            def residual(lam):
                rm = rows_with(lam)
                zd = jax.jvp(lambda q: self.rows_at(q, rm, pts), (p,), (field_at(lam),))[1]
                return jnp.where(valid, zd[slot, sub], 0.0)

            def jac(lam):
                if not rowwise:
                    return jax.jacfwd(residual)(lam)
                return self._sliding_jacobian(p, base, sl, weights, lam, field_at(lam))
        return with_slopes, field_at, residual, jac

    def _sliding_jacobian(self, p, base, sl, weights, lam, field):
        """d z_idx' / d lambda for a per-point loss, from one row per sliding entry.

        z_a' = grad z_a . F(lambda). The slope of entry b changes the field only through its
        own point's term (B_b = dF / d lambda_b), and grad z_a only through the slopes of a's
        own point, so J = A B^T + D: A_a = grad z_a and B_b each from one row (k rows in
        all, where forward-mode through the residual takes k rows per entry), then a k x k
        product over the parameters, and D_ab (a, b of one point) from a's row with F fixed.
        """
        valid, pts, slot, sub = sl.valid, sl.pts, sl.slot, sl.sub
        k, width = sub.shape[0], base.shape[1]

        def row_of(s, lam_):
            # Point s's row of slopes with its own sliding entries' lambda.
            cols = jnp.where(valid & (slot == s), sub, width)
            return base[s].at[cols].set(lam_, mode="drop")

        def grad_z(s, c, q, x):
            row = row_of(s, lam)
            return eqx.filter_grad(
                lambda q_: self.rows_at(q_, row[None], pts[s][None], x[None])[0, c])(q)

        def d_field(s, c, w, lam_c, q, x):
            row = row_of(s, lam)

            def part(x_):
                return self.rows_field(q, row.at[c].set(x_)[None], pts[s][None], w[None],
                                       x[None])
            return jax.jvp(part, (lam_c,), (jnp.ones_like(lam_c),))[1]

        def d_own_row(s, c):
            def zdot(lam_):
                row = row_of(s, lam_)
                return jax.jvp(lambda q: self.rows_at(q, row[None], pts[s][None]),
                               (p,), (field,))[1][0, c]
            return jax.grad(zdot)(lam)

        X = self.loss.X[pts[slot]]
        if self.dense_first:
            # The first layer sees only the data: a row of point n depends on W_1 only through
            # W_1 x_n (x_n with a 1 appended if W_1 holds a bias column), so A_a and B_b
            # restricted to W_1 are outer products u (x) x_n and <A_a, B_b> there is
            # (u_a . v_b)(x_a . x_b): O(k^2 (h_1 + d)) flops where the dense product takes
            # O(k^2 h_1 d), the bulk of k^2 P when the input is wide (90 % of the Fig 2
            # network's parameters). u and v come straight from each entry's point as a
            # network with a one-dimensional input 1 and first layer W_1 x_n (a column; its
            # bias column 0): the h_1 x d outer products are never formed.
            leaves, treedef = jax.tree.flatten(p)
            bias = leaves[0].shape[-1] == X.shape[-1] + 1
            if bias:
                X = jnp.concatenate([X, jnp.ones_like(X[:, :1])], axis=1)
            first = X @ leaves[0].T  # (k, h_1)
            cols = [first[:, :, None]] + ([jnp.zeros_like(first[:, :, None])] if bias else [])
            Q = jax.tree.unflatten(treedef, [jnp.concatenate(cols, axis=2)] + leaves[1:])
            q_axes = jax.tree.unflatten(treedef, [0] + [None] * (len(leaves) - 1))
            inputs = jnp.ones((k, 1), X.dtype)
        else:
            Q, q_axes, inputs = p, None, X
        A = jax.tree.leaves(jax.vmap(grad_z, in_axes=(0, 0, q_axes, 0))(slot, sub, Q, inputs))
        B = jax.tree.leaves(jax.vmap(d_field, in_axes=(0, 0, 0, 0, q_axes, 0))(
            slot, sub, weights[slot], lam, Q, inputs))
        cross = 0.0
        if self.dense_first:
            cross = (A[0][..., 0] @ B[0][..., 0].T) * (X @ X.T)
            A, B = A[1:], B[1:]
        cross = cross + sum(a.reshape(k, -1) @ b.reshape(k, -1).T for a, b in zip(A, B))
        return cross + jax.vmap(d_own_row)(slot, sub)

    def slope_guess(self, p, mask, sl):
        """`sl` with the slopes at p and the pseudo-inverse of their Jacobian there, the start
        of the chord iterations of `sliding` over a piece. The slopes come from `sliding`: chord
        iterations from the guess in `sl` if it has one (the last piece's), else Newton from
        `sl.lam` (the slopes known before the sliding set changed) or from 0; the Jacobian is
        Newton's last, or a fresh one after chord iterations.
        """
        lam, pinv = self.sliding(p, mask, sl, jacobian=True)
        return dataclasses.replace(sl, lam=lam, pinv=pinv)


class _Sliding(eqx.Module):
    """The sliding entries (padded to `_bucket` entries; `valid` marks the real ones) and, for a
    per-point loss, their data points: `pts` (padded, `pts_valid`), and for each entry its
    point's slot in `pts` and its column in that point's row of pre-activations (`sub`).
    `lam` and `pinv`: the guess for the slopes' chord iterations (`_Problem.slope_guess`)."""

    idx: jax.Array
    valid: jax.Array
    pts: jax.Array | None = None
    pts_valid: jax.Array | None = None
    slot: jax.Array | None = None
    sub: jax.Array | None = None
    lam: jax.Array | None = None
    pinv: jax.Array | None = None



def _per_point(loss) -> bool:
    from .losses import _Logistic, _Square

    return isinstance(loss, _Square | _Logistic)


# A sliding entry is released when its slope is within this of 0 or 1.
_RELEASE_TOL = 1e-10
# Newton on the sliding slopes stops when they move by less than this, the chord iterations when
# their estimated error is (the slopes live in [0, 1]).
_SLOPE_TOL = 1e-13
_SLOPE_NEWTON_MAX = 20
# Chord iterations before Newton takes over (they converge at the rate theta moves away from
# the piece's start: a few per solve).
_CHORD_STEPS = 8
# From this many sliding entries (padded) on, Newton's fallbacks inside the vector field take
# the row-wise Jacobian too: forward mode costs k residuals, 26x the row-wise Jacobian's time
# on the Fig 2 network at k = 128 (0.47 s against 0.018 s), a gap that grows with k.
_ROWWISE_MIN = 16
# The first piece's first step (relative to the horizon; the controller grows it tenfold a
# step), and each later piece's: this times the previous piece's length per accepted step.
_FIRST_STEP = 1e-6
_FIRST_STEP_GROWTH = 10.0


class _IllinoisState(eqx.Module):
    lower: jax.Array
    upper: jax.Array
    f_lower: jax.Array
    f_upper: jax.Array
    last_side: jax.Array  # +1: the last step moved `lower`, -1: `upper`, 0: neither yet
    slow: jax.Array  # consecutive steps without progress (bracket halved, or |f| cut 1000x)


class Illinois(optx.AbstractRootFinder):
    """Bracketing root finder for a scalar function that goes down through zero on
    [lower, upper] (f(lower) > 0 >= f(upper), as an event function does between the two ends
    of the step where it changed sign): regula falsi with the Illinois modification, which
    halves the stale end's value when the same end moves twice, plus a bisection step whenever
    two steps in a row neither halved the bracket nor cut the moved end's |f| a thousandfold.

    On a smooth root it converges superlinearly (order ~1.44): ~10 evaluations to 1e-15 where
    bisection takes ~50, and each evaluation of the kink event function is a forward pass over
    every data point. The bracket is kept, so a min over many entries (kinks in t) or a
    tangential touch at rounding level still converges (as bisection, at worst). Stops when the
    bracket is narrower than `atol + rtol |t|` or the function is exactly 0, and returns the
    bracket's upper end: at the returned time the function is <= 0 (the event has happened).
    """

    rtol: float
    atol: float
    norm = staticmethod(jnp.abs)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del y, f_struct, aux_struct, tags
        lower, upper = options["lower"], options["upper"]
        dtype = jnp.result_type(lower, upper, float)
        lower, upper = jnp.asarray(lower, dtype), jnp.asarray(upper, dtype)
        f_lower = _total(fn(lower, args)[0])
        f_upper = _total(fn(upper, args)[0])
        # Rounding can leave the detected sign change unbracketed: treat the ends as +0 / -0.
        f_lower = jnp.maximum(f_lower, jnp.finfo(dtype).tiny)
        f_upper = jnp.minimum(f_upper, 0.0)
        return _IllinoisState(lower, upper, f_lower, f_upper, jnp.asarray(0), jnp.asarray(0))

    def _next(self, state):
        lo, up, fl, fu = state.lower, state.upper, state.f_lower, state.f_upper
        secant = up - fu * (up - lo) / (fu - fl)
        # At least `tol` from either end: once one end sits on the root (to rounding), the
        # next point lands just across it and closes the bracket.
        margin = jnp.minimum(self.atol + self.rtol * jnp.abs(up), 0.5 * (up - lo))
        secant = jnp.clip(jnp.where(jnp.isfinite(secant), secant, lo), lo + margin, up - margin)
        point = jnp.where(state.slow < 2, secant, lo + 0.5 * (up - lo))
        done = self._converged(state)
        return jnp.where(done, up, point)

    def _converged(self, state):
        width = state.upper - state.lower
        return (width <= self.atol + self.rtol * jnp.abs(state.upper)) | (state.f_upper == 0)

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        first = state.last_side == 0
        # The first call evaluates the first interior point (y is diffrax's initial guess).
        y = jnp.where(first, self._next(state), y)
        f, aux = fn(y, args)
        f = _total(f)
        above = f > 0  # the root lies above y
        same = jnp.where(above, state.last_side == 1, state.last_side == -1)
        lower = jnp.where(above, y, state.lower)
        upper = jnp.where(above, state.upper, y)
        f_lower = jnp.where(above, f, jnp.where(same, 0.5 * state.f_lower, state.f_lower))
        f_upper = jnp.where(above, jnp.where(same, 0.5 * state.f_upper, state.f_upper), f)
        # Progress: the bracket halved, or the moved end's |f| fell a thousandfold (secant
        # points closing in on the root from one side, superlinearly: the next lands across).
        progress = ((upper - lower) <= 0.5 * (state.upper - state.lower)) | jnp.where(
            above, f <= 1e-3 * state.f_lower, -f <= -1e-3 * state.f_upper)
        new = _IllinoisState(lower, upper, f_lower, f_upper, jnp.where(above, 1, -1),
                             jnp.where(progress, 0, state.slow + 1))
        return self._next(new), new, aux

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        return (state.last_side != 0) & self._converged(state), optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}


def _total(f):
    """The value of the triggered condition: diffrax passes one value per condition of an
    event, zero for those that did not trigger."""
    return sum(jax.tree.leaves(f))


# Event times to ~ 4 ulp of t: well below the smooth pieces' tolerance.
# Pieces carry the first layer's pre-activations in their state where they can (`_WithFirst`)
# and the inputs are at least this wide. The products with the data that it saves must
# outweigh a larger state and a graph that takes longer to compile. On the Fig 2 problem
# (`scripts/kinks_fig2.py --steps carry`): at 1,000 inputs 10 % less time per event, which
# repays the extra compilation (7 s) after ~200 events. For 150 events that included new
# sliding-set sizes (hence compilations) it took 1.16x, 1.66x and 1.65x as long at 100, 300
# and 30 inputs.
_FIRST_STATE = True
_FIRST_STATE_MIN_INPUTS = 512
_ROOT_FINDER = Illinois(rtol=1e-15, atol=1e-15)


class _WithFirst(eqx.Module):
    """The state of a piece with the first layer's pre-activations carried along (`first`):
    they move linearly with W_1, so the solver's stages and dense output give them exactly (to
    rounding) from their rates X dW_1^T, and the event function reads them off the state
    instead of a product with the data per evaluation."""

    p: eqx.Module
    z1: jax.Array


class _ParamsNorm(eqx.Module):
    """A step-size controller's norm on the parameters of a `_WithFirst` state: the steps are
    those of the solve without the carried pre-activations."""

    norm: object = eqx.field(static=True)

    def __call__(self, y):
        return self.norm(y.p)


def _split(y):
    return (y.p, y.z1) if isinstance(y, _WithFirst) else (y, None)


def _vector_field(t, y, args):
    del t
    problem, mask, sl, _, _ = args
    p, z1 = _split(y)
    if sl.idx.shape[0]:
        field = problem.sliding(p, mask, sl, z1=z1)[2]
    else:
        field = problem.field(p, mask, z1)
    return field if z1 is None else _WithFirst(field, problem.first(field))


def _event_value(t, y, args, **kwargs):
    value = _crossing_value(t, y, args)
    if args[2].idx.shape[0]:
        value = jnp.minimum(value, _release_value(t, y, args))
    return value


def _crossing_value(t, y, args, **kwargs):
    """min_j s_j z_j + offset_j over entries off their surfaces: goes down through 0 at a hit.
    (`_kink_flow` passes s and offset scaled by `_event_weights`, so each term is 1 at the
    piece's start.)"""
    del t, kwargs
    problem, mask, _, sign, offset = args
    p, z1 = _split(y)
    z = problem.pre(p, mask, z1)
    return jnp.min(jnp.where(sign == 0, jnp.inf, sign * z + offset))


def _release_value(t, y, args, **kwargs):
    """min over sliding entries of min(lambda, 1 - lambda): goes down through 0 at a release."""
    del t, kwargs
    problem, mask, sl, _, _ = args
    p, z1 = _split(y)
    _, lam, _ = problem.sliding(p, mask, sl, z1=z1)
    return jnp.min(jnp.where(sl.valid, jnp.minimum(lam, 1 - lam), jnp.inf))


def _carries_first(problem, solver, controller) -> bool:
    """Whether a piece carries the first layer's pre-activations in its state (`_WithFirst`):
    for a dense first layer, a per-point loss (whose inputs can be swapped for them), an
    explicit Runge-Kutta solver (an implicit one would solve for them too) and a controller
    whose norm can be restricted to the parameters, when the inputs are wide enough for it to
    pay (`_FIRST_STATE_MIN_INPUTS`)."""
    return (_FIRST_STATE and problem.dense_first and _per_point(problem.loss)
            and problem.loss.X.shape[-1] >= _FIRST_STATE_MIN_INPUTS
            and isinstance(solver, dfx.AbstractERK)
            and isinstance(controller, dfx.PIDController | dfx.ConstantStepSize))


@eqx.filter_jit
def _piece(problem, p, t0, t1, dt0, ts, mask, sl, sign, offset, solver, controller, max_steps,
           combined=False, carry_first=False):
    args = (problem, mask, sl, sign, offset)
    y0 = p
    if carry_first:  # `_carries_first`
        y0 = _WithFirst(p, problem.first(p))
        if isinstance(controller, dfx.PIDController):
            controller = eqx.tree_at(lambda c: c.norm, controller, _ParamsNorm(controller.norm))
    # Both conditions start positive, because sliding entries with a slope already at 0 or 1
    # are released before a piece starts. As two conditions diffrax locates only the first
    # that triggered in the step (crossings: forward passes; releases: a slope solve each);
    # when both did and the release came first, the caller re-runs the piece with
    # `combined=True`: the minimum of the two, located as one.
    if sl.idx.shape[0] and not combined:
        cond = (_crossing_value, _release_value)
    else:
        cond = _event_value
    event = dfx.Event(cond, root_finder=_ROOT_FINDER, direction=False)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_vector_field), solver, t0, t1, dt0, y0, args=args,
        saveat=dfx.SaveAt(subs=[dfx.SubSaveAt(ts=ts), dfx.SubSaveAt(t1=True)]),
        stepsize_controller=controller, event=event, max_steps=max_steps, throw=False,
    )
    ys = _split(sol.ys[0])[0]
    t_end = sol.ts[1][-1]
    y_end, z1_end = _split(jax.tree.map(lambda x: x[-1], sol.ys[1]))
    # With the pre-activations carried, those the event function saw.
    z = problem.pre(y_end, mask, z1_end)
    lam = problem.sliding(y_end, mask, sl, z1=z1_end)[1] if sl.idx.shape[0] else jnp.zeros(0)
    return (ys, t_end, y_end, sol.result._value, sol.stats["num_steps"],
            sol.stats["num_rejected_steps"], z, lam)


@eqx.filter_jit
def _pre(problem, p, mask):
    return problem.pre(p, mask)


@eqx.filter_jit
def _slope_guess(problem, p, mask, sl):
    return problem.slope_guess(p, mask, sl)


def _sliding_arrays(sliding, shapes, per_point: bool) -> _Sliding:
    """The device arrays for the sliding entries (flat indices into the concatenated
    pre-activations, whose per-layer shapes are `shapes` = ((points, ...), ...))."""
    k = _bucket(len(sliding))
    idx = np.zeros(k, np.int64)
    valid = np.zeros(k, bool)
    idx[: len(sliding)] = sliding
    valid[: len(sliding)] = True
    if not per_point:
        return _Sliding(jnp.asarray(idx), jnp.asarray(valid))
    point, col = _locate(idx, shapes)
    pts = np.unique(point[valid])
    slot = np.searchsorted(pts, point)
    slot[~valid] = 0
    pts_pad = np.zeros(k, np.int64)
    pts_pad[: pts.size] = pts
    pts_valid = np.zeros(k)
    pts_valid[: pts.size] = 1.0
    return _Sliding(jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(pts_pad),
                    jnp.asarray(pts_valid), jnp.asarray(slot), jnp.asarray(col))


@eqx.filter_jit
def _zdot_entry(problem, p, mask, sl, point, col):
    """z' of one entry (data point `point`, column `col` of the point's row) along the vector
    field on `mask` (with the sliding slopes): one gradient and a directional derivative of
    one row of pre-activations."""
    if sl.idx.shape[0]:
        mask, _, field = problem.sliding(p, mask, sl)
    else:
        field = problem.field(p, mask)
    return jax.jvp(lambda q: problem.rows(q, mask, point[None]), (p,), (field,))[1][0, col]


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


def _event_weights(sign, offset, z):
    """Positive weights w_j that make each entry's event value w_j (s_j z_j + offset_j) equal 1 at
    the piece's start (z: the pre-activations there; 1 for sliding entries, s_j = 0).

    Scaling by a positive constant keeps each entry's root, hence the min's first root, but
    shapes the min for the root finder: unscaled, the entries just handled at the last event
    sit ~1e-12 z_max above their surfaces and moving away, so the min rises from ~0 before it
    falls to the next event and secant points land next to the piece's start (21 evaluations
    of the event function per event on the Fig 2 network at t = 4.3, 10 scaled). Scaled, the
    min starts at 1 and falls to 0 at the first hit, close to linearly (1 - t / T_j for
    entries approaching at a steady rate)."""
    value = sign * z + offset
    floor = np.finfo(z.dtype).eps ** 2 * max(float(np.max(np.abs(z))), np.finfo(z.dtype).tiny)
    return np.where(sign == 0, 1.0, 1.0 / np.maximum(value, floor)).astype(z.dtype)


def _bucket(k: int) -> int:
    """The padded size for k sliding entries (each size compiles once): the next power of two
    up to 64, then the next multiple of an eighth of the next power of two (80, 96, 112, 128,
    160, 192, ...): padding stays below a quarter of a large sliding set, where a power of
    two would pad 65 entries to 128."""
    if k <= 64:
        return 0 if k == 0 else 1 << (k - 1).bit_length()
    step = (1 << (k - 1).bit_length()) // 8
    return -(-k // step) * step


def _repad(lam, pinv, n, k):
    """A sliding guess (slopes, pseudo-inverse of their Jacobian) for n entries padded to k: as
    it is if padded so, else (a checkpoint written under another `_bucket`) its n x n block
    with slopes 0 and the identity on the padding, as `_Problem.sliding` pads them."""
    if lam.shape[0] == k:
        return lam, pinv
    lam_k = np.zeros(k, lam.dtype)
    lam_k[:n] = lam[:n]
    if pinv is None:
        return lam_k, None
    pinv_k = np.eye(k, dtype=pinv.dtype)
    pinv_k[:n, :n] = pinv[:n, :n]
    return lam_k, pinv_k


def kink_flow(model, loss, t0, t1, ts, solver, controller, max_steps, max_events, record=False,
              progress=False, label="", checkpoint=None):
    """Single-trajectory exact flow.

    Returns `(saved params at ts, stats dict, result code, pieces)`; `pieces` (with
    `record=True`, else empty) lists each smooth piece as a dict with its start/end times and
    states, the activation mask, the sliding entries, and what ended it. `progress` shows a
    tqdm bar over flow time with the events met and the entries sliding. `checkpoint`: a file
    for the solve's state (see `_Checkpoint`): saved every `CHECKPOINT_SECONDS` and when the
    solve stops, resumed from if it exists.
    """
    with tqdm.tqdm(total=float(t1) - float(t0), disable=not progress, unit="t",
                   desc=f"exact kinks {label}".strip(), leave=False,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| t={n:.4g}/{total:.4g} "
                              "[{elapsed}<{remaining}{postfix}]") as bar:
        return _kink_flow(model, loss, t0, t1, ts, solver, controller, max_steps, max_events,
                          record, bar, checkpoint)


# The exact path saves its checkpoint (if given one) at the first piece start this long after the
# last save, and when it stops.
CHECKPOINT_SECONDS = 60.0


def fingerprint(params, loss, t0, t1, ts, solver, controller) -> str:
    """A hash of what determines an exact solve's solution: initial parameters, data, times,
    solver, tolerances (a checkpoint from another problem is refused by it)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params) + jax.tree.leaves(eqx.filter(loss, eqx.is_array)):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.asarray(ts, np.float64).tobytes())
    h.update(repr((float(t0), float(t1), type(solver).__name__, type(controller).__name__,
                   float(getattr(controller, "rtol", 0.0)),
                   float(getattr(controller, "atol", 0.0)))).encode())
    return h.hexdigest()


class _Checkpoint:
    """The state of a piecewise solve at a piece start, in an .npz file: time, parameters,
    activation mask, event signs and offsets, sliding entries and their slope guess, first step,
    statistics, the states saved so far, and the seconds spent (`elapsed_s`, summed over
    resumed runs). A solve that reached t1 is stored with its outputs (`done`); one that
    failed (max_events, max_steps) at the start of the piece it failed on, so that a rerun
    with a larger budget carries on. `fingerprint` hashes what determines the solution (initial
    parameters, data, times, solver, tolerances): a file from another problem is refused."""

    def __init__(self, path, params, loss, t0, t1, ts, solver, controller):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint: the folder of {self.path} does not exist; create "
                             f"it or pass another path")
        self.fingerprint = fingerprint(params, loss, t0, t1, ts, solver, controller)
        self.treedef = jax.tree.structure(params)
        self.last_save = time.perf_counter()
        self.history = []

    def load(self):
        """The saved state as a dict, or None if there is no file."""
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
            meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint: {self.path} is not a flowsim checkpoint ({e}); "
                             f"delete it or pass another path") from None
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint: {self.path} holds the solve of a different problem "
                             f"(model, data, times, solver or tolerances differ); delete it or "
                             f"pass another path")

        def tree(prefix, n):
            return jax.tree.unflatten(self.treedef, [data[f"{prefix}{i}"] for i in range(n)])

        self.history = meta.get("history", [])
        n = self.treedef.num_leaves
        state = {**meta, "p": tree("p", n), "out": tree("out", n) if meta["has_out"] else None}
        for k in ("mask", "sign", "offset", "filled", "lam", "pinv"):
            state[k] = data.get(k)
        return state

    def save(self, state, force=False):
        """Writes `state` (atomically) if forced or `CHECKPOINT_SECONDS` have passed."""
        now = time.perf_counter()
        if not force and now - self.last_save < CHECKPOINT_SECONDS:
            return
        self.last_save = now
        arrays = {f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state["p"]))}
        if state["out"] is not None:
            arrays.update({f"out{i}": x for i, x in enumerate(jax.tree.leaves(state["out"]))})
        for k in ("mask", "sign", "offset", "filled", "lam", "pinv"):
            if state.get(k) is not None:
                arrays[k] = np.asarray(state[k])
        meta = {k: state[k] for k in ("t", "dt0", "sliding", "stats", "result", "done",
                                      "elapsed_s")}
        # One row per write: how the solve progressed (time, events, sliding, seconds).
        self.history.append([state["t"], state["stats"]["num_events"], len(state["sliding"]),
                             state["elapsed_s"]])
        meta.update(fingerprint=self.fingerprint, has_out=state["out"] is not None,
                    history=self.history)
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, self.path)


def checkpoint_info(path, states: bool = False) -> dict:
    """What an exact solve's checkpoint file holds: `t` reached, `stats` there, `sliding`
    entries, `elapsed_s` (seconds spent, summed over resumed runs), `done`, `history` (one row
    [t, events, entries sliding, seconds] per write of the file); with `states`
    also `filled` (which save times the solve has passed) and `saved`, the leaves of the
    parameters at the save times (leading axis: time; rows not `filled` are not meaningful)."""
    with np.load(os.fspath(path), allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        info = {k: meta[k] for k in ("t", "stats", "sliding", "elapsed_s", "done")}
        info["history"] = meta.get("history", [])
        if states:
            n = sum(k.startswith("out") for k in f.files)
            info["filled"] = f["filled"] if "filled" in f.files else None
            info["saved"] = [f[f"out{i}"] for i in range(n)]
    return info


def _kink_flow(model, loss, t0, t1, ts, solver, controller, max_steps, max_events, record, bar,
               checkpoint=None):
    started = time.perf_counter()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    X = loss.X
    zs = model.forward(X)[1]
    problem = _Problem(static, loss, tuple(z.shape for z in zs))
    per_point = _per_point(loss)
    carry_first = _carries_first(problem, solver, controller)

    def slides(entries):
        return _sliding_arrays(entries, problem.shapes, per_point)

    z = np.concatenate([np.asarray(v).ravel() for v in zs])
    dtype = z.dtype
    mask = (z > 0).astype(dtype)
    sign = np.where(z > 0, 1, -1).astype(dtype)
    offset = np.zeros_like(z)
    # Entries exactly at a kink at t0 (e.g. zero-initialised units) start as inactive.
    sliding: list[int] = []
    ts = np.asarray(ts, dtype)
    out = None
    filled = np.zeros(ts.shape[0], bool)
    t = float(t0)
    p = params
    sl = slides(sliding)
    dt0 = _FIRST_STEP * (float(t1) - float(t0))
    stats = {"num_steps": 0, "num_rejected_steps": 0, "num_events": 0, "num_crossings": 0,
             "num_sliding_intervals": 0, "num_releases": 0}
    result = 0
    pieces = []
    elapsed = 0.0
    ckpt = None if checkpoint is None else _Checkpoint(checkpoint, params, loss, t0, t1, ts,
                                                        solver, controller)
    saved = None if ckpt is None else ckpt.load()
    if saved is not None:
        t, p, dt0, sliding, stats = saved["t"], saved["p"], saved["dt0"], saved["sliding"], \
            saved["stats"]
        mask, sign, offset = saved["mask"], saved["sign"], saved["offset"]
        out, filled, elapsed = saved["out"], saved["filled"], saved["elapsed_s"]
        sl = slides(sliding)
        if saved["lam"] is not None:
            lam, pinv = _repad(saved["lam"], saved["pinv"], len(sliding), sl.idx.shape[0])
            sl = dataclasses.replace(sl, lam=jnp.asarray(lam),
                                     pinv=None if pinv is None else jnp.asarray(pinv))
        z = None
        bar.update(t - float(t0))
        if saved["done"]:
            return out, stats, saved["result"], pieces
    snap = None
    try:
        while True:
            if ckpt is not None:
                snap = {"t": t, "p": p, "dt0": dt0, "sliding": list(sliding),
                        "stats": dict(stats), "result": 0, "done": False, "mask": mask.copy(),
                        "sign": sign.copy(), "offset": offset.copy(), "out": out,
                        "filled": filled.copy(), "lam": sl.lam, "pinv": sl.pinv,
                        "elapsed_s": elapsed + time.perf_counter() - started}
                ckpt.save(snap)
            if bar.n and stats["num_events"] % 10 == 0:
                bar.set_postfix(events=stats["num_events"], sliding=len(sliding), refresh=False)
            ts_piece = np.maximum(ts, t)
            if z is None:  # resumed from a checkpoint
                z = np.asarray(_pre(problem, p, jnp.asarray(mask)))
            weight = _event_weights(sign, offset, z)
            piece_args = (problem, p, jnp.asarray(t, dtype), jnp.asarray(t1, dtype),
                          jnp.asarray(min(dt0, t1 - t), dtype), jnp.asarray(ts_piece),
                          jnp.asarray(mask), sl, jnp.asarray(sign * weight),
                          jnp.asarray(offset * weight), solver, controller, max_steps)
            ys, t_end, y_end, res, n_steps, n_rej, z_end, lam = _piece(*piece_args,
                                                                       carry_first=carry_first)
            if sliding and np.min(np.minimum(lam, 1 - lam)[: len(sliding)]) < -_RELEASE_TOL:
                # A crossing was located but a release came first: locate the earlier of the two.
                stats["num_steps"] += int(n_steps)
                stats["num_rejected_steps"] += int(n_rej)
                ys, t_end, y_end, res, n_steps, n_rej, z_end, lam = _piece(
                    *piece_args, combined=True, carry_first=carry_first)
            stats["num_steps"] += int(n_steps)
            stats["num_rejected_steps"] += int(n_rej)
            t_end = float(t_end)
            # The next piece's first step: a restart's initial step selection would cost two
            # gradients. Events usually cut the step short: the next is likely within a few times
            # this piece's length per accepted step (the controller shrinks a step that fails).
            accepted = int(n_steps) - int(n_rej)
            if t_end > t and accepted > 0:
                dt0 = _FIRST_STEP_GROWTH * (t_end - t) / accepted
            res = int(res)
            take = (ts >= t) & (ts <= t_end) & ~filled
            if out is None:
                out = jax.tree.map(lambda a: np.array(a), ys)
            else:
                def merge(o, a, take=take):
                    return np.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, o)

                out = jax.tree.map(merge, out, jax.tree.map(np.asarray, ys))
            filled |= take
            if record:
                pieces.append({"t0": t, "t1": float(t_end), "p0": p, "p1": y_end,
                               "mask": mask.copy(), "sliding": list(sliding), "events": []})
            bar.update(t_end - t)
            p = y_end
            t = t_end
            event = res == dfx.RESULTS.event_occurred._value
            if not event:
                result = res
                break
            if t >= t1:
                break
            stats["num_events"] += 1
            if stats["num_events"] > max_events:
                result = -1
                break
            z = z_end = np.asarray(z_end)
            lam_piece = np.asarray(lam)
            lam = lam_piece[: len(sliding)]
            zscale = max(float(np.max(np.abs(z_end))), np.finfo(dtype).tiny)
            delta = 1e-12 * zscale
            piece_sliding = list(sliding)
            # Releases: a sliding entry whose lambda reached 0 or 1 leaves the surface.
            for pos, j in enumerate(list(sliding)):
                if lam[pos] <= _RELEASE_TOL or lam[pos] >= 1 - _RELEASE_TOL:
                    side = 1.0 if lam[pos] >= 0.5 else 0.0
                    sliding.remove(j)
                    mask[j] = side
                    sign[j] = 1.0 if side else -1.0
                    offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
                    stats["num_releases"] += 1
                    if record:
                        pieces[-1]["events"].append(("release", j))
            # Hits: entries whose event value reached zero.
            values = np.where(sign == 0, np.inf, sign * z_end + offset)
            hits = np.flatnonzero(values <= 1e-9 * zscale)
            for j in hits:
                mask_eff = mask.copy()
                # The piece's slope guess serves while the sliding set is the piece's.
                sl_now = sl if sliding == piece_sliding else slides(sliding)
                point, col = _locate(np.array([j]), problem.shapes)
                both = []
                for side in (1.0, 0.0):
                    mask_eff[j] = side
                    zd = _zdot_entry(problem, p, jnp.asarray(mask_eff), sl_now,
                                     jnp.asarray(point[0]), jnp.asarray(col[0]))
                    both.append(float(zd))
                zd_plus, zd_minus = both
                was_active = sign[j] > 0
                # Derivatives at rounding level (e.g. exactly 0 with orthogonal inputs) count as 0.
                tiny = 1e-12 * (abs(zd_plus) + abs(zd_minus))
                approaching = (zd_plus if was_active else zd_minus) * sign[j] < -tiny
                if not approaching:
                    offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
                    continue
                other = zd_minus if was_active else zd_plus
                pushes_back = other * sign[j] > tiny  # the far side drives z back to the surface
                if pushes_back:
                    sliding.append(int(j))
                    sign[j] = 0.0
                    offset[j] = 0.0
                    stats["num_sliding_intervals"] += 1
                    if record:
                        pieces[-1]["events"].append(("slide", int(j)))
                else:
                    mask[j] = 0.0 if was_active else 1.0
                    sign[j] = -sign[j]
                    offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
                    stats["num_crossings"] += 1
                    if record:
                        pieces[-1]["events"].append(("cross", int(j)))
            # A sliding entry whose slope is already at 0 or 1 (a far side at rounding level) is
            # released before the next piece, so the release condition starts positive.
            # The next piece starts its slope solves from the slopes here and the pseudo-inverse
            # of their Jacobian here (`slope_guess`). The slopes: by chord iterations from the last
            # piece's guess while the sliding set is that piece's, else by Newton from the slopes
            # known (0 for entries that just joined).
            # (A Jacobian kept over several pieces slowed the chord to ~0.2 per iteration on the
            # Fig 2 network with 33 entries sliding, and Newton took over: 1.4 s per piece.)
            reuse = sliding == piece_sliding
            known = dict(zip(piece_sliding, lam_piece.tolist()))
            while True:
                if not sliding:
                    sl = slides(sliding)
                    break
                if reuse:  # `sl` is still the piece's
                    start = dataclasses.replace(sl, lam=jnp.asarray(lam_piece))
                else:  # Newton from the known slopes, 0 for entries that just joined
                    start = slides(sliding)
                    warm = np.zeros(start.idx.shape[0], dtype)
                    warm[: len(sliding)] = [known.get(j, 0.0) for j in sliding]
                    start = dataclasses.replace(start, lam=jnp.asarray(warm))
                sl = _slope_guess(problem, p, jnp.asarray(mask), start)
                reuse = False
                lam_now = np.asarray(sl.lam)
                known = dict(zip(sliding, lam_now.tolist()))
                out_of_range = [pos for pos in range(len(sliding))
                                if not (_RELEASE_TOL < lam_now[pos] < 1 - _RELEASE_TOL)]
                if not out_of_range:
                    break
                pos = out_of_range[0]
                j = sliding.pop(pos)
                side = 1.0 if lam_now[pos] >= 0.5 else 0.0
                mask[j] = side
                sign[j] = 1.0 if side else -1.0
                offset[j] = max(0.0, -sign[j] * z_end[j]) + delta
                stats["num_releases"] += 1
                if record:
                    pieces[-1]["events"].append(("release", int(j)))
    except KeyboardInterrupt:
        if snap is not None:
            ckpt.save(snap, force=True)
        raise
    if not filled.all() and result == 0:
        result = -2
    stats["num_sliding_now"] = len(sliding)
    stats["t_reached"] = t
    if ckpt is not None:
        elapsed += time.perf_counter() - started
        if result == 0:
            ckpt.save({"t": t, "p": p, "dt0": dt0, "sliding": list(sliding), "stats": stats,
                       "result": 0, "done": True, "mask": mask, "sign": sign,
                       "offset": offset, "out": out, "filled": filled, "lam": None,
                       "pinv": None, "elapsed_s": elapsed}, force=True)
        elif snap is not None:  # carry on from the failed piece's start with a larger budget
            ckpt.save(snap, force=True)
    return out, stats, result, pieces
