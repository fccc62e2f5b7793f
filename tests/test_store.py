"""The sweep store under faults: damaged point files, concurrent writers, kills at any moment."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flowsim import sweep
from flowsim.sweep._store import to_toml

# GD only, tiny: a point runs in milliseconds once compiled, so a sweep is mostly start-up.
N_POINTS = 48
CFG = {
    "problem": {"sizes": [3, 4, 4, 2], "activation": "relu", "n": 8},
    "init": {"scheme": "balanced", "variance": 0.2, "seeds": 6},
    "gd": {"eta0": 0.1, "delta": [round(0.01 * i, 2) for i in range(N_POINTS)], "steps": 40,
           "save_every": 10},
    "metrics": {"record": ["loss", "invariants", "drift", "ledger"]},
}


def _same(a, b):
    """Identical results: every metric bitwise equal (timings excluded)."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        if not name.endswith("_seconds"):
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh") / "o"
    sweep.run(CFG, out, progress=False)
    return out


def _cmd(cfg_path, out, *extra):
    return [sys.executable, "-m", "flowsim", "sweep", str(cfg_path), "--out", str(out),
            "--quiet", *extra]


@pytest.mark.timeout(120)
def test_damaged_points_are_recomputed_on_resume(tmp_path, uninterrupted, capsys):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(uninterrupted, out)
    files = sorted((out / "points").glob("*.nc"))
    empty, truncated = files[3], files[7]
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(sweep.ConfigError, match=str(empty)):
        sweep.load(out)
    res = sweep.run(CFG, out, resume=True)
    err = capsys.readouterr().err
    assert (res.ran, res.skipped) == (2, N_POINTS - 2)
    for path, what in ((empty, "empty"), (truncated, "3000 bytes")):
        assert f"{path}: cannot be opened ({what}" in err and "computing the point again" in err
    assert sorted(p.name.split(".nc")[0] for p in (out / "points" / "bad").iterdir()) == \
        sorted(p.stem for p in (empty, truncated))
    _same(sweep.load(out), sweep.load(uninterrupted))


# Slow points (~0.6 s each on 2 cores): after its first point the first sweep still writes for
# ~7 s, several times the start-up of the second one (~2 s).
SLOW = {**CFG, "gd": {**CFG["gd"], "delta": [round(0.04 * i, 2) for i in range(12)],
                      "steps": 100_000, "save_every": 20_000}}


@pytest.mark.timeout(180)
def test_a_second_sweep_into_a_store_exits_2(tmp_path):
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(to_toml(SLOW))
    out = tmp_path / "o"
    first = subprocess.Popen(_cmd(cfg_path, out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if any((out / "points").glob("*.nc")) if (out / "points").exists() else False:
                break  # past its start-up (and its cleaning of stale temporary files)
            time.sleep(0.01)
        assert first.poll() is None, "the first sweep should still be running"
        # A temporary file of the live writer: the refused sweep must leave it alone.
        mine = out / "points" / f".x.nc.{first.pid}.abc.tmp"
        mine.write_bytes(b"in flight")
        second = subprocess.run(_cmd(cfg_path, out), capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None, "the first sweep should have been running throughout"
        assert second.returncode == 2, second.stderr
        assert f"another sweep is writing to this store (pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr and mine.exists()
        mine.unlink()
        _, err = first.communicate(timeout=150)
        assert first.returncode == 0, err
        assert int(sweep.load(out)["finished"].sum()) == len(SLOW["gd"]["delta"])
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stderr.close()


@pytest.mark.timeout(300)
def test_five_kills_then_resume_equal_an_uninterrupted_run(tmp_path, uninterrupted):
    """SIGKILL at five random moments, each run resumed with --resume; then a last --resume
    finishes. The first kill lands while the sweep starts (compiling), the others at random
    moments among its point writes (~50 ms a point). Never a corrupt store, no lost point."""
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(to_toml(CFG))
    out = tmp_path / "o"
    rng = np.random.default_rng(7)
    # A persistent compilation cache: the restarts load the compiled programs instead of
    # compiling them again (the kills then land among point writes, not in XLA).
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    def count():
        return len(list((out / "points").glob("*.nc"))) if (out / "points").exists() else 0

    finished = []
    for i in range(5):
        extra = ["--resume"] if i else []
        before = count()
        proc = subprocess.Popen(_cmd(cfg_path, out, *extra), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if (i == 0 and (out / "config.toml").exists()) or (i > 0 and count() > before):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.5 if i == 0 else 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert int(sweep.load(out)["finished"].sum()) == count()  # every file a finished point
        finished.append(count())
    print("finished after each kill:", finished)
    assert finished == sorted(finished) and len(set(finished[1:])) == 4, finished
    assert finished[-1] < N_POINTS, finished
    last = subprocess.run(_cmd(cfg_path, out, "--resume"), env=env, capture_output=True,
                          text=True, timeout=150)
    assert last.returncode == 0, last.stderr
    assert f"({finished[-1]} already finished)" in last.stderr
    names = sorted(p.name for p in (out / "points").iterdir())
    assert len(names) == N_POINTS and all(n.endswith(".nc") for n in names)  # no temps left
    _same(sweep.load(out), sweep.load(uninterrupted))
