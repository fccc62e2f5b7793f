"""Work-precision: wall time and gradient (+HVP) evaluations to reach a final error, flowsim
against the ODE solvers a user would otherwise reach for, on the same problem in one process.

For each problem a tight-tolerance reference is computed and cross-checked by a second method;
then every method is run over a ladder of tolerances, its final-parameter error against the
reference is checked (and recorded) *before* it is timed, and the median of repeated timed runs
is reported. Methods:

- flowsim `gradient_flow(solver="auto")` (the default) and each diffrax solver it offers by name;
- scipy `solve_ivp` LSODA / BDF / Radau, vector field and dense Hessian Jacobian jit-compiled in
  JAX (dense only where the Hessian fits: not on the Fig 2 network);
- `jax.experimental.ode.odeint` (Dormand–Prince 5(4), JAX's own);
- fixed-step RK4 at step alpha / lambda_max, alpha = 1 (the integrator of the edge-of-stability
  code; lambda_max = the largest sharpness along the reference trajectory).

Evaluation counts of flowsim's solves come from an untimed run with `count_evals=True` (each
gradient and each Hessian-vector product reported through a host callback); scipy's from its
own counters (a dense Jacobian counts as n HVPs).

Targets checked (ratios measured in this run, at equal final error):
- stiff factorization: flowsim default <= 1.0x scipy LSODA's wall time (at the error of the
  default's tol-1e-8 run, and at final errors 1e-7, 1e-9, 1e-11: `STIFF_ERRORS`);
- Fig 2 network to t = 20: flowsim default <= 0.5x diffrax Tsit5's wall time.

Run `python benchmarks/work_precision.py [--quick] [--problems stiff mlp fig2 matrix_free]
[--repeats R]`; `matrix_free` runs `stiff_matrix_free.py` (RKC2 against Kvaerno5 + Newton-GMRES
and Tsit5 at 52k parameters) with its own table and JSON.
"""

import math
import time
import warnings
from collections import Counter
from functools import partial

import _common
import _problems
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate
from jax.flatten_util import ravel_pytree

import flowsim
from flowsim import _solvers, kinks as flowsim_kinks

DENSE_MAX = _solvers.DENSE_JACOBIAN_MAX


# --------------------------------------------------------------------------- flat problem

class Flat:
    """The problem on a flat float64 vector: jit-compiled gradient, HVP and dense Hessian."""

    def __init__(self, problem):
        self.problem = problem
        params, self.static = eqx.partition(problem.model, eqx.is_inexact_array)
        self.y0, self.unravel = ravel_pytree(params)
        self.n = self.y0.size

        def loss_flat(y):
            return problem.loss(eqx.combine(self.unravel(y), self.static))

        self.loss_flat = loss_flat
        self.grad = jax.jit(jax.grad(loss_flat))
        self.neg_grad = jax.jit(lambda y: -jax.grad(loss_flat)(y))
        self.neg_hess = jax.jit(lambda y: -jax.hessian(loss_flat)(y)) if self.n <= DENSE_MAX \
            else None

        hvp = lambda y, v: jax.jvp(jax.grad(loss_flat), (y,), (v,))[1]  # noqa: E731

        @jax.jit
        def sharpness(y):
            # Power iteration (as flowsim.sharpness, compiled once here for all the calls).
            def body(_, v):
                w = hvp(y, v)
                return w / jnp.linalg.norm(w)

            v = jax.lax.fori_loop(0, 100, body, jnp.ones_like(y) / jnp.sqrt(y.size))
            return jnp.vdot(v, hvp(y, v))

        self.sharpness = sharpness

    def ravel(self, model):
        return ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


# --------------------------------------------------------------------------- methods

def uses_kinks(flat):
    """Does flowsim's default take the exact-kink (event-driven) path on this problem?"""
    return flowsim_kinks.resolve("auto", flat.problem.model, flat.problem.loss) is not None


def run_flowsim(flat, solver, tol, max_steps, t1=None, kinks="auto", count_evals=False):
    p = flat.problem
    traj = flowsim.gradient_flow(p.model, p.loss, p.t1 if t1 is None else t1, solver=solver,
                                 rtol=tol, atol=tol, max_steps=max_steps, throw=False,
                                 kinks=kinks, count_evals=count_evals)
    jax.block_until_ready(traj.models)
    ok = bool(traj.succeeded)
    y = flat.ravel(traj.final_model())
    info = {"num_steps": int(traj.stats["num_steps"]),
            "num_rejected": int(traj.stats["num_rejected_steps"]), "solver": traj.solver}
    if "num_grad_evals" in traj.stats:  # explicit solvers (stages x steps + 1) or counted
        info.update(grad_evals=int(traj.stats["num_grad_evals"]),
                    hvp_evals=int(traj.stats.get("num_hvp_evals", 0)))
    if "num_events" in traj.stats:
        info.update(kink_events=int(traj.stats["num_events"]))
    return y, ok, info


