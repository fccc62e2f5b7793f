"""How a solve ended: one result enumeration for the flow and for descent, and its failure
reports (`FlowFailed` with `throw=True`, a `FlowWarning` otherwise)."""

import warnings

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np


class RESULTS(dfx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """How each trajectory of a solve ended: diffrax's results (which extend optimistix's) and
    flowsim's own. `Trajectory.result` holds one per trajectory.

    Compare with `==`: `traj.result == flowsim.RESULTS.successful` is a boolean array (one entry
    per trajectory); `flowsim.RESULTS[traj[i].result]` is the message of trajectory i.

    flowsim's own results:

    - `max_events_reached`: the exact-kink path met more activation changes than `max_events`.
    - `stopped_early`: the exact-kink path stopped before t1 (a piece failed).
    - `diverged`: the state or loss stopped being finite, or the loss fell without bound (a
      finite-time blow-up); for gradient descent, a non-finite loss or iterate.

    **Example:**

    ```python
    import jax.numpy as jnp, jax.random as jr, flowsim
    mf = flowsim.models.MatrixFactorization.random(2, 2, 2, scale=0.1, key=jr.key(0))
    traj = flowsim.gradient_flow(mf, flowsim.losses.factorization(jnp.eye(2)), 1.0)
    assert traj.result == flowsim.RESULTS.successful
    ```
    """

    max_events_reached = ("more kink events than max_events; raise ExactKinks(max_events=...) "
                          "or use kinks='smooth'")
    stopped_early = "the piecewise (exact-kink) solve stopped before t1"
    diverged = "diverged (non-finite state or loss, or a loss falling without bound)"


class FlowFailed(RuntimeError):
    """A gradient-flow solve did not reach t1 (with `throw=True`)."""


class FlowWarning(RuntimeWarning):
    """Some trajectories of a gradient-flow solve failed (`throw=False`)."""


def codes(result) -> np.ndarray:
    """The integer codes (indices into `RESULTS`) of a concrete result, as a NumPy array."""
    return np.asarray(result._value)


def from_codes(code) -> RESULTS:
    """A `RESULTS` item holding the integer codes `code` (an array, possibly traced)."""
    dtype = RESULTS.successful._value.dtype
    return jax.tree.map(lambda _: jnp.asarray(code, dtype), RESULTS.successful)


def message(code: int) -> str:
    """The first line of the message of result `code`."""
    messages = RESULTS._index_to_message
    text = messages[code] if 0 <= code < len(messages) else f"result code {code}"
    return text.split("\n")[0].rstrip(".")


def report_failures(result, t_reached, throw: bool, max_steps: int, details=None,
                    t0: float | None = None) -> None:
    """Raise `FlowFailed` (`throw`) or warn `FlowWarning` naming up to five failed trajectories,
    with advice by cause. `details`: {trajectory: reason} for the diverged ones."""
    code = np.atleast_1d(codes(result))
    bad = np.flatnonzero(code != 0)
    if bad.size == 0:
        return
    details = details or {}
    t_reached = np.broadcast_to(np.atleast_1d(np.asarray(t_reached)), code.shape)
    diverged = RESULTS.diverged._value
    msgs = []
    for i in bad[:5]:
        if int(code[i]) == diverged:
            why = details.get(int(i), "non-finite state or loss")
            msgs.append(f"trajectory {i}: diverged ({why}) at t = {t_reached[i]:.10g}")
        else:
            msgs.append(f"trajectory {i}: {message(int(code[i]))}")
    advice = []
    if np.any(code[bad] == diverged):
        t_min = float(np.min(t_reached[bad][code[bad] == diverged]))
        if t0 is not None and t_min <= t0:
            advice.append("the loss or its gradient is not finite at the initial model; check "
                          "the loss and its data")
        else:
            advice.append(f"the flow diverges: the loss is unbounded below or the flow blows up "
                          f"in finite time; check the loss (and its data) or stop before the "
                          f"blow-up with t1 < {t_min:.6g}")
    if not np.all(np.isin(code[bad], (RESULTS.max_events_reached._value, diverged))):
        advice.append(f"increase max_steps (now {max_steps}), loosen rtol/atol, or pick a stiff "
                      f"solver (solver='rodas5p') if the problem is stiff")
    advice.append("pass throw=False to keep the other results" if throw else
                  "the results up to the failure are kept (Trajectory.result marks it)")
    text = (f"gradient flow failed: {'; '.join(msgs)}{' ...' if bad.size > 5 else ''}. "
            f"{'; '.join(advice)}")
    if throw:
        raise FlowFailed(text)
    warnings.warn(text, FlowWarning, stacklevel=4)
