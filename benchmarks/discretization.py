"""Discretization error: gradient descent against gradient flow at matched times t_k = sum eta_i.

Three problems: (a) matrix factorization, (b) a small ReLU MLP (square loss), (c) a deep linear
network with logistic loss on separable data.

1. Constant step eta over a range, fixed horizon T: the error ||theta_GD(T) - theta(T)|| against
   the plain flow (fitted order ~1 in eta) and against the modified flow of
   L + (eta/4)||grad L||^2 (order ~2). The flow is solved with Tsit5 at rtol=atol=1e-12, far
   below the errors measured (checked: a second solve at 1e-11 must agree to < 1e-3 of the
   smallest error).
   (With --quick the check is instead the flow's drift of the conserved layer gaps.)
2. Power-decay steps eta_k = eta0 (k+1)^-(1/2+delta), delta in {0, 0.1, 0.25, 0.5}, several eta0:
   final parameter and function errors against the flow, and the drift of every hidden unit's
   balance gap ||W_h[i,:]||^2 - ||W_{h+1}[:,i]||^2 measured along GD next to the GD ledger's
   exact prediction sum eta_k^2 (||g_in||^2 - ||g_out||^2).

Figures: error vs eta (log-log, fitted slopes), layer drift vs iteration per delta.
Run `python benchmarks/discretization.py [--quick]`.
"""

import time
import warnings

import _common
import _problems
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import flowsim
from flowsim import invariants

FLOW_TOL = 1e-12


def problems(quick):
    kM, kw, kx, kd = jr.split(jr.key(1), 4)
    M = flowsim.data.low_rank_matrix(8, 6, (2.0, 1.0), key=kM)
    mf = flowsim.models.MatrixFactorization.random(8, 6, 2, scale=0.3, key=kw)
    mlp = _problems.relu_teacher((5, 8, 1), 20, t1=2.0, seed=3)
    X, y = flowsim.data.separable(40, 4, margin=0.2, key=kd)
    deep = flowsim.models.MLP((4, 4, 4, 1), "linear", init_std=0.5, key=kx)
    return [
        ("factorization", mf, flowsim.losses.factorization(M), None, "8x6 rank 2, U V^T from 0.3"),
        ("relu_mlp", mlp.model, mlp.loss, mlp.inputs, "5->8->1 ReLU, 20 points, teacher targets"),
        ("deep_linear_logistic", deep, flowsim.losses.logistic(X, y), X,
         "4->4->4->1 linear, logistic, 40 separable points"),
    ]


def flow_at(model, loss, gd):
    t1 = float(gd.ts[-1])
    return flowsim.gradient_flow(model, loss, t1, ts=gd.ts, solver="tsit5", rtol=FLOW_TOL,
                                 atol=FLOW_TOL, max_steps=200_000)


def constant_step(name, model, loss, inputs, etas, horizon):
    rows = []
    for eta in etas:
        K = round(horizon / eta)
        # 21 saved iterates everywhere: one compiled flow per loss, whatever eta.
        gd = flowsim.gradient_descent(model, loss, K, learning_rate=eta, save_every=K // 20)
        flow = flow_at(model, loss, gd)
        plain = flowsim.discretization_error(gd, flow, inputs)
        mod = flowsim.discretization_error(
            gd, flow_at(model, flowsim.modified_flow_loss(loss, eta), gd), inputs)
        rows.append({"eta": eta, "steps": K, "err_flow": float(plain.parameter[-1]),
                     "err_modified": float(mod.parameter[-1]),
                     "func_err_flow": float(plain.function[-1])})
    slope_plain = _common.fit_slope(etas, [r["err_flow"] for r in rows])
    slope_mod = _common.fit_slope(etas, [r["err_modified"] for r in rows])
    return {"problem": name, "horizon": horizon, "rows": rows, "order_flow": slope_plain,
            "order_modified": slope_mod, "_last_flow": flow}


def check_flow_accuracy(model, loss, flow, smallest_err):
    """The reference flow must be far more accurate than the errors it measures."""
    a = flow
    b = flowsim.gradient_flow(model, loss, float(flow.ts[-1]), solver="dopri8", rtol=1e-11,
                              atol=1e-11, max_steps=200_000)
    pa = jax.tree.leaves(a.final_model())
    pb = jax.tree.leaves(b.final_model())
    diff = float(jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(pa, pb))))
    assert diff < 1e-3 * smallest_err, (
        f"flow reference not accurate enough: Tsit5 1e-12 vs Dopri8 1e-11 differ by {diff:.2e}, "
        f"smallest GD error {smallest_err:.2e}")
    return diff


def power_decay(name, model, loss, inputs, deltas, eta0s, steps, save_every):
    rows, curves = [], {}
    for eta0 in eta0s:
        for delta in deltas:
            sched = flowsim.schedules.power_decay(eta0, delta)
            gd = flowsim.gradient_descent(model, loss, steps, learning_rate=sched,
                                          save_every=save_every)
            if not bool(gd.succeeded):
                rows.append({"eta0": eta0, "delta": delta, "diverged_at":
                             int(gd.stats["diverged_at"])})
                continue
            err = flowsim.discretization_error(gd, flow_at(model, loss, gd), inputs)
            ledger = invariants.gd_drift_ledger(gd)
            measured = np.asarray(ledger.layer_measured)
            predicted = np.asarray(ledger.layer_predicted)
            scale = float(np.max(np.asarray(invariants.layer_norms(gd.models))))
            rows.append({
                "eta0": eta0, "delta": delta, "t_K": float(gd.ts[-1]),
                "param_err": float(err.parameter[-1]), "func_err": float(err.function[-1]),
                "gd_drift": float(np.max(np.abs(measured))),
                "ledger_predicted": float(np.max(np.abs(predicted))),
                "ledger_mismatch": float(ledger.max_discrepancy()),
                "flow_drift": float(err.flow_drift[-1]),
                "drift_rel_scale": float(np.max(np.abs(measured))) / scale,
            })
            if eta0 == eta0s[-1]:
                curves[delta] = {"steps": np.asarray(gd.steps).tolist(),
                                 "measured": np.max(np.abs(measured), axis=-1).tolist(),
                                 "predicted": np.max(np.abs(predicted), axis=-1).tolist()}
    return {"problem": name, "steps": steps, "rows": rows, "curves": curves}


