"""Stiff gradient flow: flowsim's Rosenbrock solvers against scipy LSODA and Kvaerno5.

The standing stiff example (`_problems.stiff_factorization`: 20x20 rank-3 factorization,
singular values 1, 1e-2, 1e-4, init scale 1e-3, T = 1e6, 120 parameters), seeds 3 and 42.
For each seed a reference final state is computed first (Rodas5P at rtol = atol = 1e-14,
cross-checked by scipy LSODA at 1e-13); then every contender runs a ladder of tolerances, its
final relative error against the reference is recorded *before* it is timed, and its wall time
is the median of `--repeats` runs taken round-robin over all contenders (a busy machine slows
them alike). Each contender's time at final errors 1e-7, 1e-9, 1e-11 is interpolated
(log time against log error, `work_precision.interp_time`) and divided by LSODA's.

Contenders (all warm: compiled before timing):

- `Rodas5P`: `flowsim.gradient_flow(solver=flowsim._rosenbrock.Rodas5P())`; a fresh Hessian
  and an LU of I - gamma h J on every attempted step (so Jacobians = LUs = steps);
- `Rodas5P symmetric`: `Rodas5P(symmetric=True)`, the same method using that a gradient
  flow's Jacobian is symmetric: its lower block triangle only, and Cholesky where
  I - gamma h J is positive definite (LU elsewhere);
- `ROS34PW2 (age N)`: `gradient_flow(solver=ROS34PW2(max_age=N))`, the W-method reusing one
  eigendecomposition of the Hessian for N accepted steps (decompositions counted from the
  solver state of an equal, untimed `diffeqsolve`);
- `Kvaerno5`: `gradient_flow(solver="kvaerno5")`, what `solver="auto"` picks here (dense
  Jacobian and Newton on every step);
- `scipy LSODA`: jitted JAX gradient and dense Hessian as `jac` (`work_precision.run_scipy`).

Also measured: the cost of one step and of its parts (gradient, Hessian, LU, triangular solves,
eigendecomposition) in a compiled loop, against diffrax Tsit5's cost per step on the same
problem.

OpenBLAS runs single-threaded here (`OPENBLAS_NUM_THREADS=1` unless set): on 2 shared cores its
threads spin-wait, and the eigendecomposition (LAPACK syevd through OpenBLAS) then took 2.7-4.2 ms
instead of 0.76 ms at n = 120 (LU and the triangular solves were unaffected).

Run `python benchmarks/stiff_rosenbrock.py [--quick] [--seeds 3 42] [--repeats R]`.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import math
import statistics
import time
import warnings

import _common
import _problems
import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate
import work_precision as wp

import flowsim
from flowsim._rosenbrock import ROS34PW2, Rodas5P

ERRORS = (1e-7, 1e-9, 1e-11)
MAX_STEPS = 100_000


# --------------------------------------------------------------------------- runs

def _field(problem):
    params, static = eqx.partition(problem.model, eqx.is_inexact_array)
    grad = jax.grad(lambda p: problem.loss(eqx.combine(p, static)))
    return params, dfx.ODETerm(lambda t, y, args: jax.tree.map(jnp.negative, grad(y)))


@eqx.filter_jit
def _decompositions(params, term, solver, t1, tol):
    """Steps and eigendecompositions of a W-solver (gradient_flow's controller, untimed)."""
    sol = dfx.diffeqsolve(term, solver, 0.0, t1, None, params,
                          stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
                          max_steps=MAX_STEPS, saveat=dfx.SaveAt(t1=True, solver_state=True))
    return sol.stats["num_steps"], sol.solver_state[-1]


def lsoda_counts(flat, tol):
    """scipy's own counters: steps, Jacobians (jac calls) and LU decompositions."""
    sol = scipy.integrate.solve_ivp(
        lambda t, y: np.asarray(flat.neg_grad(y)), (0.0, flat.problem.t1), np.asarray(flat.y0),
        method="LSODA", rtol=tol, atol=tol, jac=lambda t, y: np.asarray(flat.neg_hess(y)))
    return {"num_steps": int(sol.t.size - 1), "jacobians": int(sol.njev),
            "factorizations": int(sol.nlu), "grad_evals": int(sol.nfev)}


def contenders(flat, quick):
    """name -> (tolerance ladder, run(tol) -> (y, ok, info), counts(tol, info) -> dict)."""
    params, term = _field(flat.problem)
    t1 = flat.problem.t1

    def flowsim_run(solver):
        return lambda tol: wp.run_flowsim(flat, solver, tol, MAX_STEPS)

    def per_step(info):
        # One Jacobian and one factorization per attempted step (rejected ones included).
        return {"jacobians": info["num_steps"], "factorizations": info["num_steps"]}

    def w_counts(solver):
        def counts(tol, info):
            steps, dec = _decompositions(params, term, solver, t1, tol)
            if int(steps) != info["num_steps"]:
                raise RuntimeError(f"step counts differ: {int(steps)} vs {info['num_steps']}")
            return {"jacobians": int(dec), "factorizations": int(dec)}
        return counts

    # Rodas5P ends ~10-100x below its tolerance: the ladder starts loose to bracket 1e-7.
    ladder = [1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11]
    out = {"Rodas5P": (ladder, flowsim_run(Rodas5P()), lambda tol, info: per_step(info)),
           "Rodas5P symmetric": (ladder, flowsim_run(Rodas5P(symmetric=True)),
                                 lambda tol, info: per_step(info))}
    for age in ([20] if quick else [20, 100]):
        solver = ROS34PW2(max_age=age)
        out[f"ROS34PW2 (age {age})"] = (ladder[2:], flowsim_run(solver), w_counts(solver))
    out["Kvaerno5"] = ([1e-6, 1e-8] if quick else [1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
                       flowsim_run("kvaerno5"), lambda tol, info: per_step(info))
    out["scipy LSODA"] = ([1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13],
                          lambda tol: wp.run_scipy(flat, "LSODA", tol),
                          lambda tol, info: lsoda_counts(flat, tol))
    return out


def time_at_error(points, err):
    """Median wall time to final error `err`: interpolated along the ladder
    (`work_precision.interp_time`), or, where every run was more accurate than `err`, the
    cheapest of them (an upper bound)."""
    t = wp.interp_time(points, err)
    if t is None:
        better = [p["median_s"] for p in points if p.get("ok") and p.get("median_s")
                  and p["error"] <= err]
        if better and all(p["error"] <= err for p in points if p.get("ok")):
            t = min(better)
    return t


def reference(flat):
    t0 = time.perf_counter()
    p = flat.problem
    traj = flowsim.gradient_flow(p.model, p.loss, p.t1, solver=Rodas5P(), rtol=1e-14,
                                 atol=1e-14, max_steps=MAX_STEPS)
    y_ref = np.asarray(flat.ravel(traj.final_model()))
    y2, ok, _ = wp.run_scipy(flat, "LSODA", 1e-13)
    cross = wp.rel_err(y2, y_ref)
    print(f"reference: Rodas5P rtol=atol=1e-14 ({int(traj.stats['num_steps'])} steps); "
          f"scipy LSODA at 1e-13 differs by {cross:.2e} ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    return y_ref, {"method": "Rodas5P rtol=atol=1e-14", "steps": int(traj.stats["num_steps"]),
                   "cross_check": "scipy LSODA rtol=atol=1e-13", "cross_check_rel_diff": cross}


def bench_seed(seed, *, quick, repeats):
    problem = _problems.stiff_factorization(seed=seed)
    flat = wp.Flat(problem)
    print(f"\n== seed {seed}: {problem.note}", flush=True)
    y_ref, ref_info = reference(flat)
    runs = contenders(flat, quick)
    points, timed = [], []
    # 1. error first (this call also compiles), with the step and factorization counts
    for name, (tols, run, counts) in runs.items():
        for tol in tols:
            y, ok, info = run(tol)
            err = wp.rel_err(y, y_ref)
            ok = ok and math.isfinite(err)
            entry = {"method": name, "tol": tol, "ok": ok, "error": err,
                     "num_steps": info["num_steps"], "num_rejected": info.get("num_rejected")}
            entry.update(counts(tol, info))
            points.append(entry)
            if ok:
                timed.append((entry, lambda run=run, tol=tol: run(tol)))
            print(f"  {name:18s} tol={tol:<7.0e} err={err:9.2e} steps={entry['num_steps']:6d} "
                  f"jac={entry['jacobians']:5d} fact={entry['factorizations']:5d}"
                  f"{'' if ok else ' FAILED'}", flush=True)
    # 2. wall time: round-robin over every (contender, tolerance), median of `repeats`
    times = {id(e): [] for e, _ in timed}
    for _ in range(repeats):
        for entry, fn in timed:
            t0 = time.perf_counter()
            fn()
            times[id(entry)].append(time.perf_counter() - t0)
    for entry, _ in timed:
        ts = times[id(entry)]
        entry.update(median_s=statistics.median(ts), times_s=ts,
                     us_per_step=statistics.median(ts) / entry["num_steps"] * 1e6)
    at_error = {}
    for name in runs:
        pts = [p for p in points if p["method"] == name]
        at_error[name] = {f"{e:.0e}": time_at_error(pts, e) for e in ERRORS}
    for row in at_error.values():
        for e in ERRORS:
            base = at_error["scipy LSODA"][f"{e:.0e}"]
            t = row[f"{e:.0e}"]
            row[f"ratio {e:.0e}"] = None if t is None or base is None else t / base
    return {"seed": seed, "problem": problem.note, "reference": ref_info, "points": points,
            "at_error": at_error}


# --------------------------------------------------------------------------- per-step cost

def _loop_cost(body, x0, n=300, repeats=7):
    """Microseconds per iteration of `body` in a compiled fori_loop (min over repeats)."""
    run = jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda i, c: body(c), x))
    jax.block_until_ready(run(x0))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x0))
        ts.append(time.perf_counter() - t0)
    return min(ts) / n * 1e6


