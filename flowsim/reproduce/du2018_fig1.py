"""Du, Hu, Lee (2018), Fig 1: matrix factorization with and without the balancing regulariser.

GD on 1/2 ||U V^T - M||_F^2 and on the same plus (lambda/8) ||U^T U - V^T V||_F^2 (the regulariser
earlier analyses of asymmetric factorization needed), from the same Gaussian initialisation:
equal entry scales for U and V, at the scale of the balanced solution (E||U0||_F^2 = ||M||_*),
with V0 rescaled so that ||V0||_F = ||U0||_F (ratio 1 at the start; U0^T U0 != V0^T V0).

Claims checked:

- both runs converge (1/2 ||U V^T - M||^2 below a threshold relative to 1/2 ||M||^2);
- without the regulariser, ||U||_F^2 - ||V||_F^2 is conserved (GD changes it only by the
  ledger's sum of eta^2 (||g_U||^2 - ||g_V||^2)), so the ratio ||U||_F^2 / ||V||_F^2 stays
  constant to a stated tolerance; the ledger predicts the measured drift to rounding;
- without the regulariser the Gram gap U^T U - V^T V is conserved too (Thm 2.2, linear layers)
  up to the same O(eta^2) drift; with it, the regulariser drives U^T U - V^T V to 0.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .. import gradient_descent, init, invariants, losses, problems
from ._base import Experiment, Report, figure, finish, positive

RATIO_TOL = 0.05  # max_t |ratio_t / ratio_0 - 1| without the regulariser
GAP_TOL = 1e-2  # max_t |gap_t - gap_0| / (||U_t||^2 + ||V_t||^2) without the regulariser
GRAM_TOL = 0.1  # max_t | ||G_t|| - ||G_0|| | / ||G_0||, G = U^T U - V^T V, without it
GRAM_ZERO = 1e-8  # final ||G|| / ||G_0|| with the regulariser
CONVERGED = 1e-12  # final loss / (1/2 ||M||^2)
LEDGER_TOL = 1e-10  # |measured - predicted| gap drift, relative to the norms


def _setup(quick: bool):
    if quick:
        return dict(m=20, n=20, rank=3, steps=600, save_every=5, eta=0.1, lam=1.0)
    return dict(m=50, n=50, rank=5, steps=4000, save_every=10, eta=0.05, lam=1.0)


def body(rep: Report) -> None:
    cfg = rep.setup(_setup(rep.quick))
    m, n, r = cfg["m"], cfg["n"], cfg["rank"]
    svals = np.linspace(1.0, 0.5, r)
    nuclear = float(np.sum(svals))
    # Entry std such that E||U0||_F^2 = ||M||_*: the scale of the balanced factors U = Qa S^1/2;
    # init="balanced" rescales V0 to ||V0||_F = ||U0||_F.
    std = (nuclear / (m * r)) ** 0.5
    problem = problems.factorization((m, n), r, svals, data_seed=0, init="balanced",
                                     variance=std**2)
    cfg.update(singular_values=svals, init_std=std, seeds=rep.seeds)
    res = _run(problem, cfg, rep.seeds)
    plain = next(iter(res.values()))  # the run without the regulariser
    steps = np.asarray(plain["traj"].steps)
    scale = 0.5 * float(jnp.sum(problem.M**2))
    ledger = invariants.gd_drift_ledger(plain["traj"])
    _verdicts(rep, res, steps, scale, ledger)
    _figure(rep, cfg, res, steps, np.asarray(ledger.layer_predicted)[..., 0])
    rep.note("Both runs start from the same Gaussian initialisation; U and V have equal entry "
             "scales chosen so that E||U0||_F^2 = ||M||_* (the balanced solution's norm), and "
             "V0 is rescaled to ||V0||_F = ||U0||_F, so the ratio starts at 1 while the Gram gap "
             "U0^T U0 - V0^T V0 does not vanish.")


def _run(problem, cfg, seeds: int) -> dict:
    """GD without, then with the regulariser, from the same `seeds` inits: per run the
    trajectory, squared norms, fit, objective, Gram gap norm, norm ratio and norm gap."""
    base = problem.loss
    models = init.batch(problem.init, seeds, key=jr.key(1))
    runs = {
        "without regulariser": base,
        f"with regulariser (λ={cfg['lam']:g})": losses.balancing(base, cfg["lam"]),
    }
    res = {}
    for label, loss in runs.items():
        traj = gradient_descent(models, loss, cfg["steps"], learning_rate=cfg["eta"],
                                save_every=cfg["save_every"], batched=True)
        U, V = traj.models.U, traj.models.V
        nu = np.asarray(jnp.sum(U**2, axis=(-2, -1)))
        nv = np.asarray(jnp.sum(V**2, axis=(-2, -1)))
        fit = np.asarray(jax.vmap(jax.vmap(base))(traj.models))
        gram = np.asarray(jnp.linalg.norm(invariants.gram_gaps(traj.models)[0], axis=(-2, -1)))
        res[label] = dict(traj=traj, nu=nu, nv=nv, fit=fit, objective=np.asarray(traj.loss),
                          gram=gram, ratio=nu / nv, gap=nu - nv)
    return res


def _verdicts(rep: Report, res: dict, steps, scale: float, ledger) -> None:
    """The claims and the recorded numbers; `ledger`: the run without the regulariser's."""
    plain, reg = list(res)
    p, q = res[plain], res[reg]
    ratio_p, ratio_q, gap = p["ratio"], q["ratio"], p["gap"]
    gap_rel = np.abs(gap - gap[:, :1]) / (p["nu"] + p["nv"])
    led_measured = np.asarray(ledger.layer_measured)[..., 0]
    led_pred = np.asarray(ledger.layer_predicted)[..., 0]
    led_err = np.max(np.abs(led_measured - led_pred) / (p["nu"] + p["nv"]))

    rep.claim("converges_without_reg",
              "GD without the regulariser converges: final 1/2||UV^T-M||^2 / (1/2||M||^2), "
              "worst seed", np.max(p["fit"][:, -1]) / scale, "<=", CONVERGED)
    rep.claim("converges_with_reg",
              "GD with the regulariser converges: final 1/2||UV^T-M||^2 / (1/2||M||^2), "
              "worst seed", np.max(q["fit"][:, -1]) / scale, "<=", CONVERGED)
    rep.claim("ratio_constant_without_reg",
              "without the regulariser ||U||^2/||V||^2 stays constant: max_t |ratio_t/ratio_0 - 1|",
              np.max(np.abs(ratio_p / ratio_p[:, :1] - 1)), "<=", RATIO_TOL)
    rep.claim("gap_conserved_without_reg",
              "without the regulariser ||U||^2-||V||^2 is conserved: "
              "max_t |gap_t - gap_0| / (||U_t||^2+||V_t||^2)", np.max(gap_rel), "<=", GAP_TOL)
    rep.claim("ledger_predicts_drift",
              "GD drift ledger = measured gap drift: max |measured - predicted| / norms",
              led_err, "<=", LEDGER_TOL)
    rep.claim("gram_gap_conserved_without_reg",
              "without the regulariser ||U^TU - V^TV||_F stays constant: "
              "max_t | ||G_t|| - ||G_0|| | / ||G_0||", np.max(np.abs(p["gram"] / p["gram"][:, :1]
                                                                    - 1)), "<=", GRAM_TOL)
    rep.claim("gram_gap_vanishes_with_reg",
              "with the regulariser U^TU - V^TV -> 0: final ||G_T|| / ||G_0||, worst seed",
              np.max(q["gram"][:, -1] / q["gram"][:, 0]), "<=", GRAM_ZERO)
    rep.record(
        initial_ratio=ratio_p[:, 0], final_ratio_without_reg=ratio_p[:, -1],
        final_ratio_with_reg=ratio_q[:, -1],
        initial_gap=gap[:, 0], final_gap_without_reg=gap[:, -1],
        final_gap_with_reg=q["gap"][:, -1],
        final_fit_without_reg=p["fit"][:, -1], final_fit_with_reg=q["fit"][:, -1],
        iterations_to_1e_minus_10={k: [int(steps[np.argmax(f < 1e-10 * scale)])
                                       if np.any(f < 1e-10 * scale) else None
                                       for f in v["fit"]] for k, v in res.items()},
        final_norms_without_reg={"U": p["nu"][:, -1], "V": p["nv"][:, -1]},
        gram_gap_initial=p["gram"][:, 0], gram_gap_final_without_reg=p["gram"][:, -1],
        gram_gap_final_with_reg=q["gram"][:, -1],
    )


