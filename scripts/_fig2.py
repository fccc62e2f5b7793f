"""The Du–Hu–Lee Fig 2 problem shared by the full-size scripts, and their common flags."""

import argparse

import jax.random as jr

import flowsim


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--t1", type=float, default=20.0)
    p.add_argument("--rtol", type=float, default=1e-8)
    p.add_argument("--n", type=int, default=1000, help="points (and input dimension)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    return p


def fig2_problem(n: int = 1000):
    """n -> 100 -> 100 -> 10 ReLU, n Gaussian points, targets from a random teacher of the same
    shape, balanced initialisation N(0, 1e-4/100), N(0, 1e-4/10), N(0, 1e-4) at n = 1000."""
    sizes = (n, 100, 100, 10)
    kx, kt, kw = jr.split(jr.key(0), 3)
    X = jr.normal(kx, (n, n))
    Y = flowsim.models.MLP(sizes, "relu", key=kt)(X)
    net = flowsim.models.MLP(sizes, "relu", init_std=flowsim.init.balanced_stds(sizes, 1e-4),
                             key=kw)
    return net, flowsim.losses.square(X, Y)
