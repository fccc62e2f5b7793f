"""A batch run as its members, each through the single-trajectory program, on threads.

On the CPU a vmapped adaptive solve runs every member until the slowest one stops (its while
loop takes the most steps of any lane) and a branch some member takes runs for all; where the
members' step or event counts differ widely (ReLU networks) the single-trajectory program run
member by member is faster, and XLA releases the GIL while it runs, so members run on every
core at once.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np


def loop_threads(members: int, progress: bool = False, checkpoint=None) -> int:
    """Threads for a batch run as its members: one per CPU core (at most one per member); one
    with a progress bar or a checkpoint (Ctrl-C saves the member being solved).

    The programs are chains of small operations that keep one core busy: on 2 cores, the
    quickstart network (10 -> 20 -> 20 -> 3 ReLU, 64 points, T = 2, tol 1e-8) ran 16 members
    with exact kinks at 13.3 trajectories/s on two threads against 7.3 on one (1.81x), 32
    with smooth kinks at 8.1-9.0 against 4.2-4.3, bitwise equal."""
    if progress or checkpoint is not None:
        return 1
    return max(1, min(members, os.cpu_count() or 1))


def members(tree, size: int) -> list:
    """The `size` members of a batched pytree (leading axis), sliced here, in the calling
    thread: slicing compiles a small program per index, which threads should not do at once."""
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(size)]


def map_members(solve, items: list, threads: int):
    """`solve(item)` for each of `items`, outputs stacked along a new leading axis (on the
    default device). The first item runs first, alone: it compiles the program that the
    others share."""
    if threads <= 1:
        outs = [solve(x) for x in items]
    else:
        outs = [solve(items[0])]
        with ThreadPoolExecutor(threads) as pool:
            outs += list(pool.map(solve, items[1:]))
    # Stacked on the host: members of a batch sharded over devices come back on their own.
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *outs)


def batch_execution(execution: str) -> str:
    """How a batch runs: `"vmap"` (one vmapped loop) or `"loop"` (the single-trajectory program
    over the members, `loop_threads` at a time); `"auto"`: vmap on an
    accelerator, loop on the CPU.

    A vmapped loop runs every lane until its slowest member stops, and a branch that some
    lane takes runs for all (`problem.cond`). Quickstart network, 8 members, T = 2,
    tol 1e-8 (111-189 events each), on 2 CPU cores: 2.7 trajectories/s vmapped against
    6.1-7.9 as a loop of single solves (benchmarks/kinks_batch.py has the table)."""
    if execution == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return execution