def step_costs(seed):
    """The parts of a step, each in a compiled loop on the stiff problem (120 parameters)."""
    from flowsim._rosenbrock import _FlatField

    problem = _problems.stiff_factorization(seed=seed)
    flat = wp.Flat(problem)
    params, term = _field(problem)
    y0 = jax.tree.map(lambda x: x + 0.05, params)
    y, unravel = jax.flatten_util.ravel_pytree(y0)
    n = y.size
    field = _FlatField(term, None, unravel)
    small = 1e-12

    def hessian_flat(z):
        _, lin = jax.linearize(flat.grad, z)
        return jax.vmap(lin, out_axes=1)(jnp.eye(n))

    J = field.jacobian(0.0, y)[1]
    M = jnp.eye(n) - 0.05 * J
    Msym = jnp.eye(n) - 0.05 * field.jacobian(0.0, y, symmetric=True)[1]
    lu, _, perm = jax.lax.linalg.lu(M)
    factors = jax.scipy.linalg.lu_factor(M)

    def tri(b):
        x = jax.lax.linalg.triangular_solve(lu, b[perm][:, None], left_side=True, lower=True,
                                            unit_diagonal=True)
        return jax.lax.linalg.triangular_solve(lu, x, left_side=True, lower=False)[:, 0]

    def solver_step(solver):
        state = solver.init(term, 0.0, 1.0, y0, None)

        def body(c):
            y1 = solver.step(term, 0.0, 0.1, c, None, state, False)[0]
            return jax.tree.map(lambda a, b: a + small * b, c, y1)

        return _loop_cost(body, y0)

    costs = {
        "gradient": _loop_cost(lambda z: z + small * flat.grad(z), y),
        "Hessian, vmap over the flat basis": _loop_cost(
            lambda z: z + small * (hessian_flat(z) @ z), y),
        "Hessian, leaf by leaf (Rodas5P's)": _loop_cost(
            lambda z: z + small * (field.jacobian(0.0, z)[1] @ z), y),
        "Hessian, lower block triangle (Rodas5P symmetric)": _loop_cost(
            lambda z: z + small * (field.jacobian(0.0, z, symmetric=True)[1] @ z), y),
        "LU of I - gamma h J": _loop_cost(
            lambda z: z + small * jax.lax.linalg.lu(M + z[0] * jnp.eye(n))[0][0], y),
        "Cholesky of I - gamma h J": _loop_cost(
            lambda z: z + small * jax.lax.linalg.cholesky(
                Msym + z[0] * jnp.eye(n), symmetrize_input=False)[0], y),
        "LU solve (2 triangular solves)": _loop_cost(lambda z: z + small * tri(z), y),
        "jax.scipy.linalg.lu_solve": _loop_cost(
            lambda z: z + small * jax.scipy.linalg.lu_solve(factors, z), y),
        "eigh (ROS34PW2 refresh)": _loop_cost(
            lambda z: z + small * jnp.linalg.eigh(M + z[0] * jnp.eye(n))[0][0], y),
        "Rodas5P step": solver_step(Rodas5P()),
        "Rodas5P(symmetric=True) step": solver_step(Rodas5P(symmetric=True)),
        "ROS34PW2 step without refresh": solver_step(ROS34PW2(max_age=10**9)),
    }
    # diffrax's loop around a cheap step: Tsit5 over t in [0, 100] (stability-bound steps).
    solve = eqx.filter_jit(lambda p, s: dfx.diffeqsolve(
        term, s, 0.0, 100.0, None, p,
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8), max_steps=MAX_STEPS))
    for name, solver in (("Tsit5", dfx.Tsit5()), ("Rodas5P", Rodas5P()),
                         ("Rodas5P symmetric", Rodas5P(symmetric=True)),
                         ("Kvaerno5", dfx.Kvaerno5())):
        sol = jax.block_until_ready(solve(params, solver))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(solve(params, solver))
            ts.append(time.perf_counter() - t0)
        costs[f"{name} in diffeqsolve, per step"] = min(ts) / int(sol.stats["num_steps"]) * 1e6
    return costs


