"""Compiled programs held in memory, against the process's limit on memory mappings.

XLA's CPU backend loads every kernel of a compiled program into memory mappings of its own
(code, constants, data: ~3 per kernel), and Linux allows a process `vm.max_map_count` of them
(65,530 by default). A small network's exact-kink event loop has ~1,000 kernels: the first
solve of the 3 -> 7 -> 5 -> 2 MLP of `scripts/kinks_first_call.py` takes the process from
1,044 mappings to 3,891, and `jax.clear_caches()` back to 880
(benchmarks/results/kinks_first_call.json). About twenty such programs held at once and the
next compilation fails inside LLVM ("Cannot allocate memory") and the process dies (SIGSEGV):
a sweep over many network sizes, a long notebook, a test run.

`release_if_crowded` does that, at the end of `gradient_flow` and `gradient_descent` (after
what they compiled), when the process holds more than `CROWDED` of its limit; later calls
recompile what they need.
"""

import gc
import logging
import threading

import jax

try:
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - JAX moved it: never release (never wrongly)
    def _trace_state_clean() -> bool:
        return False

logger = logging.getLogger("flowsim")

MAPS = "/proc/self/maps"
LIMIT = "/proc/sys/vm/max_map_count"

CROWDED = 0.5
"""Share of `vm.max_map_count` above which compiled programs are dropped: half leaves room for
one call's own programs (an exact-kink solve through every sliding capacity of the Fig 2
network, 1000 -> 100 -> 100 -> 10, compiles 8 event loops)."""

PROGRAM_MAPPINGS = 10_000
"""What one compiled program is assumed to add at most: looks at the mappings are skipped
while fewer compilations than (CROWDED x limit - mappings at the last look) / this happened
since. Reading /proc/self/maps costs ~1 ms per 1,000 mappings (23 ms at 20,793), too much
for every call; the small exact solve's programs (two capacities) add 2,665."""

# Recorded for every program XLA compiles, and for one loaded from the persistent cache.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]  # XLA compilations since the last look at the mappings
_allowance = [0]  # compilations that cannot reach the threshold, from the last look


def _count_compile(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def map_limit() -> int | None:
    """`vm.max_map_count`, or None where the system has no such file (not Linux)."""
    return _read_int(LIMIT)


def mappings() -> int | None:
    """The memory mappings this process holds (lines of /proc/self/maps), or None."""
    try:
        with open(MAPS, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return None


def release_if_crowded() -> bool:
    """Drops JAX's compiled programs (`jax.clear_caches()`) when this process holds more than
    `CROWDED` of its memory-mapping limit. Returns whether it did.

    Looks only after more compilations than `_allowance` since the last look (see
    `PROGRAM_MAPPINGS`), from the main thread, and outside any trace: a program another
    thread is running, or one being traced, is never pulled from under it."""
    if _compiles[0] <= _allowance[0] or threading.current_thread() is not \
            threading.main_thread() or not _trace_state_clean():
        return False
    _compiles[0] = 0
    limit, used = map_limit(), mappings()
    if limit is None or used is None:
        _allowance[0] = 2**62  # nothing to watch
        return False
    if used < CROWDED * limit:
        _allowance[0] = int((CROWDED * limit - used) // PROGRAM_MAPPINGS)
        return False
    jax.clear_caches()
    gc.collect()
    logger.info("released compiled programs: the process held %d memory mappings of its "
                "limit %d (vm.max_map_count), %s now; later calls recompile", used, limit,
                mappings())
    _compiles[0] = _allowance[0] = 0
    return True
