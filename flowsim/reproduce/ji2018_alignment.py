"""Ji & Telgarsky (2018): gradient flow and GD align the layers of a deep linear network.

A depth-3 linear network x -> W3 W2 W1 x (no biases) on linearly separable data
(`flowsim.data.separable`), logistic loss (the problem `flowsim.problems.deep_linear_logistic`),
from a small Gaussian initialisation, trained by gradient flow (Tsit5, adaptive steps: its step
size grows with t, so horizons like 1e6 cost a few thousand steps) and by GD with a constant
step. Along both:

- the risk goes to 0;
- each layer becomes rank one: sigma_2 / sigma_1 of W1 and W2 -> 0 (W3 is a row);
- adjacent layers align: |v_{i+1}^T u_i| -> 1 (u_i, v_i the top left/right singular vectors);
- the direction of the end-to-end vector w = W3 W2 W1 tends to the L2 max-margin separator
  w* = argmin ||w||^2 s.t. y_i <w, x_i> >= 1 (no bias, like the network).

w* is computed with scipy (`flowsim.problems.deep_linear_logistic.max_margin`): the primal QP
by SLSQP (`scipy.optimize.minimize`), cross-checked against the dual (max sum(alpha) -
1/2 ||sum alpha_i y_i x_i||^2, alpha >= 0) solved by L-BFGS-B with bounds; both are reported and
must agree.

The angle to w* closes slowly (like 1/log t for the logistic loss), so the verdict on it is a
threshold in degrees at the horizon reached, and the figure shows the whole decay on a log axis.
"""

import jax
import jax.random as jr
import numpy as np

from .. import gradient_descent, gradient_flow, init, invariants, problems
from .._results import codes as _result_codes
from ..problems.deep_linear_logistic import angle, max_margin
from ._base import Experiment, Report, figure, finish, positive

RISK_TOL = 1e-3
RANK_TOL = 0.05  # sigma_2 / sigma_1 of W1, W2
ALIGN_TOL = 0.99  # |v_{i+1}^T u_i|
ANGLE_TOL_DEG = 10.0  # angle between W3 W2 W1 and w*, flow at its horizon
ANGLE_TOL_GD_DEG = 15.0  # GD at its (much shorter) horizon
MARGIN_RATIO = 0.95  # normalized margin min_i y_i <w, x_i> / ||w|| over the max margin, flow
MARGIN_RATIO_GD = 0.9
SVM_AGREE_TOL = 1e-5  # primal vs dual max-margin direction, radians


def _setup(quick: bool):
    if quick:
        return dict(n=20, d=4, width=4, margin=0.1, init_scale=0.02, flow_t1=1e8, n_save=30,
                    gd_eta=0.5, gd_steps=4000, save_every=50)
    return dict(n=100, d=10, width=10, margin=0.1, init_scale=0.02, flow_t1=1e10, n_save=80,
                gd_eta=0.5, gd_steps=40_000, save_every=200)


def _measures(traj, X, y, w_star):
    models = traj.models
    w = np.asarray(jax.vmap(lambda m: m.end_to_end())(models))[:, 0, :]  # (T, d)
    ranks = jax.vmap(invariants.rank_ratio)(models)
    align = np.asarray(jax.vmap(invariants.alignment)(models))
    margin = np.min((y[None] * (w @ X.T)), axis=1) / np.linalg.norm(w, axis=1)
    return dict(
        t=np.asarray(traj.ts), risk=np.asarray(traj.loss),
        rank=np.stack([np.asarray(r) for r in ranks[:-1]], axis=-1),  # W3 is a row: skip
        align=align, angle=np.degrees(np.asarray(angle(w, w_star))), margin=margin,
    )


