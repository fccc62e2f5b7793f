"""`flowsim sweep --distributed`: two local CPU processes (jax.distributed) equal one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from flowsim import sweep

from .test_sweep import _toml, _with

# GD only: the test is about splitting seeds over processes, not about the flow solver.
DIST_CFG = _with(flow=None, init__seeds=6, metrics__record=["loss", "drift", "ledger"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    cfg = tmp_path / "dist.toml"
    cfg.write_text(_toml(DIST_CFG))
    out = tmp_path / "dist"
    port = _free_port()
    # 2 processes x 2 devices: 6 seeds are padded to 8, 2 per device.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            "-m",
            "flowsim",
            "sweep",
            str(cfg),
            "--out",
            str(out),
            "--quiet",
            "--distributed",
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ]
        log = open(tmp_path / f"p{i}.log", "wb")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=300)
        finally:
            log.close()
    for i, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"p{i}.log").read_text()
    got = sweep.load(out)
    assert got.attrs["processes"] == 2 and got.attrs["device"].startswith("2 x")
    one = sweep.load(sweep.run(DIST_CFG, tmp_path / "one", progress=False).out)
    assert set(got.data_vars) == set(one.data_vars)
    for name in one.data_vars:
        if not name.endswith("_seconds"):
            np.testing.assert_array_equal(got[name].values, one[name].values, err_msg=name)
