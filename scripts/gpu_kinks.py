"""The exact-kink path on an accelerator, in one run of a few minutes: batch throughput of the
vmapped event loop, and how far the Fig 2 network's exact solve gets in a time budget.

1. The quickstart network (10 -> 20 -> 20 -> 3 ReLU, 64 points, T = 2, tol 1e-8), B members
   (default 1024) in one vmapped call (`ExactKinks(batch="vmap")`): first call (compiling) and
   a second, timed; trajectories/s and events/s. Member 0 must equal its single solve (events
   identical, states to 1e-10) before anything is timed.
2. The Fig 2 network (1000 -> 100 -> 100 -> 10 ReLU, 1000 points, rtol 1e-8) from t = 0 with a
   checkpoint, stopped after `--fig2-seconds` (default 300; compilation included): the time
   reached, events, events/s.

Writes `benchmarks/results/gpu_kinks[-quick].json` (machine, device, figures). `--quick` runs
both at toy sizes (B = 8, the Fig 2 construction with 100 points, 20 s) to check the script on
a CPU.

    python scripts/gpu_kinks.py [--quick] [--batch 1024] [--fig2-seconds 300]
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time

import _fig2
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import flowsim
from flowsim._exact import checkpoint
from flowsim._exact.checkpoint import checkpoint_info

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common

SIZES, N, T, TOL = (10, 20, 20, 3), 64, 2.0, 1e-8


def quickstart(B):
    problem = flowsim.problems.mlp(SIZES, n=N, activation="relu", data="gaussian", data_seed=0,
                                   init="balanced", variance=0.1)
    return flowsim.init.batch(problem.init, B, key=jr.key(1)), problem.loss


def batch_throughput(B):
    nets, loss = quickstart(B)
    kw = dict(solver="tsit5", rtol=TOL, atol=TOL)
    one = flowsim.gradient_flow(jax.tree.map(lambda x: x[0], nets), loss, T,
                                kinks=flowsim.ExactKinks(), **kw)
    tic = time.perf_counter()
    batch = flowsim.gradient_flow(nets, loss, T, batched=True,
                                  kinks=flowsim.ExactKinks(batch="vmap"), **kw)
    jax.block_until_ready(batch.models)
    first = time.perf_counter() - tic
    mine = batch[0]
    v = np.asarray(one.events.valid)
    assert np.array_equal(np.asarray(one.events.kind)[v], np.asarray(mine.events.kind)[v])
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(one.final_model())
                        if hasattr(x, "dtype")])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mine.final_model())
                        if hasattr(x, "dtype")])
    rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    assert rel <= 1e-10, rel
    tic = time.perf_counter()
    again = flowsim.gradient_flow(nets, loss, T, batched=True,
                                  kinks=flowsim.ExactKinks(batch="vmap"), **kw)
    jax.block_until_ready(again.models)
    wall = time.perf_counter() - tic
    events = np.asarray(again.stats["num_events"])
    return {"B": B, "first_call_s": first, "wall_s": wall, "trajectories_per_s": B / wall,
            "events_per_s": float(events.sum()) / wall, "events_min": int(events.min()),
            "events_max": int(events.max()), "member0_vs_single_rel": rel,
            "all_succeeded": bool(np.all(np.asarray(again.succeeded)))}


def fig2_budget(n, seconds, rtol=1e-8):
    net, loss = _fig2.fig2_problem(n)
    path = os.path.join(tempfile.mkdtemp(), "fig2.npz")
    def stop(*_):
        raise KeyboardInterrupt

    checkpoint.CHECKPOINT_SECONDS = 10.0  # what the budget's end finds on disk
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(seconds))
    tic = time.perf_counter()
    try:
        flowsim.gradient_flow(net, loss, 20.0, ts=jnp.linspace(0.0, 20.0, 11), solver="tsit5",
                              rtol=rtol, atol=rtol, throw=False,
                              kinks=flowsim.ExactKinks(max_events=1_000_000, checkpoint=path))
    except KeyboardInterrupt:
        pass
    finally:
        signal.alarm(0)
    wall = time.perf_counter() - tic
    info = checkpoint_info(path)
    events = int(info["stats"]["num_events"])
    return {"points": n, "budget_s": seconds, "wall_s": wall, "t_reached": info["t"],
            "events": events, "events_per_s": events / wall, "stats": info["stats"],
            "history": info["history"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--fig2-seconds", type=float, default=None)
    args = p.parse_args()
    B = args.batch or (8 if args.quick else 1024)
    seconds = args.fig2_seconds or (20 if args.quick else 300)
    row = {"device": str(jax.devices()[0]), "backend": jax.default_backend()}
    row["quickstart_batch"] = batch_throughput(B)
    print(json.dumps(row["quickstart_batch"]), flush=True)
    row["fig2"] = fig2_budget(100 if args.quick else 1000, seconds)
    print(json.dumps({k: v for k, v in row["fig2"].items() if k != "history"}), flush=True)
    _common.write_json(_common.RESULTS, "gpu_kinks", row, quick=args.quick)


if __name__ == "__main__":
    main()