def count_flowsim(flat, solver, tol, max_steps, kinks):
    """Evaluation counts from an untimed run with `count_evals=True` (exact for any solver)."""
    _, _, info = run_flowsim(flat, solver, tol, max_steps, kinks=kinks, count_evals=True)
    return {"grad_evals": info["grad_evals"], "hvp_evals": info["hvp_evals"]}


def run_scipy(flat, method, tol):
    counts = Counter()
    neg_grad, neg_hess = flat.neg_grad, flat.neg_hess

    def fun(t, y):
        counts["grad"] += 1
        return np.asarray(neg_grad(y))

    kw = {}
    if neg_hess is not None:
        def jac(t, y):
            counts["jac"] += 1
            return np.asarray(neg_hess(y))
        kw["jac"] = jac
    sol = scipy.integrate.solve_ivp(fun, (0.0, flat.problem.t1), np.asarray(flat.y0),
                                    method=method, rtol=tol, atol=tol, **kw)
    info = {"num_steps": int(sol.t.size - 1), "grad_evals": counts["grad"],
            "hvp_evals": counts["jac"] * flat.n, "jac_evals": counts["jac"]}
    return sol.y[:, -1], bool(sol.success), info


def make_odeint(flat):
    from jax.experimental.ode import odeint

    def f(y, t):
        return flat.neg_grad(y)

    @partial(jax.jit, static_argnums=1)
    def solve(y0, tol):
        return odeint(f, y0, jnp.array([0.0, flat.problem.t1]), rtol=tol, atol=tol,
                      mxstep=1_000_000)[-1]

    return solve


def make_rk4(flat, h, n_steps):
    @jax.jit
    def solve(y0):
        def body(_, y):
            k1 = flat.neg_grad(y)
            k2 = flat.neg_grad(y + 0.5 * h * k1)
            k3 = flat.neg_grad(y + 0.5 * h * k2)
            k4 = flat.neg_grad(y + h * k3)
            return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

        return jax.lax.fori_loop(0, n_steps, body, y0)

    return solve


# --------------------------------------------------------------------------- reference

def reference(flat, stiff, quick):
    """Tight solve + an independent second method; returns (y_ref, cross-check info)."""
    p = flat.problem
    t0 = time.perf_counter()
    if stiff:
        # quick: scipy LSODA at 1e-12 (cheap) checked by Kvaerno5 at 1e-10; full: Kvaerno5 at
        # 1e-12 checked by scipy Radau at 1e-12.
        tol = 1e-10 if quick else 1e-12
        main = flowsim.gradient_flow(p.model, p.loss, p.t1, solver="kvaerno5", rtol=tol, atol=tol,
                                     max_steps=200_000, ts=np.linspace(0, p.t1, 11))
        y_main = flat.ravel(main.final_model())
        second_method = "LSODA" if quick else "Radau"
        y2, ok2, _ = run_scipy(flat, second_method, 1e-12)
        second = f"scipy {second_method} rtol=atol=1e-12"
        y_ref = y2 if quick else y_main
        if quick:
            y2 = y_main
            first, second = second, f"Kvaerno5 rtol=atol={tol:g}"
    else:
        tol = 1e-12 if not quick else 1e-11
        if flat.n > 50_000:
            tol = 1e-10  # minutes per solve: measured errors there are >= 1e-8
        main = flowsim.gradient_flow(p.model, p.loss, p.t1, solver="dopri8", rtol=tol, atol=tol,
                                     max_steps=200_000, ts=np.linspace(0, p.t1, 11))
        y_ref = flat.ravel(main.final_model())
        tol2 = tol * 10
        sec = flowsim.gradient_flow(p.model, p.loss, p.t1, solver="tsit5", rtol=tol2, atol=tol2,
                                    max_steps=400_000, kinks="smooth")
        y2 = flat.ravel(sec.final_model())
        second = f"plain diffrax Tsit5 (kinks='smooth') rtol=atol={tol2:g}"
    if not (stiff and quick):
        first = f"{main.solver} rtol=atol={tol:g}"
    # Sharpness along the reference (for RK4's fixed step alpha / lambda_max).
    lams = [float(flat.sharpness(flat.ravel(main.model_at(k)))) for k in range(main.num_saved)]
    cross = rel_err(np.asarray(y2), y_ref)
    print(f"reference: {first}; cross-check {second}: relative difference {cross:.2e} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return y_ref, {"method": first, "cross_check": second, "cross_check_rel_diff": cross,
                   "lambda_max_along": lams}


