"""A-posteriori error estimate of a flow: the same solve at tighter tolerances."""

import pathlib
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._precision import PrecisionWarning
from ._results import FlowWarning, codes, message
from ._trajectory import Trajectory
from .kinks import ExactKinks, SmoothKinks

ERROR_ESTIMATE_FACTOR = 10.0
"""`error_estimate=True` solves again with rtol and atol divided by this and reports the distance
between the two solutions as the first one's estimated global error.

With tolerance proportionality the tighter solve's error is a tenth of the first's, so the
distance estimates the first error to ~10 % where the error is proportional to the tolerance
(smooth flows, exact kinks: estimate / true error 0.92–1.04, tests/test_error_estimate.py), and
low where it shrinks more slowly, as through kinks on the smooth path (0.7–0.9, docs/kinks.md).
"""


def estimate_error(model, loss, t1: float, *, factor: float = ERROR_ESTIMATE_FACTOR,
                   **kwargs) -> Trajectory:
    """`flowsim.gradient_flow(model, loss, t1, **kwargs)` with an estimate of its global error.

    The flow is solved again with the step controller's tolerances divided by `factor` (same
    solver, same kink treatment, no recompilation), and `stats["error_estimate"]` of the first
    solve is max over the saved times of ||theta(t) - theta_tight(t)||_2 / max_t
    ||theta_tight(t)||_2 (per trajectory). It is NaN, with a `flowsim.FlowWarning`, where the
    tighter solve stopped before the first one's end, and 0 where both took the very same steps
    (the tolerance never bound them): the error is then below what the tolerance resolves.

    The tighter solve costs factor^(1/p) times the steps of an order-p method on a smooth flow,
    up to `factor` times where a smooth solver chatters across ReLU kinks. A checkpointed exact
    solve keeps the tighter one's state in `<stem>-tight<suffix>`.

    **Example:**

    ```python
    import jax.numpy as jnp, jax.random as jr, flowsim
    mf = flowsim.models.MatrixFactorization.random(2, 2, 2, scale=0.1, key=jr.key(0))
    loss = flowsim.losses.factorization(jnp.diag(jnp.array([3.0, 1.0])))
    traj = flowsim.estimate_error(mf, loss, 5.0, solver="tsit5", rtol=1e-6, atol=1e-6)
    assert 0 < float(traj.stats["error_estimate"]) < 1e-4
    ```
    """
    from ._flow import DEFAULT_TOL, gradient_flow  # the flow module builds on this one

    if not (isinstance(factor, int | float) and factor > 1):
        raise ValueError(f"`factor` must be a number above 1, got {factor!r}")
    traj = gradient_flow(model, loss, t1, **kwargs)
    tight_kwargs = dict(kwargs, throw=False)
    controller = kwargs.get("stepsize_controller")
    if controller is not None:
        from ._solvers import tighten

        tight_kwargs["stepsize_controller"] = tighten(controller, factor)
    else:
        for name in ("rtol", "atol"):
            given = kwargs.get(name)
            tight_kwargs[name] = (DEFAULT_TOL if given is None else given) / factor
    kinks = kwargs.get("kinks", "auto")
    if traj.kinks == "exact":
        strategy = kinks if isinstance(kinks, ExactKinks) else ExactKinks()
        path = strategy.checkpoint
        tight_kwargs["kinks"] = eqx.tree_at(
            lambda k: k.checkpoint, strategy, None if path is None else member_path(path, "tight"),
            is_leaf=lambda x: x is None)
    elif traj.kinks == "smooth":
        tight_kwargs["kinks"] = SmoothKinks()
    with warnings.catch_warnings():  # its failures are reported below, as the estimate's
        warnings.simplefilter("ignore", FlowWarning)
        warnings.simplefilter("ignore", PrecisionWarning)  # said once, for the first solve
        tight = gradient_flow(model, loss, t1, **tight_kwargs)
    traj = eqx.tree_at(lambda tr: tr.stats, traj,
                       dict(traj.stats, error_estimate=relative_distance(traj, tight)))
    max_events = strategy.max_events if traj.kinks == "exact" else None
    _report_tight_failures(traj, tight, kwargs.get("max_steps", 100_000), max_events, factor)
    return traj


def member_path(path, tag):
    """`<stem>-<tag><suffix>` next to `path`."""
    path = pathlib.Path(path)
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def relative_distance(traj: Trajectory, tight: Trajectory):
    """Per trajectory: max_t ||theta(t) - theta_tight(t)|| / max_t ||theta_tight(t)|| over the
    saved times both solves reached (NaN where the tight one did not reach the first's end)."""

    def flat(tr):
        leaves = jax.tree.leaves(eqx.filter(tr.models, eqx.is_inexact_array))
        lead = 2 if tr.batched else 1
        return np.concatenate([np.asarray(x).reshape(*x.shape[:lead], -1) for x in leaves], -1)

    a, b = flat(traj), flat(tight)  # (*batch, time, params)
    ts = np.asarray(traj.ts)
    reached = np.asarray(traj.stats["t_reached"])[..., None]
    reached_tight = np.asarray(tight.stats["t_reached"])[..., None]
    both = ts <= np.minimum(reached, reached_tight)
    # Times a solve did not reach hold diffrax's inf fill: masked before any arithmetic.
    a, b = np.where(both[..., None], a, 0.0), np.where(both[..., None], b, 0.0)
    dist, norm = np.linalg.norm(a - b, axis=-1), np.linalg.norm(b, axis=-1)
    est = np.max(dist, axis=-1) / np.max(norm, axis=-1)
    short = np.squeeze(reached_tight < reached, -1)
    return jnp.asarray(np.where(short, np.nan, est))


def _report_tight_failures(traj: Trajectory, tight: Trajectory, max_steps, max_events,
                           factor) -> None:
    """A FlowWarning for trajectories whose estimate is NaN (`max_events` None: smooth path)."""
    short = np.atleast_1d(np.isnan(np.asarray(traj.stats["error_estimate"])))
    if not short.any():
        return
    i = int(np.flatnonzero(short)[0])
    code = int(np.atleast_1d(codes(tight.result))[i])
    n = int(short.sum())
    fix = f"raise max_steps (now {max_steps})"
    if max_events is not None:
        fix += f" or max_events (now {max_events})"
    warnings.warn(
        f"no error estimate for {n} {'trajectory' if n == 1 else 'trajectories'} "
        f"(stats['error_estimate'] is NaN): the solve at tolerances / "
        f"{factor:g} stopped early (trajectory {i}: {message(code)}); "
        f"{fix}", FlowWarning, stacklevel=3,
    )