def plot(const, decay, out, quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(const), figsize=(4.2 * len(const), 3.6))
    for ax, c in zip(np.atleast_1d(axes), const):
        eta = [r["eta"] for r in c["rows"]]
        ax.loglog(eta, [r["err_flow"] for r in c["rows"]], "o-",
                  label=f"vs flow (slope {c['order_flow']:.2f})")
        ax.loglog(eta, [r["err_modified"] for r in c["rows"]], "s-",
                  label=f"vs modified flow (slope {c['order_modified']:.2f})")
        ax.set(xlabel="eta", ylabel=f"||theta_GD(T) - theta(T)||, T={c['horizon']:g}",
               title=c["problem"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    files = [_common.savefig(fig, out, "discretization_order", quick=quick)]
    plt.close(fig)
    fig, axes = plt.subplots(1, len(decay), figsize=(4.2 * len(decay), 3.6))
    for ax, d in zip(np.atleast_1d(axes), decay):
        for delta, cv in d["curves"].items():
            k = np.maximum(np.asarray(cv["steps"]), 1)
            (line,) = ax.loglog(k, np.maximum(cv["measured"], 1e-18), label=f"delta={delta:g}")
            ax.loglog(k, np.maximum(cv["predicted"], 1e-18), "--", color=line.get_color(),
                      lw=2.5, alpha=0.4)
        ax.set(xlabel="GD iteration k", ylabel="max layer-gap drift (dashed: ledger)",
               title=d["problem"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    files.append(_common.savefig(fig, out, "discretization_drift", quick=quick))
    plt.close(fig)
    return files


def main(argv=None):
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    quick = args.quick
    warnings.simplefilter("ignore", flowsim.DivergenceWarning)
    etas = [0.1, 0.05, 0.025] if quick else [0.1, 0.05, 0.025, 0.0125, 0.00625]
    horizon = 2.0
    deltas = [0.0, 0.1, 0.25, 0.5]
    eta0s = [0.2] if quick else [0.02, 0.05, 0.1, 0.2]
    steps, save_every = (400, 20) if quick else (4000, 200)
    t_start = time.perf_counter()
    const, decay = [], []
    for name, model, loss, inputs, desc in problems(quick):
        c = constant_step(name, model, loss, inputs, etas, horizon)
        c["description"] = desc
        smallest = min(r["err_modified"] for r in c["rows"])
        flow = c.pop("_last_flow")
        if quick:  # the conserved layer gaps as the accuracy check (no second compile)
            gaps = np.asarray(invariants.layer_gaps(flow.models))
            c["flow_reference_diff"] = float(np.max(np.abs(gaps - gaps[0])))
            assert c["flow_reference_diff"] < 1e-3 * smallest, c["flow_reference_diff"]
        else:
            c["flow_reference_diff"] = check_flow_accuracy(model, loss, flow, smallest)
        const.append(c)
        decay.append(power_decay(name, model, loss, inputs, deltas, eta0s, steps, save_every))
        print(f"{name}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    tables = []
    tables.append(_common.table(
        ["problem", "eta", "steps", "err vs flow", "err vs modified flow"],
        [[c["problem"], r["eta"], r["steps"], r["err_flow"], r["err_modified"]]
         for c in const for r in c["rows"]],
        title=f"Constant step, parameter error at T = {horizon:g}"))
    tables.append(_common.table(
        ["problem", "fitted order vs flow (expect ~1)", "vs modified flow (expect ~2)",
         "flow ref. check"],
        [[c["problem"], c["order_flow"], c["order_modified"], c["flow_reference_diff"]]
         for c in const], title="Fitted orders"))
    tables.append(_common.table(
        ["problem", "eta0", "delta", "t_K", "param err", "func err", "GD drift",
         "ledger predicts", "|meas-pred|", "flow drift"],
        [[d["problem"], r["eta0"], r["delta"], r.get("t_K"), r.get("param_err"),
          r.get("func_err"), r.get("gd_drift"), r.get("ledger_predicted"),
          r.get("ledger_mismatch"), r.get("flow_drift", f"diverged at {r.get('diverged_at')}")]
         for d in decay for r in d["rows"]],
        title=f"Power-decay steps eta0 (k+1)^-(1/2+delta), {steps} iterations"))
    figs = [] if args.no_plot else plot(const, decay, args.out, quick)
    _common.write_json(args.out, "discretization",
                       {"constant_step": const, "power_decay": decay, "figures": figs,
                        "tables": tables, "elapsed_s": time.perf_counter() - t_start},
                       quick=quick)
    for c in const:
        assert 0.7 < c["order_flow"] < 1.3, f"{c['problem']}: order vs flow {c['order_flow']:.2f}"
        # Backward error analysis needs a smooth loss: on the ReLU net the modified flow's
        # gain is cut by kinks crossed between iterates (measured ~1.25; reported, not asserted).
        if c["problem"] != "relu_mlp":
            assert 1.6 < c["order_modified"] < 2.4, (
                f"{c['problem']}: order vs modified flow {c['order_modified']:.2f}")


if __name__ == "__main__":
    main()