def rel_err(y, y_ref):
    y, y_ref = np.asarray(y), np.asarray(y_ref)
    if not np.all(np.isfinite(y)):
        return float("inf")
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


# --------------------------------------------------------------------------- driver

def interp_time(points, err):
    """Wall time a method needs for final error `err`: log-log interpolation along its curve.

    None when `err` is outside the range of errors the method reached.
    """
    pts = sorted((p["error"], p["median_s"]) for p in points
                 if p.get("ok") and p.get("median_s") and p["error"] > 0
                 and math.isfinite(p["error"]))
    if not pts:
        return None
    es = np.log([e for e, _ in pts])
    ts = np.log([t for _, t in pts])
    le = math.log(err)
    if le < es[0] - 1e-9 or le > es[-1] + 1e-9:
        return None
    # a more accurate run that was also cheaper dominates: time non-increasing in error
    ts = np.minimum.accumulate(ts)
    return float(math.exp(np.interp(le, es, ts)))


def bench_problem(problem, *, stiff, tols, methods, repeats, quick, time_budget_s):
    flat = Flat(problem)
    print(f"\n== {problem.name}: {problem.note} — {flat.n} parameters", flush=True)
    y_ref, ref_info = reference(flat, stiff, quick)
    points = []
    lam = max(abs(x) for x in ref_info["lambda_max_along"])

    big = flat.n > 50_000  # a solve takes minutes: compile on a short horizon, time one run

    def record(method, tol, run, count=None, note="", warm=None):
        if big and warm is not None:
            warm()  # same compiled solve (t1 is traced), 1/1000 of the horizon
            count = None  # explicit solvers report exact counts; no second full solve
        t_start = time.perf_counter()
        try:
            y, ok, info = run()  # warm-up (compile) and correctness check
        except Exception as e:  # a peer that cannot run this problem
            points.append({"method": method, "tol": tol, "ok": False,
                           "note": f"error: {e!r}"[:200]})
            print(f"  {method:22s} tol={_common.fmt(tol):<8s} FAILED: {e!r}"[:160], flush=True)
            return
        first_s = time.perf_counter() - t_start
        err = rel_err(y, y_ref)
        ok = ok and math.isfinite(err)
        entry = {"method": method, "tol": tol, "ok": ok, "error": err, "first_call_s": first_s,
                 **info, "note": note}
        if ok and big and warm is not None:
            entry.update(median_s=first_s, times_s=[first_s],
                         note=(note + " single timed run (compiled beforehand)").strip())
        elif ok:
            t = _common.timeit(lambda: run()[0], repeats=repeats, warmup=0,
                               budget_s=time_budget_s)
            entry.update(median_s=t["median_s"], times_s=t["times_s"])
            if count is not None:
                entry.update(count())
        points.append(entry)
        print(f"  {method:22s} tol={_common.fmt(tol):<8s} err={err:9.2e} "
              f"time={_common.fmt(entry.get('median_s'))} s steps={info.get('num_steps')} "
              f"grads={entry.get('grad_evals')} hvps={entry.get('hvp_evals')} "
              f"{'' if ok else 'FAILED'}", flush=True)

    max_steps = 100_000
    for name in methods:
        if name.startswith(("flowsim:", "diffrax:")) or name == "flowsim default":
            solver = "auto" if name == "flowsim default" else name.split(":", 1)[1]
            # "diffrax:tsit5": flowsim's plain diffrax path (kinks="smooth"), the baseline.
            kinks = "smooth" if name.startswith("diffrax:") else "auto"
            solver = solver.strip()
            # count_evals counts smooth solves (the exact-kink path reports its events).
            countable = kinks == "smooth" or not uses_kinks(flat)
            for tol in tols:
                record(name, tol,
                       lambda s=solver, tol=tol, k=kinks: run_flowsim(flat, s, tol, max_steps,
                                                                      kinks=k),
                       count=(lambda s=solver, tol=tol, k=kinks: count_flowsim(
                           flat, s, tol, max_steps, k)) if countable else None,
                       warm=lambda s=solver, tol=tol, k=kinks: run_flowsim(
                           flat, s, tol, max_steps, t1=problem.t1 * 1e-3, kinks=k))
        elif name.startswith("scipy "):
            method = name.split()[1]
            if flat.neg_hess is None and method in ("BDF", "Radau"):
                points.append({"method": name, "ok": False, "note": (
                    f"not run: needs the dense {flat.n}x{flat.n} Hessian "
                    f"({8 * flat.n**2 / 1e9:.0f} GB) as its Jacobian")})
                print(f"  {name:22s} not run (dense Jacobian infeasible)")
                continue
            # one decade further: the peers are less accurate at the same tolerance
            for tol in [*tols, max(tols[-1] * 1e-2, 1e-13)]:
                record(name, tol, lambda m=method, tol=tol: run_scipy(flat, m, tol))
        elif name == "jax odeint":
            solve = make_odeint(flat)
            for tol in [*tols, max(tols[-1] * 1e-2, 1e-13)]:
                record(name, tol, lambda tol=tol, f=solve: (f(flat.y0, tol), True, {}))
        elif name == "RK4 alpha/lambda_max":
            h = 1.0 / lam
            n_steps = math.ceil(problem.t1 / h)
            h = problem.t1 / n_steps
            if n_steps > 2_000_000:
                points.append({"method": name, "ok": False, "note": f"not run: {n_steps} steps"})
                continue
            solve = make_rk4(flat, h, n_steps)
            record(name, None, lambda f=solve, k=n_steps: (f(flat.y0), True, {
                "num_steps": k, "grad_evals": 4 * k, "hvp_evals": 0}),
                note=f"h = 1/lambda_max = {h:.3g}, {n_steps} steps")
    return flat, ref_info, points


