import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

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
