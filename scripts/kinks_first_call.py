"""A small exact-kink solve's first call, split into where its time goes: tracing, lowering and
XLA compilation of the event loop (per sliding capacity it compiles), then the second call.

Problem: a 3 -> 7 -> 5 -> 2 ReLU MLP with biases on 9 Gaussian points, square loss, Tsit5 at
rtol = atol = 1e-8 to t = 20 (23 events, up to 4 entries sliding). Run it in a fresh process:
the first call is what a new user's first solve costs (the median over `--repeat` fresh
processes: this one and `--repeat - 1` more).

    python scripts/kinks_first_call.py [--capacity 0] [--t1 20] [--out F.json]

With `--cache`, the solve runs in two more fresh processes sharing a new persistent
compilation cache (`flowsim.enable_compilation_cache`): the first fills it, the second's
first call is what a later run of the same problem costs. The process's memory mappings
before and after the first call, and after `jax.clear_caches()`, are what its compiled
programs hold (`flowsim._programs`).
"""

import argparse
import json
import logging
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.random as jr
import numpy as np

import flowsim
from flowsim import _programs
from flowsim.models import MLP


class _Timings(logging.Handler):
    """Sums JAX's "Finished <stage> ... in <s> sec" log lines by stage and function."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seconds = {}

    def emit(self, record):
        m = re.search(r"Finished (.*?) in ([0-9.e-]+) sec", record.getMessage())
        if m:
            self.seconds[m.group(1)] = self.seconds.get(m.group(1), 0.0) + float(m.group(2))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacity", type=int, default=0, help="first sliding capacity (default 0)")
    p.add_argument("--t1", type=float, default=20.0)
    p.add_argument("--cache", action="store_true",
                   help="also time first calls with a cold and a warm compilation cache")
    p.add_argument("--repeat", type=int, default=3,
                   help="fresh processes timing the first call (median reported; default 3)")
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parents[1]
                   / "benchmarks" / "results" / "kinks_first_call.json")
    args = p.parse_args()
    if args.cache_dir:
        flowsim.enable_compilation_cache(args.cache_dir)
    timings = _Timings()
    for name in ("jax._src.dispatch", "jax._src.interpreters.pxla", "jax._src.compiler"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(timings)
    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").propagate = False
    X, Y = jr.normal(jr.key(0), (9, 3)), jr.normal(jr.key(1), (9, 2))
    net = MLP((3, 7, 5, 2), "relu", use_bias=True, init_std=(0.7, 0.7, 0.7), key=jr.key(2))
    loss = flowsim.losses.square(X, Y)
    kinks = flowsim.ExactKinks(capacity=args.capacity)

    def solve():
        return flowsim.gradient_flow(net, loss, args.t1, kinks=kinks, rtol=1e-8, atol=1e-8)

    maps_before = _programs.mappings()
    tic = time.perf_counter()
    traj = solve()
    first = time.perf_counter() - tic
    maps_after = _programs.mappings()
    tic = time.perf_counter()
    solve()
    second = time.perf_counter() - tic
    print(f"first call {first:.1f} s, second {second:.2f} s; "
          f"{int(traj.stats['num_events'])} events, "
          f"{int(traj.stats['num_sliding_max'])} entries sliding at most")
    stages = dict(sorted(timings.seconds.items(), key=lambda kv: -kv[1])[:6])
    mappings = {}
    if maps_before is not None:
        jax.clear_caches()
        mappings = {"mappings_before": maps_before, "mappings_after_first_call": maps_after,
                    "mappings_after_clear_caches": _programs.mappings()}
        print("memory mappings (flowsim._programs): " + ", ".join(
            f"{k.removeprefix('mappings_')} {v}" for k, v in mappings.items()))
    for stage, s in stages.items():
        print(f"{s:7.2f} s  {stage}")
    if args.cache_dir or args.child:
        print(json.dumps({"first_call_s": first}))
        return
    firsts = [first]
    for _ in range(args.repeat - 1):
        out = subprocess.run([sys.executable, __file__, "--capacity", str(args.capacity),
                              "--t1", str(args.t1), "--child"], check=True,
                             capture_output=True, text=True).stdout
        firsts.append(json.loads(out.splitlines()[-1])["first_call_s"])
    print(f"first call in {len(firsts)} fresh processes: "
          + ", ".join(f"{x:.1f}" for x in firsts) + f" s (median {np.median(firsts):.1f} s)")
    cached = {}
    if args.cache:
        with tempfile.TemporaryDirectory() as cache:
            for label in ("cold", "warm"):
                out = subprocess.run(
                    [sys.executable, __file__, "--capacity", str(args.capacity), "--t1",
                     str(args.t1), "--cache-dir", cache], check=True, capture_output=True,
                    text=True).stdout
                cached[f"first_call_{label}_cache_s"] = json.loads(out.splitlines()[-1])[
                    "first_call_s"]
                print(f"first call with a {label} compilation cache: "
                      f"{cached[f'first_call_{label}_cache_s']:.1f} s")
    args.out.write_text(json.dumps({
        "problem": "3-7-5-2 ReLU MLP with biases, 9 points, square loss, Tsit5 rtol=atol=1e-8",
        "t1": args.t1, "capacity": args.capacity, "first_call_s": float(np.median(firsts)),
        "first_calls_s": firsts, "second_call_s": second,
        **cached, **mappings,
        "events": int(traj.stats["num_events"]),
        "sliding_max": int(traj.stats["num_sliding_max"]), "largest_stages_s": stages,
        "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