def body(rep: Report) -> None:
    cfg = rep.setup(_setup(rep.quick))
    n, d, h = cfg["n"], cfg["d"], cfg["width"]
    sizes = (d, h, h, 1)
    # Weights N(0, init_scale^2 / fan_in): the "default" scheme with variance init_scale^2.
    problem = problems.deep_linear_logistic(sizes, n=n, margin=cfg["margin"], data_seed=0,
                                            init="default", variance=cfg["init_scale"] ** 2)
    Xn, yn = np.asarray(problem.X), np.asarray(problem.y)
    w_p, w_d, svm = max_margin(Xn, yn)  # the primal is problem.w_star; the dual cross-checks it
    svm["primal_dual_angle_rad"] = float(angle(w_p, w_d))
    loss = problem.loss
    cfg.update(sizes=sizes, seeds=rep.seeds)
    nets = init.batch(problem.init, rep.seeds, key=jr.key(1))

    ts = np.concatenate([[0.0], np.logspace(-1, np.log10(cfg["flow_t1"]), cfg["n_save"])])
    flow = gradient_flow(nets, loss, cfg["flow_t1"], ts=ts, solver="tsit5", rtol=1e-8,
                         atol=1e-10, max_steps=100_000, batched=True, throw=False)
    gd = gradient_descent(nets, loss, cfg["gd_steps"], learning_rate=cfg["gd_eta"],
                          save_every=cfg["save_every"], batched=True)
    res = {"flow": [_measures(flow[i], Xn, yn, w_p) for i in range(rep.seeds)],
           "GD": [_measures(gd[i], Xn, yn, w_p) for i in range(rep.seeds)]}
    flow_ok = np.asarray(flow.succeeded)

    def final(kind, key, reduce=np.max):
        return float(reduce([reduce(np.atleast_1d(r[key][-1])) for r in res[kind]]))

    rep.claim("max_margin_solvers_agree",
              "max-margin direction: SLSQP primal vs L-BFGS-B dual, angle (rad)",
              svm["primal_dual_angle_rad"], "<=", SVM_AGREE_TOL)
    rep.claim("flow_completed", "gradient flow reached its horizon: fraction of seeds",
              flow_ok.mean(), ">=", 1.0)
    for kind in ("flow", "GD"):
        rep.claim(f"{kind}_risk_to_zero", f"{kind}: final risk, worst seed",
                  final(kind, "risk"), "<=", RISK_TOL)
        rep.claim(f"{kind}_rank_one", f"{kind}: final sigma2/sigma1 of W1, W2, worst",
                  final(kind, "rank"), "<=", RANK_TOL)
        rep.claim(f"{kind}_layers_align", f"{kind}: final |v_(i+1)^T u_i|, worst pair and seed",
                  final(kind, "align", np.min), ">=", ALIGN_TOL)
    rep.claim("flow_angle_to_max_margin",
              f"flow: angle(W3W2W1, w*) in degrees at t = {cfg['flow_t1']:g}, worst seed",
              final("flow", "angle"), "<=", ANGLE_TOL_DEG)
    t_gd = cfg["gd_eta"] * cfg["gd_steps"]
    rep.claim("GD_angle_to_max_margin",
              f"GD: angle(W3W2W1, w*) in degrees at t = {t_gd:g}, worst seed",
              final("GD", "angle"), "<=", ANGLE_TOL_GD_DEG)
    for kind, thr in (("flow", MARGIN_RATIO), ("GD", MARGIN_RATIO_GD)):
        rep.claim(f"{kind}_margin_to_max",
                  f"{kind}: normalized margin of W3W2W1 / max margin, worst seed",
                  final(kind, "margin", np.min) / svm["margin"], ">=", thr)
    angle_decreasing = all(r["angle"][-1] < r["angle"][len(r["angle"]) // 2]
                           for kind in res for r in res[kind])
    rep.claim("angle_decreasing", "the angle keeps decreasing: final < halfway, all runs",
              float(angle_decreasing), ">=", 1.0)
    rep.record(
        max_margin=svm, max_margin_w=w_p,
        flow_stats={"num_steps": np.asarray(flow.stats["num_steps"]),
                    "result": _result_codes(flow.result)},
        **{f"{kind}_final": {
            "t": float(res[kind][0]["t"][-1]),
            "risk": [float(r["risk"][-1]) for r in res[kind]],
            "rank_ratio_W1_W2": [r["rank"][-1] for r in res[kind]],
            "alignment_W1W2_W2W3": [r["align"][-1] for r in res[kind]],
            "angle_deg": [float(r["angle"][-1]) for r in res[kind]],
            "normalized_margin": [float(r["margin"][-1]) for r in res[kind]],
        } for kind in res},
    )
    rep.note("max-margin separator: hard-margin SVM without bias, primal QP by scipy SLSQP, "
             "cross-checked with the dual QP by scipy L-BFGS-B (bounds alpha >= 0).")

    fig, axes = figure(2, 2, width=5.2, height=3.7)
    styles = {"flow": dict(ls="-"), "GD": dict(ls="--")}
    for kind, runs in res.items():
        for i, r in enumerate(runs):
            def lab(s, kind=kind, first=(i == 0)):
                return f"{kind}{s}" if first else None

            t = r["t"]
            k = slice(1, None)
            axes[0, 0].plot(t[k], positive(r["risk"][k]), color="C0", **styles[kind],
                            label=lab(""))
            for j in range(r["rank"].shape[-1]):
                axes[0, 1].plot(t[k], positive(r["rank"][k, j]), color=f"C{j}", **styles[kind],
                                label=lab(f": σ2/σ1 of W{j + 1}"))
            for j in range(r["align"].shape[-1]):
                axes[1, 0].plot(t[k], positive(1 - r["align"][k, j]), color=f"C{j}",
                                **styles[kind], label=lab(f": 1 − |v{j + 2}ᵀu{j + 1}|"))
            axes[1, 1].plot(t[k], r["angle"][k], color="C3", **styles[kind],
                            label=lab(": angle(W3W2W1, w*)"))
    finish(axes[0, 0], xlabel="time t (GD: t = kη)", ylabel="logistic risk", logx=True,
           logy=True, title="risk → 0")
    finish(axes[0, 1], xlabel="time t (GD: t = kη)", ylabel="σ2/σ1", logx=True, logy=True,
           title="each layer → rank one")
    finish(axes[1, 0], xlabel="time t (GD: t = kη)", ylabel="1 − alignment", logx=True,
           logy=True, title="adjacent layers align")
    finish(axes[1, 1], xlabel="time t (GD: t = kη)", ylabel="degrees", logx=True, logy=True,
           title="direction → max-margin separator (scipy SVM)")
    fig.suptitle(f"Ji & Telgarsky 2018: linear net {'→'.join(map(str, sizes))}, n={n} separable "
                 f"points, flow (solid) and GD η={cfg['gd_eta']:g} (dashed), {rep.seeds} seeds",
                 fontsize=11)
    rep.save_figure(fig, "alignment.png")


EXPERIMENT = Experiment(
    name="ji2018-alignment",
    title="deep linear net, logistic loss: layers align, direction -> max margin",
    reference="Ji & Telgarsky 2018 (arXiv 1810.02032)",
    body=body,
    default_seeds=4,
)
