"""Gradient descent against gradient flow at matched time t_k = sum_{i<k} eta_i."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._trajectory import Trajectory
from .invariants import layer_gaps

__all__ = ["DiscretizationError", "discretization_error", "modified_flow_loss"]


class DiscretizationError(eqx.Module):
    """Distances between GD iterates and the flow at the same flow times.

    Every field has shape `(*batch, time)`, aligned with `gd_traj.ts`.

    - `parameter`: ||theta_GD(t_k) - theta_flow(t_k)||_2 over all parameters.
    - `function`: root-mean-square over the inputs of ||f_GD(x) - f_flow(x)||_2 (NaN without
      inputs).
    - `loss_gap`: L(theta_GD) - L(theta_flow).
    - `gd_drift`, `flow_drift`: max over layers of |layer gap(t_k) - layer gap(0)| (NaN for a
      model without `hidden_units()`, which has no balance gaps).
    """

    parameter: Float[Array, "*batch time"]
    function: Float[Array, "*batch time"]
    loss_gap: Float[Array, "*batch time"]
    gd_drift: Float[Array, "*batch time"]
    flow_drift: Float[Array, "*batch time"]


def discretization_error(
    gd_traj: Trajectory, flow_traj: Trajectory, inputs=None
) -> DiscretizationError:
    """Compares GD iterate k with the gradient flow at t_k = sum_{i<k} eta_i.

    **Arguments:**

    - `gd_traj`: from `flowsim.gradient_descent`.
    - `flow_traj`: from `flowsim.gradient_flow(..., ts=gd_traj.ts)` (same initialisation(s),
      saved at exactly the GD times; batched alike).
    - `inputs`: optional inputs X on which to compare the two networks' predictions
      (e.g. the training inputs); the `function` distance is NaN without them.

    **Returns:** a `DiscretizationError`.

    **Raises:** `ValueError` if the two trajectories are not saved at the same times.

    **Example:**

    ```python
    gd = flowsim.gradient_descent(net, loss, 100, learning_rate=0.01)
    flow = flowsim.gradient_flow(net, loss, float(gd.ts[-1]), ts=gd.ts)
    err = flowsim.discretization_error(gd, flow, inputs=X)
    ```
    """
    if gd_traj.learning_rates is None:
        raise ValueError("`gd_traj` must come from flowsim.gradient_descent")
    if gd_traj.batched != flow_traj.batched or gd_traj.ts.shape != flow_traj.ts.shape:
        raise ValueError(
            f"the trajectories must be saved at the same times with the same batch layout, got "
            f"ts of shapes {gd_traj.ts.shape} and {flow_traj.ts.shape}; run gradient_flow with "
            f"ts=gd_traj.ts"
        )
    gap = np.max(np.abs(np.asarray(gd_traj.ts) - np.asarray(flow_traj.ts)))
    scale = max(1.0, float(np.max(np.abs(np.asarray(gd_traj.ts)))))
    if gap > 1e-12 * scale:
        raise ValueError(
            f"the flow is saved at other times than GD (max difference {gap:.3g}); run "
            f"gradient_flow with ts=gd_traj.ts"
        )

    def one(gd_model, flow_model):
        pa = jax.tree.leaves(eqx.filter(gd_model, eqx.is_inexact_array))
        pb = jax.tree.leaves(eqx.filter(flow_model, eqx.is_inexact_array))
        param = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(pa, pb)))
        if inputs is None:
            func = jnp.full((), jnp.nan, param.dtype)
        else:
            d = gd_model(inputs) - flow_model(inputs)
            d = d.reshape(d.shape[0], -1)
            func = jnp.sqrt(jnp.mean(jnp.sum(d**2, axis=-1)))
        return param, func

    fn = eqx.filter_vmap(one)
    if gd_traj.batched:
        fn = eqx.filter_vmap(fn)
    param, func = fn(gd_traj.models, flow_traj.models)
    return DiscretizationError(
        parameter=param,
        function=func,
        loss_gap=gd_traj.loss - flow_traj.loss,
        gd_drift=_max_layer_drift(gd_traj),
        flow_drift=_max_layer_drift(flow_traj),
    )


def _max_layer_drift(traj: Trajectory):
    if not hasattr(traj.models, "hidden_units"):  # no balance gaps to drift
        return jnp.full(traj.ts.shape, jnp.nan, traj.loss.dtype)
    fn = eqx.filter_vmap(layer_gaps)
    if traj.batched:
        fn = eqx.filter_vmap(fn)
    gaps = fn(traj.models)
    axis = traj.ts.ndim - 1
    return jnp.max(jnp.abs(gaps - jax.lax.slice_in_dim(gaps, 0, 1, axis=axis)), axis=-1)


class _ModifiedLoss(eqx.Module):
    loss: object
    eta: Float[Array, ""]

    def __call__(self, model):
        value, grads = eqx.filter_value_and_grad(self.loss)(model)
        sq = sum(jnp.sum(g**2) for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array)))
        return value + self.eta / 4 * sq


def modified_flow_loss(loss, eta: float):
    """The modified loss L~ = L + (eta/4) ||grad L||^2 of backward error analysis.

    Gradient descent with constant step eta stays O(eta^2) close to the gradient flow of L~ over
    a fixed time horizon, against O(eta) for the flow of L.

    **Example:**

    ```python
    gd = flowsim.gradient_descent(net, loss, 100, learning_rate=0.05)
    flow = flowsim.gradient_flow(net, flowsim.modified_flow_loss(loss, 0.05), float(gd.ts[-1]),
                                 ts=gd.ts)
    ```
    """
    eta_f = float(eta)
    if not (np.isfinite(eta_f) and eta_f > 0):
        raise ValueError(f"`eta` must be a positive float, got {eta}")
    return _ModifiedLoss(loss, jnp.asarray(eta_f))
