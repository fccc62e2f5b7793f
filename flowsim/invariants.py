"""The quantities gradient flow conserves on homogeneous networks (Du, Hu, Lee 2018), and drift.

For a positively homogeneous activation (sigma(c x) = c sigma(x), c > 0: linear, ReLU, leaky
ReLU), scaling a hidden unit's incoming parameters by c and its outgoing ones by 1/c leaves the
network unchanged. Hence <theta_in, dL/dtheta_in> = <theta_out, dL/dtheta_out> for every unit and
any differentiable loss, and gradient flow conserves

- `neuron_gaps`: ||W_h[i, :]||^2 - ||W_{h+1}[:, i]||^2 for each hidden unit i (Thm 2.1),
- `layer_gaps`: ||W_h||_F^2 - ||W_{h+1}||_F^2 (Cor 2.1; Thm 2.3 for shared filters),
- `gram_gaps`: W_h W_h^T - W_{h+1}^T W_{h+1} when the activation is linear (Thm 2.2).

Gradient descent with step eta_k changes each gap by exactly eta_k^2 (||g_in||^2 - ||g_out||^2)
per step; `gd_drift_ledger` accumulates this prediction so that the measured drift can be
checked to rounding.

For a non-homogeneous activation (tanh) these quantities are *not* conserved; every function
here then emits `NotConservedWarning`.

All functions accept a model whose arrays carry leading (batch, time) axes and return arrays
with the same leading axes.
"""

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._trajectory import Trajectory
from .models import AbstractModel
from .models._activations import describe

__all__ = [
    "DriftLedger",
    "NotConservedWarning",
    "alignment",
    "drift",
    "gd_drift_ledger",
    "gram_gaps",
    "layer_gaps",
    "layer_norms",
    "neuron_gaps",
    "rank_ratio",
]


class NotConservedWarning(UserWarning):
    """The model's activation is not positively homogeneous: the balance gaps are not invariants."""


def _units(model):
    if not hasattr(model, "hidden_units"):
        raise TypeError(
            f"{type(model).__name__} does not describe its hidden units; use a flowsim.models "
            f"model or implement hidden_units() (see flowsim.models.AbstractModel)"
        )
    if isinstance(model, AbstractModel) and not model.is_homogeneous:
        warnings.warn(
            f"{type(model).__name__} has activations {describe(model.activations)}: not positively "
            f"homogeneous, so the balance gaps are not conserved by gradient flow",
            NotConservedWarning,
            stacklevel=3,
        )
    units = model.hidden_units()
    if not units:
        raise ValueError(
            f"{type(model).__name__} has no hidden layer, so it has no balance gaps; "
            f"use a model with at least two layers"
        )
    return units


def _sq(x):
    return jnp.sum(x**2, axis=-1)


def neuron_gaps(model) -> tuple[Float[Array, "*lead units"], ...]:
    """Per hidden unit ||incoming||^2 - ||outgoing||^2, one array per hidden layer (Thm 2.1)."""
    return tuple(_sq(i) - _sq(o) for i, o in _units(model))


def layer_gaps(model) -> Float[Array, "*lead layers"]:
    """||W_h||_F^2 - ||W_{h+1}||_F^2 for h = 1..N-1 (Cor 2.1 / Thm 2.3), shape `(*lead, N-1)`.

    Biases count with the layer they feed (see `MLP`), so the gap is the sum of `neuron_gaps`.
    """
    return jnp.stack([jnp.sum(_sq(i) - _sq(o), axis=-1) for i, o in _units(model)], axis=-1)


def layer_norms(model) -> Float[Array, "*lead layers"]:
    """||W_h||_F^2 + ||W_{h+1}||_F^2 for h = 1..N-1: the scale to judge a layer gap against."""
    return jnp.stack([jnp.sum(_sq(i) + _sq(o), axis=-1) for i, o in _units(model)], axis=-1)


def gram_gaps(model) -> tuple[Float[Array, "*lead units units"], ...]:
    """W_h W_h^T - W_{h+1}^T W_{h+1} for each hidden layer (Thm 2.2: linear activations only).

    **Raises:** `ValueError` if an activation is not linear (then only the diagonal, the
    `neuron_gaps`, is conserved).
    """
    acts = model.activations if isinstance(model, AbstractModel) else ()
    # Homogeneous without kinks: sigma(x) = c x, a linear network.
    if not all(a.homogeneous and not a.has_kinks for a in acts):
        raise ValueError(
            f"gram_gaps needs linear activations (Thm 2.2), got {describe(acts)}; "
            f"use neuron_gaps for ReLU-type networks"
        )
    out = []
    for i, o in _units(model):
        out.append(i @ jnp.swapaxes(i, -1, -2) - o @ jnp.swapaxes(o, -1, -2))
    return tuple(out)


def drift(traj: Trajectory, quantity=layer_gaps) -> Any:
    """quantity(model_t) - quantity(model_0) at every saved time of `traj`.

    **Arguments:**

    - `traj`: a `Trajectory` (batched or not).
    - `quantity`: a function of one model returning a PyTree of arrays, e.g. `layer_gaps`
      (default), `neuron_gaps`, `gram_gaps`, or your own.

    **Returns:** the PyTree of `quantity` with leading axes `(batch, time)` or `(time,)`.
    """
    models = traj.models
    fn = eqx.filter_vmap(quantity)
    if traj.batched:
        fn = eqx.filter_vmap(fn)
    values = fn(models)
    axis = traj.ts.ndim - 1  # the time axis
    return jax.tree.map(lambda v: v - jax.lax.slice_in_dim(v, 0, 1, axis=axis), values)


