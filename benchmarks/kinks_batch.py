"""Exact-kink batches: trajectories per second for B initialisations of the quickstart network.

Problem: the quickstart's 10 -> 20 -> 20 -> 3 ReLU MLP (no biases) on 64 Gaussian points
(`flowsim.data.gaussian_regression`), balanced initialisation of variance 0.1, flow to T = 2
with Tsit5 at rtol = atol = 1e-8 (~110-190 events per member). Columns, all in one process:

- `batch (auto)`: `gradient_flow(..., batched=True)` with exact kinks as it runs by default
  (`ExactKinks(batch="auto")`: one vmapped program on an accelerator, a loop of the compiled
  single-trajectory program on the CPU, one thread per core);
- `batch (vmap)`: the vmapped program forced;
- `loop`: a Python loop of single `gradient_flow` calls (new path);
- `host loop`: the previous per-member path, `flowsim._exact.host.kink_flow`, one Python iteration
  per event (timed on min(B, --host-cap) members: its cost per member does not depend on B);
- `smooth batch (auto)` / `smooth batch (vmap)` / `smooth loop`: the smooth path
  (`SmoothKinks()`: on the CPU its members on threads; `SmoothKinks(batch="vmap")`), and a
  loop of its single calls.

Before timing, member 0 of each batched call must match its single solve (relative 1e-10;
the exact paths also have identical event counts). Every figure is compiled first (warm-up),
then timed; the first call's wall time (compilation included) is reported separately.
Run `python benchmarks/kinks_batch.py [--quick] [--batches 1 8 32 128]`.
"""

import time

import _common
import diffrax as dfx
import equinox as eqx
import jax
import jax.random as jr
import numpy as np

import flowsim
from flowsim._exact.host import kink_flow

SIZES, N, VARIANCE, T, TOL = (10, 20, 20, 3), 64, 0.1, 2.0, 1e-8


def make(B, seed=1):
    """`flowsim.problems.mlp(..., data="gaussian")` from data_seed 0; B nets from key(seed)."""
    problem = flowsim.problems.mlp(SIZES, n=N, activation="relu", data="gaussian", data_seed=0,
                                   init="balanced", variance=VARIANCE)
    return flowsim.init.batch(problem.init, B, key=jr.key(seed)), problem.loss


def member(nets, i):
    return jax.tree.map(lambda x: x[i], nets)


def flow(nets, loss, kinks, batched=True):
    return flowsim.gradient_flow(nets, loss, T, solver="tsit5", rtol=TOL, atol=TOL,
                                 batched=batched, kinks=kinks)


def loop(nets, loss, kinks, count):
    return [flow(member(nets, i), loss, kinks, batched=False) for i in range(count)]


def host(nets, loss, count):
    ctrl = dfx.PIDController(rtol=TOL, atol=TOL)
    return [kink_flow(member(nets, i), loss, 0.0, T, np.array([0.0, T]), dfx.Tsit5(), ctrl,
                      100_000, 10_000) for i in range(count)]


def flat(tree):
    return np.concatenate([np.ravel(x) for x in
                           jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))])


