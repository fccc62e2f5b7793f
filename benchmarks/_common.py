"""Shared benchmark plumbing: timing (warm-up, repeats, median), machine info, tables, JSON.

Every script in benchmarks/ follows the same pattern (lineax `benchmarks/solver_speeds.py`):
compile and check the answer first, then time `repeats` calls and quote the median, always
next to a baseline measured in the same process, so that a busy machine slows both alike.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: --quick, --repeats, --no-plot, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats (finishes in under 2 minutes; used by tests)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per measurement, median quoted (default 3, quick 1-3)")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"directory for <name>.json and figures (default {RESULTS})")
    return p


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def timeit(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1,
           budget_s: float | None = None) -> dict[str, Any]:
    """Runs `fn` `warmup` times untimed (compilation), then `repeats` times; median wall time.

    `fn` must block until its result is ready (return arrays: they are blocked here). With
    `budget_s`, stops repeating once that much time has been spent (at least one repeat).
    Returns `{"median_s", "min_s", "times_s", "result"}` (result of the last call).
    """
    out = None
    for _ in range(warmup):
        out = block(fn())
    times = []
    spent = 0.0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = block(fn())
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if budget_s is not None and spent > budget_s:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "result": out}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """Host, CPU, load, JAX devices and the versions of everything that is timed."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("flowsim", "jax", "jaxlib", "diffrax", "equinox", "lineax", "optimistix",
                "optax", "numpy", "scipy", "torch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    dev = jax.devices()[0]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": load,
        "device": {"platform": dev.platform, "kind": getattr(dev, "device_kind", str(dev)),
                   "count": jax.device_count()},
        "x64": bool(jax.config.jax_enable_x64),
        "git_rev": _git_rev(),
        "versions": versions,
    }


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy/JAX scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(out: Path, name: str, payload: dict[str, Any], *, quick: bool) -> Path:
    """Writes `<out>/<name>[-quick].json` with the machine info prepended."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'-quick' if quick else ''}.json"
    doc = {"benchmark": name, "quick": quick, "machine": machine_info(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return format(x, spec)
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (readable on a terminal, pasteable into README.md); printed and returned."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def savefig(fig, out: Path, name: str, *, quick: bool) -> str:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'-quick' if quick else ''}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
    return path.name


def fit_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (the empirical order)."""
    import numpy as np

    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    ok = np.isfinite(lx) & np.isfinite(ly)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(lx[ok], ly[ok], 1)[0])
