"""Filippov slopes of the sliding set: the slopes that keep sliding entries on their surfaces.

An entry slides when both sides of its kink push into the surface z_j = 0; the solution then
moves along it with the entry's slope sigma'(0) = lambda in [0, 1] chosen so that z_j' = 0.
Several entries can slide at once; z' is multilinear in their slopes (entries of one data point
in different layers). `solve_slopes` finds them by chord iterations from a guess taken at the
piece's start (`slope_guess`), Newton's method taking over when the chord stalls; for a
per-point loss only the rows of the sliding entries' points are evaluated. `_Sliding` holds the
sliding entries as padded arrays (`_sliding_arrays`, sizes from `_bucket`).
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .problem import _locate, _lstsq

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


class _Sliding(eqx.Module):
    """The sliding entries (padded to `_bucket` entries; `valid` marks the real ones) and, for a
    per-point loss, their data points: `pts` (padded, `pts_valid`), and for each entry its
    point's slot in `pts` and its column in that point's row of pre-activations (`sub`).
    `lam` and `pinv`: the guess for the slopes' chord iterations (`slope_guess`)."""

    idx: jax.Array
    valid: jax.Array
    pts: jax.Array | None = None
    pts_valid: jax.Array | None = None
    slot: jax.Array | None = None
    sub: jax.Array | None = None
    lam: jax.Array | None = None
    pinv: jax.Array | None = None
    # With `pinv`: a traced choice between the guess (True) and a fresh start at `lam`
    # (False, as without `pinv`), so that one traced solve serves both.
    guess: jax.Array | None = None


