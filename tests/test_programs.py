"""Compiled programs are dropped before the process runs out of memory mappings
(`flowsim._programs`)."""

import threading

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import flowsim
from flowsim import _programs

pytestmark = pytest.mark.skipif(_programs.mappings() is None or _programs.map_limit() is None,
                                reason="no /proc/self/maps or vm.max_map_count (not Linux)")


def _compiled_fn():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    f(jnp.arange(7.0)).block_until_ready()
    assert f._cache_size() == 1 and _programs._compiles[0] > 0
    return f


def _crowded(monkeypatch):
    # A limit the process already holds more than CROWDED of.
    monkeypatch.setattr(_programs, "map_limit", lambda: _programs.mappings())


def test_mappings_are_counted():
    used, limit = _programs.mappings(), _programs.map_limit()
    assert 100 < used < limit
    fs = [jax.jit(lambda x, i=i: jnp.cos(x) + i) for i in range(20)]
    for f in fs:
        f(jnp.ones(3)).block_until_ready()
    # ~6 mappings per small compiled program on XLA's CPU backend.
    assert _programs.mappings() > used + 20


def test_release_when_crowded(monkeypatch):
    f = _compiled_fn()
    _programs._allowance[0] = 0
    _crowded(monkeypatch)
    assert _programs.release_if_crowded()
    assert f._cache_size() == 0 and _programs._compiles[0] == 0
    # Nothing compiled since: no second look, however crowded.
    assert not _programs.release_if_crowded()


def test_kept_below_the_limit(monkeypatch):
    f = _compiled_fn()
    _programs._allowance[0] = 0
    monkeypatch.setattr(_programs, "map_limit", lambda: 10 * _programs.mappings())
    assert not _programs.release_if_crowded()
    assert f._cache_size() == 1


def test_never_from_another_thread_or_inside_a_trace(monkeypatch):
    f = _compiled_fn()
    _programs._allowance[0] = 0
    _crowded(monkeypatch)
    released = []
    t = threading.Thread(target=lambda: released.append(_programs.release_if_crowded()))
    t.start()
    t.join()

    @jax.jit
    def traced(x):
        released.append(_programs.release_if_crowded())
        return x + 1.0

    traced(jnp.ones(2))
    assert released == [False, False] and f._cache_size() == 1


def test_gradient_flow_releases_then_recompiles(monkeypatch):
    X, Y = jr.normal(jr.key(0), (6, 2)), jr.normal(jr.key(1), (6, 1))
    net = flowsim.models.MLP((2, 3, 1), "tanh", key=jr.key(2))
    loss = flowsim.losses.square(X, Y)

    def solve():
        return flowsim.gradient_flow(net, loss, 1.0, solver="tsit5", rtol=1e-8, atol=1e-8)

    first = solve()
    _programs._compiles[0] = 0
    solve()
    assert _programs._compiles[0] == 0  # compiled once, reused
    _programs._compiles[0], _programs._allowance[0] = 1, 0
    _crowded(monkeypatch)
    solve()  # looks at its end: crowded, so releases
    assert _programs._compiles[0] == 0
    monkeypatch.setattr(_programs, "map_limit", lambda: 10 * _programs.mappings())
    compiled = []

    def listen(event, duration, **kwargs):
        if event == _programs._COMPILE_EVENT:
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        again = solve()  # compiled anew
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiled
    assert jnp.array_equal(again.loss, first.loss)


def test_looks_are_spaced_by_the_room_left(monkeypatch):
    # Reading /proc/self/maps costs ~1 ms per 1,000 mappings: after a look, the next waits
    # for as many compilations as could not reach the threshold at PROGRAM_MAPPINGS each.
    _programs._compiles[0], _programs._allowance[0] = 1, 0
    used = _programs.mappings()
    room = 5 * _programs.PROGRAM_MAPPINGS
    monkeypatch.setattr(_programs, "map_limit", lambda: int((used + room) / _programs.CROWDED))
    assert not _programs.release_if_crowded()
    assert 4 <= _programs._allowance[0] <= 5
    looked = []
    monkeypatch.setattr(_programs, "mappings", lambda: looked.append(1) or used)
    _programs._compiles[0] = _programs._allowance[0]
    assert not _programs.release_if_crowded() and not looked  # within the allowance
    _programs._compiles[0] += 1
    _programs.release_if_crowded()
    assert looked == [1]


def test_programs_loaded_from_the_disk_cache_count(tmp_path):
    # A program loaded from JAX's persistent cache holds its mappings too: it must count.
    from jax.experimental.compilation_cache import compilation_cache

    settings = {"jax_compilation_cache_dir": str(tmp_path / "jax"),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {k: getattr(jax.config, k) for k in settings}
    hits = []

    def listen(event, **kwargs):
        hits.append(event)

    try:
        for k, v in settings.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
        x = jnp.arange(3.0)
        f = jax.jit(lambda x: jnp.tanh(x) * 5.0 - x)
        f(x).block_until_ready()
        assert any((tmp_path / "jax").iterdir())  # written to disk
        jax.clear_caches()
        _programs._compiles[0] = 0
        jax.monitoring.register_event_listener(listen)
        hits.append("registered")
        f(x).block_until_ready()  # loaded from disk
        assert "/jax/compilation_cache/cache_hits" in hits
        assert _programs._compiles[0] == 1
    finally:
        if hits:
            jax.monitoring.unregister_event_listener(listen)
        for k, v in before.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
