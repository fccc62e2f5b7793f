"""How `gradient_flow` integrates through ReLU kinks: strategy objects (strings are shortcuts).

- `ExactKinks()` (`kinks="exact"`): piece by piece on fixed activation patterns, every pattern
  change located as an event, Filippov sliding along kinks (docs/kinks.md). One compiled
  program (`lax.while_loop` over the events), vmapped over a batch.
- `SmoothKinks()` (`kinks="smooth"`): the discontinuous vector field handed to the adaptive
  solver as it is: fast, but its error through kinks can be far above its tolerance.
- `AutoKinks()` (`kinks="auto"`, the default): exact where supported and small enough
  (`EXACT_KINKS_MAX_SURFACES`), smooth otherwise, with a `KinksWarning` that says why and how
  to insist.
"""

import math
import os
import warnings

import equinox as eqx
import jax

BATCH_EXECUTIONS = ("auto", "vmap", "loop")

EXACT_KINKS_MAX_SURFACES = 20_000
"""`AutoKinks` integrates kinks exactly up to this many pre-activation surfaces (points x hidden
units) and hands them to the adaptive solver above, with a `KinksWarning`.

Exact events grow with the surfaces: the Du–Hu–Lee Fig 2 network (200,000 surfaces) meets
63,417 events to t = 20 (docs/kinks.md).
"""


class KinksWarning(UserWarning):
    """`kinks="auto"` chose the smooth path for a ReLU problem (its error through kinks can be
    far above the tolerance)."""


class AbstractKinks(eqx.Module):
    """How kinks are integrated (`ExactKinks`, `SmoothKinks`)."""


class SmoothKinks(AbstractKinks):
    """The adaptive solver on the discontinuous vector field, as it is: fast where few kinks
    are crossed; stalls in a sliding mode (reported as a max_steps failure).

    **Arguments:**

    - `batch`: how a batch of a model with kinks runs: `"vmap"` (one vmapped solve), `"loop"`
      (the single-trajectory solve over the members, one thread per CPU core), `"auto"`
      (default): loop on the CPU, vmap on an accelerator. Batches of models without kinks
      (and those counting evaluations or showing progress) are always vmapped. On the CPU
      the members' step counts differ with the kinks they meet, and a vmapped solve takes
      the most steps of any member: quickstart network, 32 members, 8.1-9.0
      trajectories/s as a loop against 1.9 vmapped (`flowsim._members.loop_threads`).

    **Example:**

    ```python
    import jax.random as jr, flowsim
    X = jr.normal(jr.key(0), (8, 2)); Y = X[:, :1]
    net = flowsim.models.MLP((2, 3, 1), "relu", key=jr.key(1))
    traj = flowsim.gradient_flow(net, flowsim.losses.square(X, Y), 1.0,
                                 kinks=flowsim.SmoothKinks())
    assert traj.kinks == "smooth"
    ```
    """

    batch: str = "auto"

    def __check_init__(self):
        _check_batch(self.batch)


def _check_batch(batch):
    if batch not in BATCH_EXECUTIONS:
        raise ValueError(f"`batch` must be one of {', '.join(map(repr, BATCH_EXECUTIONS))}, "
                         f"got {batch!r}")


