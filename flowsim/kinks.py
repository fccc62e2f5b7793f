"""How `gradient_flow` integrates through ReLU kinks: strategy objects (strings are shortcuts).

- `ExactKinks()` (`kinks="exact"`): piece by piece on fixed activation patterns, every pattern
  change located as an event, Filippov sliding along kinks (docs/kinks.md). One compiled
  program (`lax.while_loop` over the events), vmapped over a batch.
- `SmoothKinks()` (`kinks="smooth"`): the discontinuous vector field handed to the adaptive
  solver as it is: fast, but its error through kinks can be far above its tolerance.
- `kinks="auto"`: exact where supported and small enough (`EXACT_KINKS_MAX_SURFACES`), smooth
  otherwise, with a `KinksWarning` that says why and how to insist.
"""

import os
import warnings

import equinox as eqx

BATCH_EXECUTIONS = ("auto", "vmap", "loop")


class KinksWarning(UserWarning):
    """`kinks="auto"` chose the smooth path for a ReLU problem (its error through kinks can be
    far above the tolerance)."""


class AbstractKinks(eqx.Module):
    """How kinks are integrated (`ExactKinks`, `SmoothKinks`)."""


class SmoothKinks(AbstractKinks):
    """The adaptive solver on the discontinuous vector field, as it is."""


class ExactKinks(AbstractKinks):
    """Exact integration through kinks.

    **Arguments:**

    - `max_events`: the most pattern changes before the solve fails (`result` -1); the event
      record (`Trajectory.events`) keeps 2 `max_events` + 16 rows.
    - `checkpoint`: a file (.npz) for the loop's state: written every
      `flowsim._exact.checkpoint.CHECKPOINT_SECONDS` (60 s), on Ctrl-C and at the end, and
      resumed from if it exists (bitwise as if never stopped). A batch run as a loop keeps one
      file per member, `<stem>-<i><suffix>`.
    - `batch`: how a batch runs: `"vmap"` (one vmapped program, for accelerators), `"loop"`
      (the single-trajectory program over the members in turn, compiled once), `"auto"`
      (default): vmap on an accelerator, loop on the CPU (`flowsim._exact.solve.batch_execution`
      has the measurement).
    - `capacity`: the first static capacity of the sliding set (0: the loop compiles without
      the sliding solves until something slides; it grows to 8, 16, 32, ...).
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
        if self.batch not in BATCH_EXECUTIONS:
            raise ValueError(f"`batch` must be one of {', '.join(map(repr, BATCH_EXECUTIONS))}, "
                             f"got {self.batch!r}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or \
                self.capacity < 0:
            raise ValueError(f"`capacity` must be a non-negative integer, got {self.capacity!r}")


def warn_auto_smooth(surfaces: int, limit: int) -> None:
    warnings.warn(
        f"kinks='auto' integrates this ReLU network's {surfaces:,} pre-activation surfaces "
        f"(points x hidden units, above {limit:,}) with the smooth solver, whose error through "
        f"kinks can be far above rtol (check it with error_estimate=True); pass "
        f"kinks='exact' for the exact path or kinks='smooth' to silence this",
        KinksWarning, stacklevel=3)
