import os

# Four host devices for the sharding tests. Backend optimisation level 0: the suite's run time
# is mostly XLA compiling (the exact-kink pieces: 3-9 s each at the default level); level 0
# about halves that (the convnet invariants test: 54 s -> 33 s, most of it compiling), and the
# numbers differ from an optimised build at rounding level only (no fast math either way), far
# inside every tolerance the tests state.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
# The suite runs in two processes (pytest-xdist, `-n 2 --dist loadfile` in pyproject.toml: a
# file's tests in one process, so its module fixtures and compiled pieces are built once; 302 s
# against 625 s in one process at the default optimisation level, on 2 cores). On a GPU each
# process allocates what it uses, not 75 % of the memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The command line keeps compiled programs in ~/.cache/flowsim/jax; the suite writes nothing
# there (tests/test_cache.py checks the setting, test_exact.py the cache itself).
os.environ.setdefault("FLOWSIM_COMPILATION_CACHE", "off")

import jax
import jax.random as jr
import pytest

import flowsim  # noqa: F401  (enables float64)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def getkey():
    """A fresh PRNG key each call, deterministic per test."""
    state = {"key": jr.key(5678)}

    def _getkey():
        state["key"], sub = jr.split(state["key"])
        return sub

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test file ends by dropping JAX's compiled programs: a worker runs dozens of files,
    and each compiled program holds memory mappings (~3,000 for a small exact-kink event
    loop) against the process's vm.max_map_count (`flowsim._programs`). A file's own tests
    still share what they compile."""
    yield
    jax.clear_caches()
    import gc

    gc.collect()


@pytest.fixture(autouse=True)
def _room_for_programs():
    """After each test, the check `gradient_flow` makes at its end: tests that compile
    through lower-level calls count too. A worker whose programs reached the limit died
    inside LLVM's next compilation (SIGSEGV)."""
    yield
    from flowsim._programs import release_if_crowded

    release_if_crowded()
