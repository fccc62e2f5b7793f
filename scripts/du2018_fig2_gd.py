"""Du, Hu, Lee (2018), Fig 2: gradient descent keeps the layers of a 3-layer ReLU net balanced.

The full problem: x in R^1000 -> 100 -> 100 -> 10, ReLU, 1000 Gaussian points, targets from a
random ReLU teacher of the same shape, square loss, balanced initialisation N(0, 1e-4/100),
N(0, 1e-4/10), N(0, 1e-4) (`flowsim.init.balanced_stds`), and GD with the decaying steps
eta_k = eta0 (k+1)^-(1/2+delta) (`flowsim.schedules.power_decay`) for 10,000 iterations, all in
one compiled call. Prints the compile and run times separately, the loss, the layer gaps
||W_h||_F^2 - ||W_{h+1}||_F^2 along the run, and the GD drift ledger's largest discrepancy
(measured drift of every unit's gap minus its exact prediction; rounding-sized when all is well).

Run:

    python scripts/du2018_fig2_gd.py              # the full problem (a few minutes on 2 cores)
    python scripts/du2018_fig2_gd.py --sizes 50 20 20 5 --n 100   # a quick, smaller instance
"""

import argparse
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import flowsim
from flowsim import invariants


def make_problem(sizes, n, variance, *, seed):
    """`flowsim.problems.mlp(..., data="teacher")` (a teacher with the usual 1/sqrt(fan_in)
    scale gives targets of order one) and one balanced initialisation."""
    problem = flowsim.problems.mlp(sizes, n=n, activation="relu", data="teacher",
                                   data_seed=seed, init="balanced", variance=variance)
    # The data take keys 0, 1 of split(key(seed)); the network key 2 of the same split.
    return problem.init(jr.split(jr.key(seed), 3)[2]), problem.loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100, 100, 10])
    parser.add_argument("--n", type=int, default=1000, help="number of data points")
    parser.add_argument("--variance", type=float, default=1e-4,
                        help="entry variance of the last layer (balanced_stds)")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--eta0", type=float, default=5.0)
    parser.add_argument("--delta", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sizes = tuple(args.sizes)
    net, loss = make_problem(sizes, args.n, args.variance, seed=args.seed)
    schedule = flowsim.schedules.power_decay(args.eta0, args.delta)
    print(f"sizes {sizes}, n={args.n}, init variance {args.variance:g} (balanced), "
          f"eta_k = {args.eta0:g} (k+1)^-{0.5 + args.delta:g}, {args.steps} steps, "
          f"device {jax.devices()[0].platform}, dtype {net.weights[0].dtype}")

    # The whole run is one jit-compiled call; JAX reports the time it spends tracing, lowering
    # and compiling through jax.monitoring, which separates compile time from run time.
    compile_s = []

    def on_event(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            compile_s.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    t0 = time.perf_counter()
    traj = flowsim.gradient_descent(
        net, loss, args.steps, learning_rate=schedule, save_every=args.save_every
    )
    jax.block_until_ready(traj)
    t_total = time.perf_counter() - t0
    jax.monitoring.unregister_event_duration_listener(on_event)
    t_compile = sum(compile_s)
    t_run = t_total - t_compile

    gaps = np.asarray(invariants.layer_gaps(traj.models))
    norms = np.asarray(jax.vmap(lambda ws: jnp.stack([jnp.sum(w**2) for w in ws]))(
        traj.models.weights))
    ledger = invariants.gd_drift_ledger(traj)
    measured = np.abs(np.asarray(ledger.layer_measured)).max()

    print(f"wall {t_total:.1f} s = compile {t_compile:.1f} s + run {t_run:.1f} s "
          f"({t_run / args.steps * 1e3:.2f} ms/step)")
    print(f"{'step':>6} {'t':>8} {'loss':>11} " + " ".join(
        f"{f'gap{h + 1}{h + 2}':>11}" for h in range(gaps.shape[-1])) + " " + " ".join(
        f"{f'|W{h + 1}|^2':>9}" for h in range(norms.shape[-1])))
    rows = np.unique(np.linspace(0, traj.num_saved - 1, 11).astype(int))
    for i in rows:
        print(f"{int(traj.steps[i]):6d} {float(traj.ts[i]):8.3f} {float(traj.loss[i]):11.4e} "
              + " ".join(f"{g:+11.4e}" for g in gaps[i]) + " "
              + " ".join(f"{v:9.4f}" for v in norms[i]))
    print(f"final loss {float(traj.loss[-1]):.6e} (initial {float(traj.loss[0]):.6e}); "
          f"diverged_at {int(traj.stats['diverged_at'])}")
    print(f"max |layer gap| along the run {np.abs(gaps).max():.4e}; "
          f"max |drift of a layer gap| {measured:.4e}")
    print(f"drift ledger: max |measured - predicted| over units and saved steps "
          f"{float(ledger.max_discrepancy()):.3e}")


if __name__ == "__main__":
    main()