def _solve_slopes(problem, p, mask, sl, jacobian=False, z1=None):
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

    With `jacobian`, returns `(slopes, pseudo-inverse of their Jacobian)` instead: the guess
    for the chord iterations over the next piece (`slope_guess`).
    """
    idx, valid = sl.idx, sl.valid
    k = idx.shape[0]
    # The row-wise Jacobian where it is needed at every piece start, and for Newton's rare
    # fallbacks inside the vector field when many entries slide; forward mode (k residuals,
    # cheaper to compile) for those with few (`_ROWWISE_MIN`).
    rowwise = jacobian or k >= _ROWWISE_MIN
    with_slopes, field_at, residual, jac = slope_system(problem, p, mask, sl, rowwise=rowwise,
                                                        z1=z1)
    both = valid[:, None] & valid[None, :]
    eye = jnp.eye(k, dtype=mask.dtype)

    def masked(J):
        # Least squares: when more surfaces slide than a unit has inputs (a unit collapsing
        # onto the origin) the slopes are not unique, the vector field still is.
        return jnp.where(both, J, eye)

    zeros = jnp.zeros(k, mask.dtype)
    if sl.pinv is None:
        # No guess: the Jacobian at the start (the slopes in `sl` where it has them, those
        # that slid on the last piece, 0 for entries that just joined; else 0) serves the
        # chord iterations; its first step is Newton's. Where z_idx' is affine in the
        # slopes (sliding entries of distinct points, or of one layer) the Jacobian does
        # not depend on them: one Jacobian in all, where Newton took a second to confirm.
        start = zeros if sl.lam is None else jnp.where(valid, sl.lam, 0.0)
        J_start = masked(jac(start))
        pinv = problem._inverse(J_start)
    elif sl.guess is None:
        start, pinv = jnp.where(valid, sl.lam, 0.0), sl.pinv
    else:
        start = jnp.where(valid, sl.lam, 0.0)
        pinv = problem.cond(sl.guess, lambda: sl.pinv,
                            lambda: problem._inverse(masked(jac(start))), rare="false")
    # Where Newton restarts if a chord step fails: the start without a guess, else 0 (the
    # last piece's slopes, whose chord iterations failed, are no better).
    if sl.pinv is None:
        restart = start
    elif sl.guess is None:
        restart = zeros
    else:
        restart = jnp.where(sl.guess, zeros, start)
    lam, newton_ran, J = _iterate(problem, residual, jac, masked, start, restart, pinv, eye)
    lam = jnp.where(valid, lam, 0.0)
    if jacobian:
        # The pseudo-inverse for the chord iterations over the piece: Newton's last
        # Jacobian (taken one step before the slopes, a step below _SLOPE_TOL once
        # converged), else the one taken at the start here, else (chord iterations from
        # the last piece's guess, theta has moved) a fresh one.
        if sl.pinv is None:
            return lam, problem.cond(newton_ran, lambda: problem._inverse(J), lambda: pinv)
        if sl.guess is None:
            J = problem.cond(newton_ran, lambda: J, lambda: masked(jac(lam)), rare="false")
            return lam, problem._inverse(J)
        J = problem.cond(~newton_ran & sl.guess, lambda: masked(jac(lam)), lambda: J)
        return lam, problem.cond(~newton_ran & ~sl.guess, lambda: pinv,
                                 lambda: problem._inverse(J), rare="false")
    return with_slopes(lam), lam, field_at(lam)


# Traced once per kind of call (its arguments' shapes and static choices) and called from
# every place the event loop needs the slopes (the vector field, the release condition, an
# event's one-sided rates, ...): the loop's program is traced and lowered with one copy of
# each, where it was traced at each of ~20 places.
solve_slopes = eqx.filter_jit(_solve_slopes)


def _iterate(problem, residual, jac, masked, start, restart, pinv, eye):
    """The slopes' iterations of `solve_slopes` from `start`: `(slopes, whether Newton ran,
    Newton's last Jacobian or `eye`)`.

    Chord iterations with the Jacobian's pseudo-inverse `pinv`: one residual (no Jacobian) per
    iteration, converging fast while the Jacobian stays near the one taken (theta near the
    piece's start). Newton's method takes over after _CHORD_STEPS of them, or from `restart`
    as soon as a chord step fails to halve the previous one (slopes coupled across layers, far
    from the start)."""

    def newton_step(lam):
        J = masked(jac(lam))
        return _lstsq(J, residual(lam), problem.vmapped), J

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
        lam, size, err, use_newton, J = problem.cond(
            use_newton, lambda: newton_(lam, size, i, J), lambda: chord(lam, size, i, J))
        return lam, size, err, i + 1, use_newton, J

    def keep_going(carry):
        _, _, err, i, _, _ = carry
        return (err > _SLOPE_TOL) & (i < _SLOPE_NEWTON_MAX)

    inf = jnp.asarray(jnp.inf, eye.dtype)
    carry = (start, inf, inf, jnp.asarray(0), jnp.asarray(False), eye)
    lam, _, _, _, newton_ran, J = jax.lax.while_loop(keep_going, iterate, carry)
    return lam, newton_ran, J


def slope_system(problem, p, mask, sl, rowwise=True, z1=None):
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
            return problem.field(p, with_slopes(lam), z1)

        def residual(lam):
            m = with_slopes(lam)
            return jnp.where(valid, problem.zdot(p, m)[idx], 0.0)

        def jac(lam):
            return jax.jacfwd(residual)(lam)
    else:
        pts, slot, sub = sl.pts, sl.slot, sl.sub
        weights = sl.pts_valid / problem.loss.X.shape[0]
        base = problem.row_mask(mask, pts)
        # Padding's slot points past the end and is dropped (see with_slopes).
        slot_or_drop = jnp.where(valid, slot, k)

        def rows_with(lam):
            return base.at[slot_or_drop, sub].set(lam, mode="drop")

        no_slopes = jnp.zeros(k, mask.dtype)
        rest = jax.tree.map(jnp.subtract, problem.field(p, with_slopes(no_slopes), z1),
                            problem.rows_field(p, rows_with(no_slopes), pts, weights))

        def field_at(lam):
            return jax.tree.map(jnp.add, rest, problem.rows_field(p, rows_with(lam), pts, weights))

        def residual(lam):
            rm = rows_with(lam)
            zd = jax.jvp(lambda q: problem.rows_at(q, rm, pts), (p,), (field_at(lam),))[1]
            return jnp.where(valid, zd[slot, sub], 0.0)

        def jac(lam):
            if not rowwise:
                return jax.jacfwd(residual)(lam)
            return _sliding_jacobian(problem, p, base, sl, weights, lam, field_at(lam))
    return with_slopes, field_at, residual, jac


def _sliding_jacobian(problem, p, base, sl, weights, lam, field):
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
            lambda q_: problem.rows_at(q_, row[None], pts[s][None], x[None])[0, c])(q)

    def d_field(s, c, w, lam_c, q, x):
        row = row_of(s, lam)

        def part(x_):
            return problem.rows_field(q, row.at[c].set(x_)[None], pts[s][None], w[None],
                                      x[None])
        return jax.jvp(part, (lam_c,), (jnp.ones_like(lam_c),))[1]

    def d_own_row(s, c):
        def zdot(lam_):
            row = row_of(s, lam_)
            return jax.jvp(lambda q: problem.rows_at(q, row[None], pts[s][None]),
                           (p,), (field,))[1][0, c]
        return jax.grad(zdot)(lam)

    X = problem.loss.X[pts[slot]]
    if problem.dense_first:
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
    if problem.dense_first:
        cross = (A[0][..., 0] @ B[0][..., 0].T) * (X @ X.T)
        A, B = A[1:], B[1:]
    cross = cross + sum(a.reshape(k, -1) @ b.reshape(k, -1).T for a, b in zip(A, B))
    return cross + jax.vmap(d_own_row)(slot, sub)


def slope_guess(problem, p, mask, sl):
    """`sl` with the slopes at p and the pseudo-inverse of their Jacobian there, the start
    of the chord iterations of `solve_slopes` over a piece. The slopes come from
    `solve_slopes`: chord iterations from the guess in `sl` if it has one (the last piece's),
    else Newton from `sl.lam` (the slopes known before the sliding set changed) or from 0; the
    Jacobian is Newton's last, or a fresh one after chord iterations.
    """
    lam, pinv = solve_slopes(problem, p, mask, sl, jacobian=True)
    return dataclasses.replace(sl, lam=lam, pinv=pinv)


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
    with slopes 0 and the identity on the padding, as `solve_slopes` pads them."""
    if lam.shape[0] == k:
        return lam, pinv
    lam_k = np.zeros(k, lam.dtype)
    lam_k[:n] = lam[:n]
    if pinv is None:
        return lam_k, None
    pinv_k = np.eye(k, dtype=pinv.dtype)
    pinv_k[:n, :n] = pinv[:n, :n]
    return lam_k, pinv_k
