"""The persistent compilation cache's switch: `flowsim.enable_compilation_cache` and the
command line's `FLOWSIM_COMPILATION_CACHE` (the cache itself: tests/test_exact.py)."""

import pathlib

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

import flowsim
from flowsim import _cache
from flowsim.cli import main as cli_main

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "quickstart.toml"


@pytest.fixture
def cache_config():
    """JAX's cache directory as it was, restored after the test."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def test_enable_sets_jax_cache_dir_and_creates_it(tmp_path, cache_config):
    where = tmp_path / "a" / "b"
    assert flowsim.enable_compilation_cache(where) == where
    assert where.is_dir() and jax.config.jax_compilation_cache_dir == str(where)
    # A directory JAX already has is kept, not replaced.
    assert flowsim.enable_compilation_cache(tmp_path / "other") == where
    assert jax.config.jax_compilation_cache_dir == str(where)


def test_environment_chooses_the_directory_or_turns_it_off(tmp_path, monkeypatch, cache_config):
    monkeypatch.setenv(_cache.CACHE_ENV, "off")
    assert flowsim.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv(_cache.CACHE_ENV, str(tmp_path / "env"))
    assert flowsim.enable_compilation_cache() == tmp_path / "env"


def test_default_directory_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache.default_cache_dir() == tmp_path / "flowsim" / "jax"


def test_unwritable_directory_is_one_line_naming_the_setting(tmp_path, monkeypatch, capsys,
                                                            cache_config):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=_cache.CACHE_ENV):
        flowsim.enable_compilation_cache(blocker / "jax")
    monkeypatch.setenv(_cache.CACHE_ENV, str(blocker / "jax"))
    rc = cli_main(["sweep", str(EXAMPLE), "--dry-run", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and _cache.CACHE_ENV in err, err
    assert jax.config.jax_compilation_cache_dir is None


def test_command_line_turns_the_cache_on(tmp_path, monkeypatch, capsys, cache_config):
    monkeypatch.setenv(_cache.CACHE_ENV, str(tmp_path / "cli"))
    rc = cli_main(["sweep", str(EXAMPLE), "--dry-run", "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cli")


def test_default_directory_that_cannot_be_made_warns_and_goes_on(tmp_path, monkeypatch,
                                                                 cache_config):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.delenv(_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(UserWarning, match="compiling without it"):
        assert flowsim.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_smooth_flow_program_is_stored(tmp_path, cache_config):
    # The smooth solve's arguments are checked on the host, so its program holds no host
    # callback and the cache keeps it.
    import jax.numpy as jnp
    import jax.random as jr

    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        flowsim.enable_compilation_cache(tmp_path)
        jax.clear_caches()
        mf = flowsim.models.MatrixFactorization.random(3, 3, 2, scale=0.1, key=jr.key(5))
        traj = flowsim.gradient_flow(mf, flowsim.losses.factorization(jnp.eye(3)), 0.5,
                                     solver="tsit5", dt0=0.01)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
    assert bool(traj.succeeded)
    assert any(p.name.startswith("jit__flow_solve-") for p in tmp_path.iterdir()), \
        sorted(p.name for p in tmp_path.iterdir())


def test_proven_checks_skip_only_the_solve_argument_checks():
    # Inside `proven_solve_checks` diffrax's check of dt0's sign is not traced (a negative
    # dt0 runs); any other `error_if` is, and outside it the same check raises again.
    import diffrax as dfx
    import equinox as eqx
    import jax.numpy as jnp

    def solve(dt0):
        return dfx.diffeqsolve(dfx.ODETerm(lambda t, y, a: -y), dfx.Euler(), 0.0, 1.0, dt0,
                               jnp.array(1.0), max_steps=4, throw=False).ys

    def other(x):
        return eqx.error_if(x, x < 0, "x must be >= 0")

    with _cache.proven_solve_checks():
        jax.block_until_ready(jax.jit(solve)(jnp.array(-0.5)))
        with pytest.raises(Exception, match="x must be >= 0"):
            jax.block_until_ready(jax.jit(other)(jnp.array(-1.0)))
    with pytest.raises(Exception, match=r"dt0 >= 0"):
        jax.block_until_ready(jax.jit(lambda d: solve(d) + 0.0)(jnp.array(-0.5)))
