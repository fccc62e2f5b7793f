"""The Du–Hu–Lee Fig 2 problem shared by the full-size scripts, and their common flags."""

import argparse
import json

import jax.random as jr

import flowsim


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--t1", type=float, default=20.0)
    p.add_argument("--rtol", type=float, default=1e-8)
    p.add_argument("--n", type=int, default=1000, help="points (and input dimension)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    return p


def report(row: dict, out: str | None) -> None:
    """Prints `row` as JSON and, with `--out`, writes it there."""
    print(json.dumps(row, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(row, f, indent=1)


def fig2_problem(n: int = 1000):
    """n -> 100 -> 100 -> 10 ReLU, n Gaussian points, targets from a random teacher of the same
    shape, balanced initialisation N(0, 1e-4/100), N(0, 1e-4/10), N(0, 1e-4) at n = 1000
    (`flowsim.problems.mlp(..., data="teacher")`). Returns `(net, loss)`."""
    problem = flowsim.problems.mlp((n, 100, 100, 10), n=n, activation="relu", data="teacher",
                                   data_seed=0, init="balanced", variance=1e-4)
    # The data take keys 0, 1 of split(key(0)); the network key 2 of the same split.
    return problem.init(jr.split(jr.key(0), 3)[2]), problem.loss
