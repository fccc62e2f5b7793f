"""The exact ReLU flow as one compiled program: batches, compilation, checkpoints, strategies."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import flowsim
from flowsim._exact import driver, solve
from flowsim.models import TwoLayerReLU

T = 10.0
TOL = dict(solver="tsit5", rtol=1e-10, atol=1e-10)


def _problem():
    # Two-layer ReLU nets with three units on three points in R^2: up to four events per
    # member over t <= 10, sliding in half of the members, a release in one.
    k1, k2, _ = jr.split(jr.key(7), 3)
    return flowsim.losses.square(jr.normal(k1, (3, 2)), jr.normal(k2, (3,)))


def _nets(size, seed):
    key = jr.split(jr.key(7), 3)[2] if seed == 0 else jr.key(seed)
    return flowsim.init.batch(lambda k: TwoLayerReLU.random(2, 3, scale=1.0, key=k), size,
                              key=key)


def _member(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _rows(ev):
    valid = np.asarray(ev.valid)
    return list(zip(np.asarray(ev.kind)[valid].tolist(), np.asarray(ev.layer)[valid].tolist(),
                    np.asarray(ev.unit)[valid].tolist(), np.asarray(ev.point)[valid].tolist()))


def test_vmapped_batch_equals_single_solves_and_compiles_once():
    # 8 members in ONE vmapped call equal 8 single solves: identical event sequences, event
    # times and states to 1e-12; at a fixed capacity the batch compiles once, and a second
    # batch of new initialisations (same shapes) compiles nothing.
    loss = _problem()
    nets = _nets(8, 0)
    kinks = flowsim.ExactKinks(max_events=200, batch="vmap", capacity=4)
    before = driver.TRACES[0]
    batch = flowsim.gradient_flow(nets, loss, T, batched=True, kinks=kinks, **TOL)
    assert driver.TRACES[0] - before == 1
    assert np.all(np.asarray(batch.succeeded))
    events = np.asarray(batch.stats["num_events"])
    assert events.sum() >= 8 and np.asarray(batch.stats["num_sliding_intervals"]).sum() >= 2
    single_kinks = flowsim.ExactKinks(max_events=200, capacity=4)
    for i in range(8):
        one = flowsim.gradient_flow(_member(nets, i), loss, T, kinks=single_kinks, **TOL)
        mine = batch[i]
        assert _rows(one.events) == _rows(mine.events), i
        v = np.asarray(one.events.valid)
        assert np.max(np.abs(np.asarray(one.events.t)[v] - np.asarray(mine.events.t)[v]),
                      initial=0.0) <= 1e-12
        gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree.leaves(eqx.filter(one.models, eqx.is_inexact_array)),
            jax.tree.leaves(eqx.filter(mine.models, eqx.is_inexact_array))))
        assert gap <= 1e-12, (i, gap)
        for key in ("num_steps", "num_events", "num_crossings", "num_sliding_intervals"):
            assert int(one.stats[key]) == int(mine.stats[key]), (i, key)
    before = driver.TRACES[0]
    flowsim.gradient_flow(_nets(8, 1), loss, T, batched=True, kinks=kinks, **TOL)
    assert driver.TRACES[0] == before
    # The batch run as a loop of the single-trajectory program (the CPU default) gives the
    # same: the events identical, the states to 1e-12.
    looped = flowsim.gradient_flow(nets, loss, T, batched=True, **TOL,
                                   kinks=flowsim.ExactKinks(max_events=200, batch="loop"))
    for i in range(8):
        assert _rows(looped[i].events) == _rows(batch[i].events)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(eqx.filter(looped.models, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(batch.models, eqx.is_inexact_array))))
    assert gap <= 1e-12


def test_capacity_grows_and_compiles_at_most_log2():
    # From capacity 0 a solve whose sliding set reaches K entries runs at capacities 0, 8,
    # 16, ...: it compiles at most max(2, ceil(log2 K) - 1) times, and the result equals a
    # solve started at a larger capacity (events identical, states to 1e-12).
    from flowsim._exact.state import next_capacity

    assert [next_capacity(k) for k in (0, 1, 4, 8, 16)] == [8, 8, 8, 16, 32]
    loss = _problem()
    net = _member(_nets(16, 0), 3)
    before = driver.TRACES[0]
    grown = flowsim.gradient_flow(net, loss, T, kinks=flowsim.ExactKinks(capacity=0), **TOL)
    K = int(grown.stats["num_sliding_max"])
    assert K == 2
    assert driver.TRACES[0] - before <= max(2, int(np.ceil(np.log2(K))) - 1)
    fixed = flowsim.gradient_flow(net, loss, T, kinks=flowsim.ExactKinks(capacity=16), **TOL)
    assert _rows(grown.events) == _rows(fixed.events)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(eqx.filter(grown.models, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(fixed.models, eqx.is_inexact_array))))
    assert gap <= 1e-12


def test_capacity_shrinks_with_the_sliding_set(monkeypatch):
    # A single solve whose sliding set holds at most a quarter of its capacity moves to the
    # smallest capacity that holds twice the set (never below 8), once the event is handled;
    # a vmapped batch keeps one capacity. Events identical, states to 1e-12.
    from flowsim._exact.state import next_capacity, shrinks

    assert [next_capacity(64, n) for n in (0, 3, 4, 5, 16, 17)] == [8, 8, 8, 16, 32, 128]
    assert [bool(shrinks(k, 2)) for k in (8, 16)] == [False, True]
    seen = []

    def recording(state, capacity):
        seen.append((state.capacity, capacity, int(jnp.max(state.n)),
                     bool(jnp.any(state.pending))))
        return repad(state, capacity)

    repad = solve.repad
    monkeypatch.setattr(solve, "repad", recording)
    loss = _problem()
    net = _member(_nets(16, 0), 3)
    small = flowsim.gradient_flow(net, loss, T, kinks=flowsim.ExactKinks(capacity=8), **TOL)
    assert seen == []
    assert int(small.stats["num_sliding_max"]) == 2
    large = flowsim.gradient_flow(net, loss, T, kinks=flowsim.ExactKinks(capacity=32), **TOL)
    # Shrunk after the first event handled (nothing pending), straight to 8.
    assert seen == [(32, 8, int(seen[0][2]), False)] and seen[0][2] <= 2
    assert _rows(small.events) == _rows(large.events)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(eqx.filter(small.models, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(large.models, eqx.is_inexact_array))))
    assert gap <= 1e-12
    seen.clear()
    flowsim.gradient_flow(_nets(2, 0), loss, T, batched=True, **TOL,
                          kinks=flowsim.ExactKinks(capacity=32, batch="vmap"))
    assert seen == []


@pytest.mark.parametrize("capacity", [0, 32])
def test_chunks_and_checkpoint_resume_bitwise(tmp_path, monkeypatch, capacity):
    # A solve run in chunks of one event, written to its checkpoint after each, then killed and
    # resumed, ends bitwise equal to the solve run in one call; also through a capacity that
    # comes down (32 -> 8) after the first event.
    from flowsim._exact import checkpoint

    loss = _problem()
    net = _member(_nets(16, 0), 5)
    kinks = dict(capacity=capacity)
    whole = flowsim.gradient_flow(net, loss, T, kinks=flowsim.ExactKinks(**kinks), **TOL)
    assert int(whole.stats["num_events"]) >= 3
    monkeypatch.setattr(checkpoint, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(solve, "_FIRST_CHUNK", 1)
    monkeypatch.setattr(solve, "_CHUNK_SECONDS", 0.0)
    run, calls = driver.run, []

    def killed(*args, **kw):
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run(*args, **kw)

    monkeypatch.setattr(driver, "run", killed)
    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        flowsim.gradient_flow(net, loss, T, kinks=flowsim.ExactKinks(checkpoint=path, **kinks),
                              **TOL)
    info = checkpoint.checkpoint_info(path)
    assert not info["done"] and 0 < info["t"] < T and info["stats"]["num_events"] >= 1
    if capacity:
        assert info["capacity"] == 8  # written after the capacity came down
    saved = checkpoint.checkpoint_info(path, states=True)
    assert saved["filled"].shape == (2,) and saved["saved"][0].shape[0] == 2
    monkeypatch.setattr(driver, "run", run)
    resumed = flowsim.gradient_flow(net, loss, T, **TOL,
                                    kinks=flowsim.ExactKinks(checkpoint=path, **kinks))
    for a, b in zip(jax.tree.leaves(eqx.filter(whole.models, eqx.is_inexact_array)),
                    jax.tree.leaves(eqx.filter(resumed.models, eqx.is_inexact_array))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert _rows(whole.events) == _rows(resumed.events)
    assert {k: int(v) for k, v in whole.stats.items() if k.startswith("num")} == \
        {k: int(v) for k, v in resumed.stats.items() if k.startswith("num")}
    assert checkpoint.checkpoint_info(path)["done"]


@pytest.mark.parametrize("bad, match", [
    (dict(max_events=-1), "`max_events` must be a non-negative integer, got -1"),
    (dict(batch="threads"), "`batch` must be one of 'auto', 'vmap', 'loop', got 'threads'"),
    (dict(capacity=2.5), "`capacity` must be a non-negative integer, got 2.5"),
])
def test_exact_kinks_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        flowsim.ExactKinks(**bad)


def test_event_loop_is_kept_by_the_persistent_compilation_cache(tmp_path):
    # The event loop holds no host callback (diffrax's argument checks are not traced, and
    # equinox is as it was after), so JAX's persistent compilation cache stores it:
    # with the in-memory caches dropped, the same solve loads it from disk and gives the
    # same trajectory bitwise.
    import equinox._errors as eqx_errors
    from jax.experimental.compilation_cache import compilation_cache

    loss, net = _problem(), _member(_nets(2, 0), 1)
    kinks = flowsim.ExactKinks(capacity=4)
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    impl, cache_dir = eqx_errors.branched_error_if_impl_jit, jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()  # a cache set up before would take the entries
    jax.monitoring.register_event_listener(listener)
    try:
        assert flowsim.enable_compilation_cache(tmp_path) == tmp_path
        jax.clear_caches()
        first = flowsim.gradient_flow(net, loss, T, kinks=kinks, **TOL)
        assert eqx_errors.branched_error_if_impl_jit is impl
        stored = [p.name for p in tmp_path.iterdir() if p.name.startswith("jit_run-")]
        assert len(stored) == 1, sorted(p.name for p in tmp_path.iterdir())
        jax.clear_caches()
        hits.clear()
        again = flowsim.gradient_flow(net, loss, T, kinks=kinks, **TOL)
        assert hits, "the event loop was compiled again, not loaded"
    finally:
        jax.monitoring.unregister_event_listener(listener)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        compilation_cache.reset_cache()
    assert int(first.stats["num_events"]) >= 1
    for a, b in zip(jax.tree.leaves(eqx.filter(first.models, eqx.is_inexact_array)),
                    jax.tree.leaves(eqx.filter(again.models, eqx.is_inexact_array))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert _rows(first.events) == _rows(again.events)
