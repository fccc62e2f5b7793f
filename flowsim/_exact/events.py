"""Event functions and one smooth piece of the exact flow, as the host loop runs them.

A piece integrates the flow on a fixed activation pattern, the sliding entries at their
Filippov slopes (`solve_slopes`), with diffrax until the first event: an entry off its surface
reaching it (`_crossing_value`) or a sliding entry's slope reaching 0 or 1 (`_release_value`),
located by `_ROOT_FINDER`. With a dense first layer and wide inputs a piece carries the first
layer's pre-activations in its state (`_WithFirst`, `_carries_first`). `_zdot_entry` gives an
entry's rate on either side of its kink, from which the loop decides what a hit is;
`_event_weights` scales the event values to 1 at a piece's start.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .illinois import _ROOT_FINDER
from .problem import _per_point
from .sliding import slope_guess, solve_slopes

# The first piece's first step (relative to the horizon; the controller grows it tenfold a
# step), and each later piece's: this times the previous piece's length per accepted step.
_FIRST_STEP = 1e-6
_FIRST_STEP_GROWTH = 10.0

# Pieces carry the first layer's pre-activations in their state where they can (`_WithFirst`)
# and the inputs are at least this wide. The products with the data that it saves must
# outweigh a larger state and a graph that takes longer to compile. On the Fig 2 problem
# (`scripts/kinks_fig2.py --steps carry`): at 1,000 inputs 10 % less time per event, which
# repays the extra compilation (7 s) after ~200 events. For 150 events that included new
# sliding-set sizes (hence compilations) it took 1.16x, 1.66x and 1.65x as long at 100, 300
# and 30 inputs.
_FIRST_STATE = True
_FIRST_STATE_MIN_INPUTS = 512


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
        field = solve_slopes(problem, p, mask, sl, z1=z1)[2]
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
    _, lam, _ = solve_slopes(problem, p, mask, sl, z1=z1)
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
    lam = solve_slopes(problem, y_end, mask, sl, z1=z1_end)[1] if sl.idx.shape[0] else jnp.zeros(0)
    return (ys, t_end, y_end, sol.result._value, sol.stats["num_steps"],
            sol.stats["num_rejected_steps"], z, lam)


@eqx.filter_jit
def _pre(problem, p, mask):
    return problem.pre(p, mask)


@eqx.filter_jit
def _slope_guess(problem, p, mask, sl):
    return slope_guess(problem, p, mask, sl)


@eqx.filter_jit
def _zdot_entry(problem, p, mask, sl, point, col):
    """z' of one entry (data point `point`, column `col` of the point's row) along the vector
    field on `mask` (with the sliding slopes): one gradient and a directional derivative of
    one row of pre-activations."""
    if sl.idx.shape[0]:
        mask, _, field = solve_slopes(problem, p, mask, sl)
    else:
        field = problem.field(p, mask)
    return jax.jvp(lambda q: problem.rows(q, mask, point[None]), (p,), (field,))[1][0, col]


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