class DriftLedger(eqx.Module):
    """Measured and predicted drift of the unit balance gaps along a gradient-descent run.

    `measured[h]` and `predicted[h]` have shape `(*batch, time, units)`: the change of each
    unit's gap since step 0, and the sum over past steps of eta_k^2 (||g_in||^2 - ||g_out||^2).
    They agree to rounding for homogeneous models.
    """

    measured: tuple[Float[Array, "*batch time units"], ...]
    predicted: tuple[Float[Array, "*batch time units"], ...]

    @property
    def layer_measured(self) -> Float[Array, "*batch time layers"]:
        return jnp.stack([m.sum(-1) for m in self.measured], axis=-1)

    @property
    def layer_predicted(self) -> Float[Array, "*batch time layers"]:
        return jnp.stack([p.sum(-1) for p in self.predicted], axis=-1)

    def max_discrepancy(self) -> Float[Array, ""]:
        """max |measured - predicted| over units, layers, times and trajectories."""
        return jnp.max(jnp.stack([jnp.max(jnp.abs(m - p))
                                  for m, p in zip(self.measured, self.predicted)]))


def gd_drift_ledger(traj: Trajectory, loss=None) -> DriftLedger:
    """The GD drift ledger: measured drift of every unit gap next to its exact prediction.

    Each GD step theta <- theta - eta_k g changes a unit's gap by exactly
    eta_k^2 (||g_in||^2 - ||g_out||^2), because <theta_in, g_in> = <theta_out, g_out>.

    **Arguments:**

    - `traj`: a `Trajectory` from `flowsim.gradient_descent`.
    - `loss`: optional. If given, the prediction is recomputed from the saved iterates and their
      gradients (an independent check; needs `save_every=1`). If omitted, the ledger accumulated
      during the run is used (any `save_every`).

    **Returns:** a `DriftLedger`.
    """
    if traj.learning_rates is None:
        raise ValueError("gd_drift_ledger needs a gradient-descent trajectory")
    measured = drift(traj, neuron_gaps)
    if loss is None:
        if traj.ledger is None:
            raise ValueError(
                "this trajectory carries no ledger (its model has no hidden_units()); "
                "pass `loss` to recompute it"
            )
        return DriftLedger(measured=measured, predicted=traj.ledger)
    steps = traj.steps
    assert steps is not None
    if steps.shape[0] != traj.learning_rates.shape[0] + 1:
        raise ValueError(
            "recomputing the ledger from `loss` needs every iterate: run gradient_descent with "
            "save_every=1, or call gd_drift_ledger(traj) to use the ledger recorded during the run"
        )

    def increments(model):
        grads = eqx.filter_grad(loss)(model)
        return tuple(_sq(gi) - _sq(go) for gi, go in grads.hidden_units())

    # One saved model at a time (lax.map), not vmap: vmapping a convolution's gradient over its
    # filters becomes a grouped convolution, which is ~20x slower on CPU.
    dyn, static = eqx.partition(traj.models, eqx.is_array)
    lead = traj.ts.shape  # (time,) or (batch, time)
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[len(lead):]), dyn)
    inc = jax.lax.map(lambda d: increments(eqx.combine(d, static)), flat)
    inc = jax.tree.map(lambda x: x.reshape(*lead, *x.shape[1:]), inc)
    eta2 = traj.learning_rates**2
    axis = traj.ts.ndim - 1

    def accumulate(x):
        x = jnp.moveaxis(x, axis, -1)[..., :-1] * eta2  # step k's increment uses eta_k
        c = jnp.concatenate([jnp.zeros_like(x[..., :1]), jnp.cumsum(x, axis=-1)], axis=-1)
        return jnp.moveaxis(c, -1, axis)

    return DriftLedger(measured=measured, predicted=tuple(accumulate(x) for x in inc))


def _top_singular(W):
    u, s, vt = jnp.linalg.svd(W, full_matrices=False)
    return u[..., :, 0], s, vt[..., 0, :]


def rank_ratio(model) -> tuple[Float[Array, "*lead"], ...]:
    """sigma_2 / sigma_1 of each layer matrix (-> 0 when a layer becomes rank one)."""
    out = []
    for W in model.layers:
        if W.ndim < 2:
            out.append(jnp.zeros(W.shape[:-1], W.dtype))
            continue
        s = jnp.linalg.svd(W, compute_uv=False)
        out.append(s[..., 1] / s[..., 0] if s.shape[-1] > 1 else jnp.zeros_like(s[..., 0]))
    return tuple(out)


def alignment(model) -> Float[Array, "*lead pairs"]:
    """|v_{h+1}^T u_h| for adjacent layers, u/v the top left/right singular vectors.

    The layer alignment of Ji & Telgarsky (2018).

    Tends to 1 as gradient descent aligns the layers of a deep linear network.
    """
    tops = [_top_singular(W) for W in model.layers if W.ndim >= 2]
    if len(tops) < 2:
        raise ValueError(
            f"alignment needs two adjacent matrix layers, {type(model).__name__} has "
            f"{len(tops)}; it is meant for deep linear networks (MLP, MatrixFactorization)"
        )
    return jnp.stack(
        [jnp.abs(jnp.sum(tops[h + 1][2] * tops[h][0], axis=-1)) for h in range(len(tops) - 1)],
        axis=-1,
    )