class ExactKinks(AbstractKinks):
    """Exact integration through kinks.

    **Arguments:**

    - `max_events`: the most pattern changes before the solve fails
      (`RESULTS.max_events_reached`); the event record (`Trajectory.events`) keeps
      2 `max_events` + 16 rows.
    - `checkpoint`: a file (.npz) for the loop's state: written every
      `flowsim._exact.checkpoint.CHECKPOINT_SECONDS` (60 s), on Ctrl-C and at the end, and
      resumed from if it exists (bitwise as if never stopped). A batch run as a loop keeps one
      file per member, `<stem>-<i><suffix>`.
    - `batch`: how a batch runs: `"vmap"` (one vmapped program, for accelerators), `"loop"`
      (the single-trajectory program over the members, compiled once, one thread per CPU
      core), `"auto"` (default): vmap on an accelerator, loop on the CPU
      (`flowsim._members.batch_execution` and `loop_threads` have the measurements).
    - `capacity`: the first static capacity of the sliding set (0: the loop compiles without
      the sliding solves until something slides; it grows to 8, 16, 32, ...; a single
      solve's capacity comes down again, to no less than 8, when the set falls to a quarter
      of it: an event's cost follows the capacity).

    **Example:**

    ```python
    import jax.random as jr, flowsim
    X = jr.normal(jr.key(0), (8, 2)); Y = X[:, :1]
    net = flowsim.models.MLP((2, 3, 1), "relu", key=jr.key(1))
    traj = flowsim.gradient_flow(net, flowsim.losses.square(X, Y), 1.0,
                                 kinks=flowsim.ExactKinks(max_events=100))
    assert traj.kinks == "exact" and int(traj.stats["num_events"]) <= 100
    ```
    """

    max_events: int = 10_000
    checkpoint: str | os.PathLike | None = None
    batch: str = "auto"
    capacity: int = 0

    def __check_init__(self):
        if isinstance(self.max_events, bool) or not isinstance(self.max_events, int) or \
                self.max_events < 0:
            raise ValueError(f"`max_events` must be a non-negative integer, got "
                             f"{self.max_events!r}")
        _check_batch(self.batch)
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or \
                self.capacity < 0:
            raise ValueError(f"`capacity` must be a non-negative integer, got {self.capacity!r}")


class AutoKinks(AbstractKinks):
    """`exact` where the model and loss support exact kinks and the data has at most
    `max_surfaces` pre-activation surfaces (points x hidden units); smooth otherwise, with a
    `KinksWarning` where the model has kinks.

    **Example:**

    ```python
    import flowsim
    auto = flowsim.AutoKinks(exact=flowsim.ExactKinks(max_events=20_000))
    assert auto.max_surfaces == flowsim.kinks.EXACT_KINKS_MAX_SURFACES
    ```
    """

    exact: ExactKinks = ExactKinks()
    max_surfaces: int = EXACT_KINKS_MAX_SURFACES


_SHORTCUTS = {"auto": AutoKinks, "exact": ExactKinks, "smooth": SmoothKinks}


def resolve(kinks, model, loss) -> ExactKinks | None:
    """The `ExactKinks` a solve of `model` (one member) on `loss` runs, or None for smooth."""
    from ._exact.problem import supports_kinks  # the exact path's view of a model

    if isinstance(kinks, str) and kinks in _SHORTCUTS:
        kinks = _SHORTCUTS[kinks]()
    if not isinstance(kinks, AbstractKinks):
        raise ValueError(f"`kinks` must be 'auto', 'exact', 'smooth' or a strategy "
                         f"(flowsim.AutoKinks(), ExactKinks(...), SmoothKinks()), got {kinks!r}")
    if isinstance(kinks, SmoothKinks):
        return None
    supported = supports_kinks(model, loss)
    if isinstance(kinks, ExactKinks):
        if not supported:
            raise ValueError(
                "kinks='exact' needs a flowsim.models model with ReLU-type activations (each an "
                "AbstractPiecewiseLinear, some with kinks) and a data loss "
                "(flowsim.losses.AbstractDataLoss: square, logistic); use kinks='smooth'")
        return kinks
    assert isinstance(kinks, AutoKinks)
    surfaces = 0
    if supported:
        pre = jax.eval_shape(lambda m: m.forward(loss.X)[1], model)
        surfaces = sum(math.prod(z.shape) for z in pre)
        if surfaces <= kinks.max_surfaces:
            return kinks.exact
    if kinks.exact.checkpoint is not None:
        raise ValueError(
            "`checkpoint` is for the exact-kink path, but AutoKinks takes the smooth path on "
            "this problem; pass kinks=ExactKinks(checkpoint=...) to insist, or drop checkpoint")
    if supported:
        warn_auto_smooth(surfaces, kinks.max_surfaces)
    return None


def warn_auto_smooth(surfaces: int, limit: int) -> None:
    warnings.warn(
        f"kinks='auto' integrates this ReLU network's {surfaces:,} pre-activation surfaces "
        f"(points x hidden units, above {limit:,}) with the smooth solver, whose error through "
        f"kinks can be far above rtol (check it with flowsim.estimate_error); pass "
        f"kinks='exact' for the exact path or kinks='smooth' to silence this",
        KinksWarning, stacklevel=6)
