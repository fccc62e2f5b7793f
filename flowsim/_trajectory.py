"""The result of a solve: saved times, models, loss, and per-trajectory status."""

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._results import RESULTS


class Trajectory(eqx.Module):
    """Saved states of gradient descent or gradient flow.

    **Fields:**

    - `ts`: flow times of the saved states, shape `(T,)`, or `(B, T)` for a batch. For gradient
      descent, iterate k sits at t_k = sum_{i<k} eta_i.
    - `models`: the model with every array stacked along a leading time axis (after the batch
      axis when batched).
    - `loss`: loss at each saved state, shape `(T,)` or `(B, T)`.
    - `steps`: for gradient descent, the iteration index k of each saved state, shape `(T,)`.
    - `result`: how each trajectory ended, a `flowsim.RESULTS` item (shape `()` or `(B,)`):
      `RESULTS.successful`, `RESULTS.max_steps_reached`, `RESULTS.max_events_reached`,
      `RESULTS.diverged`, ... A flow that stopped early has the time it reached in
      `stats["t_reached"]`; its later saved times hold diffrax's fill value (inf).
    - `stats`: per-trajectory statistics of the solver that ran. Flow: `num_steps`,
      `num_accepted_steps`, `num_rejected_steps`, `t_reached`, `num_grad_evals`, ...; descent:
      `diverged_at` (the first step whose loss or iterate is not finite, or -1; later saved
      states repeat the last finite iterate, with loss NaN) and `ledger_bound`
      (sum_{i<k} eta_i^2 ||grad L(theta_i)||^2 at each saved k).
    - `ledger`: gradient descent only: for each hidden layer, the cumulative change of every
      unit's balance gap predicted by the GD drift identity, shape `(T, units)` (see
      `flowsim.invariants.gd_drift_ledger`).
    - `learning_rates`: gradient descent only: eta_k for every step k, shape `(steps,)`.
    - `solver`: gradient flow only: the name of the diffrax solver used.
    - `kinks`: gradient flow only: `"exact"` or `"smooth"`, how ReLU kinks were integrated
      (`None` for smooth activations).
    - `events`: exact kinks only: every crossing, slide and release (`flowsim.Events`: time,
      kind, layer, unit, data point; padded rows marked by `valid`).
    """

    ts: Float[Array, "*batch time"]
    models: Any
    loss: Float[Array, "*batch time"]
    steps: Int[Array, " time"] | None = None
    result: Any = None
    stats: dict[str, Array] = eqx.field(default_factory=dict)
    ledger: tuple[Float[Array, "*batch time units"], ...] | None = None
    learning_rates: Float[Array, " steps"] | None = None
    events: Any = None
    batched: bool = eqx.field(static=True, default=False)
    solver: str | None = eqx.field(static=True, default=None)
    kinks: str | None = eqx.field(static=True, default=None)

    @property
    def succeeded(self) -> Bool[Array, "*batch"]:
        """True for each trajectory that ended with `flowsim.RESULTS.successful`."""
        return self.result == RESULTS.successful

    @property
    def num_saved(self) -> int:
        return self.ts.shape[-1]

    def __getitem__(self, i: int) -> "Trajectory":
        """Trajectory `i` of a batch."""
        if not self.batched:
            raise TypeError("indexing selects one trajectory of a batch; this one is not batched")

        def pick(tree):
            return None if tree is None else jax.tree.map(lambda x: x[i], tree)

        return Trajectory(
            ts=self.ts[i],
            models=_map_arrays(lambda x: x[i], self.models),
            loss=self.loss[i],
            steps=self.steps,
            result=pick(self.result),
            stats=pick(self.stats),
            ledger=pick(self.ledger),
            learning_rates=self.learning_rates,
            events=pick(self.events),
            batched=False,
            solver=self.solver,
            kinks=self.kinks,
        )

    def model_at(self, k: int):
        """The model at saved index `k` (unbatched trajectories)."""
        if self.batched:
            raise TypeError("select a trajectory first: traj[i].model_at(k)")
        return _map_arrays(lambda x: x[k], self.models)

    def final_model(self):
        """The model at the last saved time (unbatched trajectories)."""
        return self.model_at(-1)

    def summary(self) -> str:
        """One line per trajectory: final time, final loss, status."""
        ts = np.atleast_2d(np.asarray(self.ts))
        loss = np.atleast_2d(np.asarray(self.loss))
        ok = np.atleast_1d(np.asarray(self.succeeded))
        lines = []
        for b in range(ts.shape[0]):
            status = "ok" if ok[b] else "FAILED"
            if "diverged_at" in self.stats and not ok[b]:
                step = int(np.atleast_1d(np.asarray(self.stats["diverged_at"]))[b])
                status = f"diverged at step {step}"
            lines.append(f"[{b}] t={ts[b, -1]:.6g} loss={loss[b, -1]:.6e} {status}")
        return "\n".join(lines)


def _map_arrays(fn, tree):
    dyn, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(fn, dyn), static)