def _figure(rep: Report, cfg, res: dict, steps, led_pred) -> None:
    """Objective, norm ratio, Gram gap per seed for both runs; norm-gap drift vs the ledger."""
    plain, reg = list(res)
    gap = res[plain]["gap"]
    fig, axes = figure(4, 1, width=4.3)
    colors = {plain: "C0", reg: "C3"}
    for label, v in res.items():
        _plot_seeds(axes[0, 0], steps, positive(v["objective"]), colors[label], label)
    finish(axes[0, 0], xlabel="GD iteration (epoch)", ylabel="objective", logy=True,
           title="objective (thick: seed 0, thin: other seeds)")
    ax = axes[0, 1]
    for label, v in res.items():
        _plot_seeds(ax, steps, v["ratio"], colors[label], label)
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    finish(ax, xlabel="GD iteration (epoch)", ylabel=r"$\|U\|_F^2 \,/\, \|V\|_F^2$",
           title="norm ratio")
    for label, v in res.items():
        _plot_seeds(axes[0, 2], steps, positive(v["gram"]), colors[label], label)
    finish(axes[0, 2], xlabel="GD iteration (epoch)", ylabel=r"$\|U^\top U - V^\top V\|_F$",
           logy=True, title="Gram gap (conserved by the flow)")
    ax = axes[0, 3]
    k = slice(1, None)  # the drift is exactly 0 at step 0: off a log axis
    ax.plot(steps[k], positive(np.abs(gap[0, k] - gap[0, 0])), color="C0", lw=2.5, alpha=0.6,
            label=r"measured $|\Delta(\|U\|_F^2-\|V\|_F^2)|$")
    ax.plot(steps[k], positive(np.abs(led_pred[0, k])), color="k", ls="--", lw=1,
            label=r"GD ledger $|\sum_k \eta^2(\|g_U\|^2-\|g_V\|^2)|$")
    finish(ax, xlabel="GD iteration (epoch)", ylabel="drift of the norm gap", logy=True,
           title="without regulariser: drift vs ledger", legend_loc="lower right")
    m, n, r = cfg["m"], cfg["n"], cfg["rank"]
    fig.suptitle(f"Du, Hu, Lee 2018, Fig 1: {m}x{n} rank-{r} factorization, GD η={cfg['eta']:g}",
                 fontsize=11)
    rep.save_figure(fig, "fig1.png")


def _plot_seeds(ax, steps, curves, color: str, label: str) -> None:
    """One curve per seed (rows of `curves`): seed 0 thick and labelled, the others thin."""
    for s in range(curves.shape[0]):
        kw = dict(label=label) if s == 0 else {}
        ax.plot(steps, curves[s], color=color, alpha=1.0 if s == 0 else 0.35,
                lw=1.4 if s == 0 else 0.8, **kw)


EXPERIMENT = Experiment(
    name="du2018-fig1",
    title="matrix factorization with vs without the balancing regulariser",
    reference="Du, Hu, Lee 2018 (arXiv 1806.00900), Fig 1",
    body=body,
    default_seeds=4,
)