def summarize(problem_name, points, err_targets):
    """Rows: method x target error -> interpolated wall time."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    rows = []
    for m in methods:
        pts = [p for p in points if p["method"] == m]
        notes = {p.get("note") for p in pts if p.get("note")}
        if not any(p.get("ok") for p in pts):
            rows.append([m, *["n/a"] * len(err_targets), "; ".join(sorted(notes))[:80]])
            continue
        best = min((p for p in pts if p.get("ok")), key=lambda p: p["error"])
        rows.append([m, *[interp_time(pts, e) for e in err_targets],
                     f"best err {best['error']:.1e} in {best['median_s']:.3g} s, "
                     f"{best.get('grad_evals')} grads + {best.get('hvp_evals')} HVPs"])
    return _common.table(["method", *[f"t(err {e:.0e}) s" for e in err_targets], "note"], rows,
                         title=f"{problem_name}: wall time (median) to reach final error")


def detail_table(problem_name, points):
    rows = [[p["method"], p.get("tol"), p.get("error"), p.get("median_s"), p.get("num_steps"),
             p.get("grad_evals"), p.get("hvp_evals"), "ok" if p.get("ok") else "FAIL"]
            for p in points]
    return _common.table(["method", "tol", "rel. error", "median s", "steps", "grads", "HVPs",
                          "status"], rows, title=f"{problem_name}: every run")


def target_ratio(points, method, baseline, tol):
    """flowsim `method` at `tol` vs `baseline` interpolated at the same final error."""
    mine = [p for p in points if p["method"] == method and p.get("tol") == tol and p.get("ok")]
    if not mine:
        return None
    err = mine[0]["error"]
    base = interp_time([p for p in points if p["method"] == baseline], err)
    return {"method": method, "tol": tol, "error": err, "time_s": mine[0]["median_s"],
            "baseline": baseline, "baseline_time_s": base,
            "ratio": None if base is None else mine[0]["median_s"] / base}


STIFF_ERRORS = (1e-7, 1e-9, 1e-11)
"""The final errors at which the stiff target is checked (both methods interpolated there)."""


def ratios_at_errors(points, method, baseline, errors):
    """`method`'s time over `baseline`'s at each equal final error: log-log interpolation of
    both along their tolerance ladders. Where every run of `method` is more accurate than
    `err`, its cheapest run counts (an upper bound on its time to reach `err`: conservative
    for `method`); None where the baseline did not reach that error."""
    out = []
    for err in errors:
        runs = [p for p in points if p["method"] == method]
        mine = interp_time(runs, err)
        within = [p["median_s"] for p in runs if p.get("ok") and p.get("median_s")
                  and 0 < p["error"] <= err]
        if mine is None and within:
            mine = min(within)
        base = interp_time([p for p in points if p["method"] == baseline], err)
        out.append({"error": err, "time_s": mine, "baseline_time_s": base,
                    "ratio": None if mine is None or base is None else mine / base})
    return out


def plot(results, out, quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, res in results.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for m in dict.fromkeys(p["method"] for p in res["points"]):
            pts = sorted((p for p in res["points"] if p["method"] == m and p.get("ok")
                          and p.get("median_s")), key=lambda p: p["error"])
            if not pts:
                continue
            e = [max(p["error"], 1e-16) for p in pts]
            axes[0].loglog(e, [p["median_s"] for p in pts], "o-", label=m)
            ev = [(p.get("grad_evals") or 0) + (p.get("hvp_evals") or 0) for p in pts]
            if all(ev):
                axes[1].loglog(e, ev, "o-", label=m)
        axes[0].set(xlabel="final relative parameter error", ylabel="wall time (s, median)",
                    title=res["problem"])
        axes[1].set(xlabel="final relative parameter error", ylabel="gradient + HVP evaluations")
        for ax in axes:
            ax.invert_xaxis()
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        files.append(_common.savefig(fig, out, f"work_precision_{key}", quick=quick))
        plt.close(fig)
    return files


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=None,
                   choices=["stiff", "mlp", "fig2", "matrix_free"],
                   help="default: stiff mlp fig2 (with --quick: stiff mlp; the reduced Fig 2 "
                        "network alone takes ~2 minutes, run it with --quick --problems fig2); "
                        "matrix_free: the stiff 52k-parameter deep linear net "
                        "(stiff_matrix_free.py, its own table and JSON)")
    p.add_argument("--fig2-reduced", action="store_true",
                   help="use the reduced Fig 2 network (100->10->10->10) even without --quick")
    args = p.parse_args(argv)
    quick = args.quick
    if args.problems and "matrix_free" in args.problems:
        import stiff_matrix_free  # imports this module: loaded only when asked for

        stiff_matrix_free.main([*(["--quick"] if quick else []), "--out", str(args.out),
                                *(["--repeats", str(args.repeats)] if args.repeats else [])])
        args.problems = [x for x in args.problems if x != "matrix_free"]
        if not args.problems:
            return
    if args.problems is None:
        args.problems = ["stiff", "mlp"] if quick else ["stiff", "mlp", "fig2"]
    repeats = args.repeats or 3
    warnings.simplefilter("ignore", flowsim.FlowWarning)
    warnings.filterwarnings("ignore", message="At least one element of `rtol` is too small")
    results = {}
    peers = ["scipy LSODA", "scipy BDF", "scipy Radau", "jax odeint"]
    if "stiff" in args.problems:
        if quick:
            methods = ["flowsim default", "flowsim:kvaerno5", "scipy LSODA"]
            tols = [1e-6, 1e-8]
        else:
            methods = ["flowsim default", "flowsim:kvaerno3", "flowsim:kvaerno4",
                       "flowsim:kvaerno5", *peers[:3]]
            tols = [1e-4, 1e-6, 1e-8, 1e-10, 1e-12]
        prob = _problems.stiff_factorization()
        _, ref, pts = bench_problem(prob, stiff=True, tols=tols, methods=methods,
                                    repeats=repeats, quick=quick, time_budget_s=20)
        pts.append({"method": "flowsim:tsit5", "ok": False, "note": (
            "not run: explicit, stability alone needs >= lambda_max T / 3.3 ~ 6e5 steps "
            "(measured: fails at max_steps=200000)")})
        pts.append({"method": "RK4 alpha/lambda_max", "ok": False, "note": (
            f"not run: {prob.t1 * max(ref['lambda_max_along']):.1e} steps")})
        results["stiff"] = {"problem": prob.name, "note": prob.note, "reference": ref,
                            "points": pts,
                            "target": target_ratio(pts, "flowsim default", "scipy LSODA", 1e-8),
                            "target_by_error": ratios_at_errors(pts, "flowsim default",
                                                                "scipy LSODA", STIFF_ERRORS),
                            "target_kvaerno5": target_ratio(pts, "flowsim:kvaerno5",
                                                            "scipy LSODA", 1e-8),
                            "target_rule": "flowsim default <= 1.0x scipy LSODA at equal error"}
    if "mlp" in args.problems:
        prob = _problems.relu_teacher((10, 20, 20, 1), 50, t1=2.0, activation="tanh",
                                      name="tanh MLP, short horizon")
        prob.note += " (smooth, non-stiff: lambda_max T ~ 10)"
        methods = (["flowsim default", "flowsim:tsit5", "flowsim:dopri8", "scipy LSODA",
                    "jax odeint",
                    "RK4 alpha/lambda_max"] if quick else
                   ["flowsim default", "flowsim:bosh3", "flowsim:dopri5", "flowsim:dopri8",
                    "flowsim:kvaerno5", *peers, "RK4 alpha/lambda_max"])
        tols = [1e-6, 1e-9] if quick else [1e-4, 1e-6, 1e-8, 1e-10, 1e-12]
        _, ref, pts = bench_problem(prob, stiff=False, tols=tols, methods=methods,
                                    repeats=max(repeats, 3), quick=quick, time_budget_s=10)
        results["mlp"] = {"problem": prob.name, "note": prob.note, "reference": ref, "points": pts}
    if "fig2" in args.problems:
        reduced = quick or args.fig2_reduced
        prob = _problems.fig2(quick=reduced)
        methods = ["flowsim default", "flowsim:dopri8", "diffrax:tsit5", "diffrax:dopri8"]
        if reduced:
            methods += ["jax odeint", "scipy LSODA"]
        tols = [1e-6, 1e-8]
        _, ref, pts = bench_problem(prob, stiff=False, tols=tols, methods=methods,
                                    repeats=1 if not reduced else repeats, quick=quick,
                                    time_budget_s=0)
        for m in ("scipy BDF", "scipy Radau", "scipy LSODA"):
            if not any(q["method"] == m for q in pts):
                n = sum(x.size for x in jax.tree.leaves(eqx.filter(prob.model,
                                                                    eqx.is_inexact_array)))
                pts.append({"method": m, "ok": False, "note": (
                    f"not run: dense {n}x{n} Jacobian ({8 * n * n / 1e9:.0f} GB)"
                    + ("; LSODA switches to BDF with it once stiff" if m == "scipy LSODA"
                       else ""))})
        if not reduced:
            pts.append({"method": "jax odeint", "ok": False, "note": (
                "not run on the full network (time budget); see the reduced network")})
        pts.append({"method": "flowsim:kvaerno5", "ok": False, "note": (
            "not run: matrix-free Newton+GMRES did not reach t=2 in 9 min (NOTES-solvers.md)")})
        results["fig2"] = {"problem": prob.name, "note": prob.note, "reference": ref, "points": pts,
                           "target": target_ratio(pts, "flowsim default", "diffrax:tsit5", 1e-8),
                           "target_rule": "flowsim default <= 0.5x diffrax Tsit5 at equal error"}

    errs = [1e-4, 1e-6, 1e-8, 1e-10, 1e-12]
    tables = []
    for res in results.values():
        tables.append(detail_table(res["problem"], res["points"]))
        tables.append(summarize(res["problem"], res["points"], errs))
    trows = []
    for key, res in results.items():
        t = res.get("target")
        if t:
            limit = 1.0 if key == "stiff" else 0.5
            trows.append([res["target_rule"], t["time_s"], t["baseline_time_s"], t["ratio"],
                          "met" if t["ratio"] is not None and t["ratio"] <= limit else "MISSED"])
    for row in results.get("stiff", {}).get("target_by_error", []):
        r = row["ratio"]
        trows.append([f"stiff: flowsim default <= 1.0x LSODA at error {row['error']:g}",
                      row["time_s"], row["baseline_time_s"], r,
                      "not measured: outside the ladder's errors" if r is None
                      else ("met" if r <= 1.0 else "MISSED")])
    if trows:
        tables.append(_common.table(["target", "flowsim s", "baseline s", "ratio", "status"],
                                    trows, title="Targets (same run, medians)"))
    figs = [] if args.no_plot else plot(results, args.out, quick)
    name = "work_precision"
    if sorted(args.problems) != sorted(["stiff", "mlp", "fig2"]) and not (
            quick and sorted(args.problems) == ["mlp", "stiff"]):
        name += "_" + "_".join(args.problems)
    _common.write_json(args.out, name,
                       {"repeats": repeats, "results": results, "figures": figs,
                        "tables": tables}, quick=quick)


if __name__ == "__main__":
    main()
