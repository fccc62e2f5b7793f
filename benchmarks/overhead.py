"""Overhead of `flowsim.gradient_flow` on non-stiff solves: flowsim against the same solve
written by hand in diffrax (Tsit5, PID controller, the same tolerances and save times).

Problems:
- a deep linear MLP (widths w -> w -> w -> w -> 10, n = 64 Gaussian points, a teacher of the
  same shape, t1 = 2: non-stiff), w in 32 ... 512 (3.4k - 792k parameters);
- a tiny solve: the 2 x 2 factorization of diag(3, 1) to t = 10 (8 parameters), where the
  call's fixed cost is all there is.

For each, the answers are compared first (flowsim's final parameters against the hand-written
solve's, relative difference), then both are timed warm (median of repeats, interleaved).
flowsim runs as a user calls it: `solver="auto"` (the default: a sharpness estimate picks the
solver) and `solver="tsit5"` (no estimate). Two ways to call: the same model again (a
benchmark's repeats, a tolerance ladder: flowsim reuses its checks and its sharpness estimate for
immutable inputs it has seen) and a new model of the same shapes each call (a sweep over
initialisations: every check and estimate runs; the new model is built outside the timing).

Run `python benchmarks/overhead.py [--quick] [--repeats R] [--widths W ...]`.
"""

import _common
import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree

import flowsim

TOL = 1e-8


def deep_linear(width: int, *, n: int = 64, d_out: int = 10, seed: int = 0):
    """`flowsim.problems.mlp(..., data="teacher")`, linear, with data_seed `seed`."""
    # Every layer has fan-in `width`: the 1/sqrt(fan_in) default is N(0, 1/width) everywhere,
    # written as the model's own std squared so that the weights are the same to the bit.
    problem = flowsim.problems.mlp(
        (width, width, width, width, d_out), n=n, activation="linear", data="teacher",
        data_seed=seed, init="unbalanced", variance=(1.0 / float(width) ** 0.5) ** 2)
    # The data take keys 0, 1 of split(key(seed)); the network key 2 of the same split.
    return problem.init(jr.split(jr.key(seed), 3)[2]), problem.loss, 2.0


def tiny():
    mf = flowsim.models.MatrixFactorization.random(2, 2, 2, scale=0.1, key=jr.key(0))
    return mf, flowsim.losses.factorization(jnp.diag(jnp.array([3.0, 1.0]))), 10.0


def plain_diffrax(model, loss, t1):
    """The hand-written solve: what a user writes with diffrax alone."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    @jax.jit
    def solve(p):
        grad = jax.grad(lambda q: loss(eqx.combine(q, static)))
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: jax.tree.map(jnp.negative, grad(y))),
            dfx.Tsit5(), 0.0, t1, None, p,
            saveat=dfx.SaveAt(ts=jnp.array([0.0, t1])),
            stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL), max_steps=100_000)
        return sol.ys

    return solve  # takes the model's arrays: partitioned outside the timing, as users would


def copy(model):
    """The same model in new arrays: to flowsim a model it has not seen."""
    return jax.tree.map(lambda x: x + 0 if eqx.is_inexact_array(x) else x, model)


def measure(name, model, loss, t1, repeats, fresh=False):
    n_params = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0].size
    runs = {
        "diffrax Tsit5 (by hand)": plain_diffrax(model, loss, t1),
        "flowsim tsit5": lambda m: flowsim.gradient_flow(m, loss, t1, solver="tsit5",
                                                         rtol=TOL, atol=TOL).models,
        "flowsim default": lambda m: flowsim.gradient_flow(m, loss, t1, rtol=TOL,
                                                           atol=TOL).models,
    }
    # Correctness first: the final parameters of each flowsim run against the hand-written.
    finals = {}
    args = {k: (lambda m: eqx.filter(m, eqx.is_inexact_array)) if k.startswith("diffrax")
            else (lambda m: m) for k in runs}
    for key, fn in runs.items():
        out = _common.block(fn(args[key](model)))
        tree = out if key.startswith("diffrax") else eqx.filter(out, eqx.is_inexact_array)
        finals[key] = ravel_pytree(jax.tree.map(lambda x: x[-1], tree))[0]
    ref = finals["diffrax Tsit5 (by hand)"]
    diffs = {k: float(jnp.linalg.norm(v - ref) / jnp.linalg.norm(ref)) for k, v in finals.items()}
    for k, d in diffs.items():
        assert d < 1e-5, f"{name}: {k} differs from the hand-written solve by {d:.2e}"
    times = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved: a busy machine slows every contender alike
        for key, fn in runs.items():
            m = args[key](_common.block(copy(model)) if fresh else model)
            run = lambda fn=fn, m=m: fn(m)  # noqa: E731
            times[key].append(_common.timeit(run, repeats=1, warmup=0)["median_s"])
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["diffrax Tsit5 (by hand)"]
    return {"problem": name, "call": "new model each call" if fresh else "same model again",
            "n_params": int(n_params), "rel_diff": diffs, "median_s": med,
            "ratio": {k: v / base for k, v in med.items()}, "times_s": times}


def main():
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=None)
    args = p.parse_args()
    widths = args.widths or ([32, 128] if args.quick else [32, 64, 128, 256, 512])
    repeats = args.repeats or (5 if args.quick else 7)
    records = []
    for fresh in (False, True):
        for w in widths:
            records.append(measure(f"deep linear w={w}", *deep_linear(w), repeats, fresh))
        records.append(measure("2x2 factorization", *tiny(), max(repeats, 50), fresh))
    rows = [[r["problem"], r["call"], r["n_params"],
             r["median_s"]["diffrax Tsit5 (by hand)"] * 1e3,
             r["median_s"]["flowsim tsit5"] * 1e3, r["median_s"]["flowsim default"] * 1e3,
             f"{r['ratio']['flowsim tsit5']:.2f}x", f"{r['ratio']['flowsim default']:.2f}x"]
            for r in records]
    text = _common.table(["problem", "call", "params", "diffrax ms", "flowsim tsit5 ms",
                          "flowsim default ms", "tsit5 / diffrax", "default / diffrax"], rows,
                         title=f"Non-stiff overhead, rtol = atol = {TOL:g}, warm, median "
                               f"of {repeats} (tiny: {max(repeats, 50)})")
    _common.write_json(args.out, "overhead", {"tol": TOL, "repeats": repeats, "records": records,
                                              "tables": [text]}, quick=args.quick)


if __name__ == "__main__":
    main()