# --------------------------------------------------------------------------- main

def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="problem seeds (default 3 42; --quick: 3)")
    args = p.parse_args(argv)
    seeds = args.seeds or ([3] if args.quick else [3, 42])
    repeats = args.repeats or (3 if args.quick else 5)
    warnings.filterwarnings("ignore", message="At least one element of `rtol` is too small")
    warnings.simplefilter("ignore", flowsim.FlowWarning)

    costs = step_costs(seeds[0])
    tables = [_common.table(["part", "us"], [[k, v] for k, v in costs.items()],
                            title=f"Cost of one step and its parts (seed {seeds[0]}, compiled)")]
    results = []
    for seed in seeds:
        res = bench_seed(seed, quick=args.quick, repeats=repeats)
        results.append(res)
        rows = [[q["method"], q["tol"], q["error"], q.get("median_s"), q["num_steps"],
                 q.get("num_rejected"), q["jacobians"], q["factorizations"], q.get("us_per_step")]
                for q in res["points"]]
        tables.append(_common.table(
            ["method", "tol", "rel. error", "median s", "steps", "rejected", "Jacobians",
             "factorizations", "us/step"], rows, title=f"seed {seed}: every run"))
        rows = [[name, *[row[f"{e:.0e}"] for e in ERRORS], *[row[f"ratio {e:.0e}"] for e in ERRORS]]
                for name, row in res["at_error"].items()]
        tables.append(_common.table(
            ["method", *[f"t(err {e:.0e}) s" for e in ERRORS],
             *[f"/ LSODA at {e:.0e}" for e in ERRORS]], rows,
            title=f"seed {seed}: wall time (median) at equal final error, ratio to LSODA"))
    target = []
    for res in results:
        for e in ERRORS:
            r = [res["at_error"][m][f"ratio {e:.0e}"] for m in ("Rodas5P", "Rodas5P symmetric")]
            target.append([res["seed"], f"{e:.0e}", *r, *[
                "n/a" if x is None else ("met" if x <= 1.0 else "MISSED") for x in r]])
    tables.append(_common.table(
        ["seed", "final error", "Rodas5P / LSODA", "symmetric / LSODA", "Rodas5P <= 1.0x",
         "symmetric <= 1.0x"], target,
        title="Target: <= 1.0x scipy LSODA's wall time at equal final error"))
    _common.write_json(args.out, "stiff_rosenbrock",
                       {"repeats": repeats, "errors": ERRORS, "step_costs_us": costs,
                        "results": results, "tables": tables}, quick=args.quick)


if __name__ == "__main__":
    main()
