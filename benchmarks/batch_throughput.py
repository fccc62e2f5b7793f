"""Batch throughput: trajectories per second for B initialisations in one vmapped call
(`batched=True`) against a Python loop of single calls, for gradient flow and gradient descent.

Problem: matrix factorization 1/2||U V^T - M||^2, M 8x6 of rank 2, U, V of rank 2 from
N(0, 0.3^2), a fresh initialisation per trajectory; flow to T = 5 with Tsit5 at rtol=atol=1e-8,
GD 200 steps at eta = 0.05. Before timing, the first trajectories of the batched call must match
the single calls (relative 1e-8). The loop's cost per trajectory does not depend on B, so it is
timed on min(B, loop_cap) trajectories and quoted as trajectories per second.

Target: B = 64 on CPU >= 8x the loop; on GPU, B = 1024 >= 100x. Runs on the default JAX device
(GPU when present). Run `python benchmarks/batch_throughput.py [--quick] [--batches 1 8 64 512]`.
"""

import _common
import jax
import jax.random as jr
import numpy as np

import flowsim

T_FLOW, TOL, GD_STEPS, ETA = 5.0, 1e-8, 200, 0.05


def make(B):
    kM, kb = jr.split(jr.key(7))
    M = flowsim.data.low_rank_matrix(8, 6, (2.0, 1.0), key=kM)
    models = flowsim.init.batch(
        lambda k: flowsim.models.MatrixFactorization.random(8, 6, 2, scale=0.3, key=k), B, key=kb)
    return models, flowsim.losses.factorization(M)


def single(models, i):
    return jax.tree.map(lambda x: x[i], models)


def flow_batched(models, loss):
    return flowsim.gradient_flow(models, loss, T_FLOW, solver="tsit5", rtol=TOL, atol=TOL,
                                 batched=True).models


def flow_one(model, loss):
    return flowsim.gradient_flow(model, loss, T_FLOW, solver="tsit5", rtol=TOL, atol=TOL).models


def gd_batched(models, loss):
    return flowsim.gradient_descent(models, loss, GD_STEPS, learning_rate=ETA,
                                    save_every=GD_STEPS, batched=True).models


def gd_one(model, loss):
    return flowsim.gradient_descent(model, loss, GD_STEPS, learning_rate=ETA,
                                    save_every=GD_STEPS).models


def final_u(models, batched):
    U = models.U
    return np.asarray(U[:, -1] if batched else U[-1])


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--loop-cap", type=int, default=None,
                   help="most single calls timed per loop measurement (default 16, quick 8)")
    args = p.parse_args(argv)
    quick = args.quick
    dev = jax.devices()[0].platform
    batches = args.batches or ([1, 8, 64] if quick else
                               [1, 8, 64, 512] + ([1024, 4096] if dev == "gpu" else []))
    cap = args.loop_cap or (8 if quick else 16)
    repeats = args.repeats or 3
    rows, results = [], []
    for kind, batched_fn, one_fn in (("flow", flow_batched, flow_one),
                                     ("gd", gd_batched, gd_one)):
        for B in batches:
            models, loss = make(B)
            out_b = _common.block(batched_fn(models, loss))
            n_loop = min(B, cap)
            # check: batched == single calls on the first trajectories
            worst = 0.0
            for i in range(min(B, 3)):
                ub = final_u(out_b, True)[i]
                us = final_u(_common.block(one_fn(single(models, i), loss)), False)
                worst = max(worst, float(np.linalg.norm(ub - us) / np.linalg.norm(us)))
            assert worst < 1e-8, f"{kind} B={B}: batched differs from single calls by {worst:.2e}"
            singles = [single(models, i) for i in range(n_loop)]
            t_b = _common.timeit(lambda f=batched_fn, ms=models, lo=loss: f(ms, lo),
                                 repeats=repeats, warmup=0)
            t_l = _common.timeit(lambda f=one_fn, ss=singles, lo=loss: [f(m, lo) for m in ss],
                                 repeats=repeats, warmup=0)
            tps_b = B / t_b["median_s"]
            tps_l = n_loop / t_l["median_s"]
            rows.append([kind, B, t_b["median_s"], tps_b, tps_l, tps_b / tps_l, worst])
            results.append({"kind": kind, "B": B, "batched_median_s": t_b["median_s"],
                            "batched_traj_per_s": tps_b, "loop_traj_per_s": tps_l,
                            "loop_calls_timed": n_loop, "speedup": tps_b / tps_l,
                            "check_rel_diff": worst})
            print(f"{kind} B={B}: {tps_b:.1f} vs {tps_l:.1f} traj/s ({tps_b / tps_l:.1f}x)",
                  flush=True)
    tables = [_common.table(
        ["solver", "B", "batched call s", "batched traj/s", "loop traj/s", "speedup",
         "check rel. diff"], rows,
        title=f"Trajectories per second on {dev} ({jax.devices()[0].device_kind}), medians of "
              f"{repeats}")]
    trows = []
    target_B, target_x = (1024, 100) if dev == "gpu" else (64, 8)
    for r in results:
        if r["B"] == target_B:
            trows.append([f"{r['kind']}: B={target_B} >= {target_x}x loop ({dev})",
                          f"{r['speedup']:.1f}x",
                          "met" if r["speedup"] >= target_x else "MISSED"])
    if trows:
        tables.append(_common.table(["target", "measured", "status"], trows,
                                    title="Targets (same run, medians)"))
    _common.write_json(args.out, "batch_throughput",
                       {"problem": "matrix factorization 8x6 rank 2", "T_flow": T_FLOW,
                        "tol": TOL, "gd_steps": GD_STEPS, "eta": ETA, "repeats": repeats,
                        "results": results, "tables": tables}, quick=quick)


if __name__ == "__main__":
    main()
