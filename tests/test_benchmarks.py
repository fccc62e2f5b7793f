"""Smoke test: every benchmark script runs with --quick, checks its answers and writes its JSON.

Each script asserts its own answers (final error against a reference, batched == single calls,
the GD loops agree) before timing, so a pass here means the numbers are checked, not that the
targets are met (those depend on the machine; see benchmarks/README.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ["discretization", "work_precision", "batch_throughput", "gd_throughput",
           "kinks_batch", "stiff_rosenbrock", "overhead", "stiff_matrix_free"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_quick(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--no-plot", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=BENCH,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / f"{name}-quick.json").read_text())
    assert doc["benchmark"] == name and doc["quick"] is True
    assert doc["machine"]["versions"]["jax"]
    assert doc["tables"]