def measure(B, args, repeats, first):
    """One row: every column for a batch of B members (correctness checked first)."""
    exact, smooth = flowsim.ExactKinks(), flowsim.SmoothKinks()
    vmapped = flowsim.ExactKinks(batch="vmap")
    nets, loss = make(B)
    rec = {"B": B}
    # Correctness first: member 0 of each batched call against its single solve.
    tic = time.perf_counter()
    ref = flow(member(nets, 0), loss, exact, batched=False)
    first.setdefault("single_exact_first_call_s", time.perf_counter() - tic)
    ref_host = host(nets, loss, 1)[0]
    ref_flat = flat(ref.final_model())
    host_flat = np.concatenate([np.ravel(x[-1]) for x in jax.tree.leaves(ref_host[0])])
    scale = np.max(np.abs(host_flat))
    rec["host_vs_new_rel"] = float(np.max(np.abs(host_flat - ref_flat)) / scale)
    assert rec["host_vs_new_rel"] <= 1e-10, rec
    assert ref_host[1]["num_events"] == int(ref.stats["num_events"])
    checks = {"auto": exact, "smooth": smooth}
    if jax.default_backend() != "cpu" or B <= args.vmap_cap:
        checks["vmap"] = vmapped
        checks["smooth_vmap"] = flowsim.SmoothKinks(batch="vmap")
    timings = {}
    for name, kinks in checks.items():
        tic = time.perf_counter()
        out = flow(nets, loss, kinks)
        first.setdefault(f"batch_{name}_first_call_s_B{B}", time.perf_counter() - tic)
        one = flow(member(nets, 0), loss, smooth, batched=False) if name.startswith("smooth") \
            else ref
        got = flat(out[0].final_model())
        want = flat(one.final_model())
        rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        assert rel <= 1e-10, (name, B, rel)
        if not name.startswith("smooth"):
            assert int(out.stats["num_events"][0]) == int(ref.stats["num_events"])
        timings[name] = _common.timeit(lambda kinks=kinks: flow(nets, loss, kinks).models,
                                       repeats=repeats, warmup=0)["median_s"]
    count = min(B, args.host_cap)
    timings["loop"] = _common.timeit(
        lambda: [t.models for t in loop(nets, loss, exact, B)], repeats=1,
        warmup=0)["median_s"]
    timings["smooth_loop"] = _common.timeit(
        lambda: [t.models for t in loop(nets, loss, smooth, B)], repeats=1,
        warmup=0)["median_s"]
    host_s = _common.timeit(lambda: [o[0] for o in host(nets, loss, count)], repeats=1,
                            warmup=0)["median_s"]
    timings["host_loop"] = host_s * B / count
    tps = {k: B / v for k, v in timings.items()}
    events = np.asarray(flow(nets, loss, exact).stats["num_events"])
    rec.update(seconds=timings, trajectories_per_s=tps, host_members_timed=count,
               events_mean=float(events.mean()), events_min=int(events.min()),
               events_max=int(events.max()),
               speedup_batch_vs_host_loop=timings["host_loop"] / timings["auto"],
               batch_vs_loop=timings["loop"] / timings["auto"])
    return rec, [B, f"{events.min()}-{events.max()}", tps["auto"], tps.get("vmap"),
                 tps["loop"], tps["host_loop"], rec["speedup_batch_vs_host_loop"],
                 tps["smooth"], tps.get("smooth_vmap"), tps["smooth_loop"]]


def main():
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--host-cap", type=int, default=8,
                   help="members timed on the previous per-member path (default 8)")
    p.add_argument("--vmap-cap", type=int, default=32,
                   help="largest B timed vmapped on the CPU (default 32: it only slows there)")
    args = p.parse_args()
    batches = args.batches or ([4] if args.quick else [1, 8, 32, 128])
    repeats = args.repeats or (1 if args.quick else 2)
    rows, records = [], []
    first = {}
    for B in batches:
        rec, row = measure(B, args, repeats, first)
        records.append(rec)
        rows.append(row)
    headers = ["B", "events", "batch (auto) traj/s", "batch (vmap) traj/s", "loop traj/s",
               "host loop traj/s", "batch / host loop", "smooth batch (auto) traj/s",
               "smooth batch (vmap) traj/s", "smooth loop traj/s"]
    table = _common.table(headers, rows,
                          title=f"exact kinks, quickstart network, T = {T:g}, tol {TOL:g}, "
                                f"{jax.default_backend()}")
    print({k: round(v, 1) for k, v in first.items()})
    _common.write_json(args.out, "kinks_batch", {
        "problem": {"sizes": SIZES, "points": N, "variance": VARIANCE, "t1": T, "tol": TOL,
                    "solver": "tsit5"},
        "backend": jax.default_backend(), "records": records, "first_calls_s": first,
        "tables": [table],
    }, quick=args.quick)


if __name__ == "__main__":
    main()
