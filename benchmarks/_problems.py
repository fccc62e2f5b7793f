"""The benchmark problems, shared by the scripts (each a model, a loss, a horizon)."""

from dataclasses import dataclass
from typing import Any

import jax.random as jr

import flowsim


@dataclass
class Problem:
    name: str
    model: Any
    loss: Any
    t1: float
    inputs: Any = None
    note: str = ""

    @property
    def n_params(self) -> int:
        import equinox as eqx
        import jax

        return sum(x.size for x in jax.tree.leaves(eqx.filter(self.model, eqx.is_inexact_array)))


def stiff_factorization(*, seed: int = 0, t1: float = 1e6) -> Problem:
    """20x20 target of rank 3, singular values (1, 1e-2, 1e-4); rank-3 U V^T from scale 1e-3.

    The three modes are learnt at rates ~1, 1e-2, 1e-4: stiffness ratio 1e4, horizon 1e6.
    `flowsim.problems.factorization` with data_seed `seed`.
    """
    problem = flowsim.problems.factorization((20, 20), 3, (1.0, 1e-2, 1e-4), data_seed=seed,
                                             variance=1e-6)
    # The target takes keys 0, 1 of split(key(seed)); the factors key 2 of the same split.
    mf = problem.init(jr.split(jr.key(seed), 3)[2])
    return Problem("stiff factorization", mf, problem.loss, t1,
                   note="20x20, rank 3, sigma=(1,1e-2,1e-4), init 1e-3, T=1e6 (120 params)")


def relu_teacher(sizes, n, *, variance=None, t1=20.0, seed=0, name="", activation="relu"):
    """Gaussian inputs, targets from a random teacher MLP of the same shape, square loss:
    `flowsim.problems.mlp(..., data="teacher")` with data_seed `seed`.

    `variance`: balanced small initialisation (`flowsim.init.balanced_stds`); default
    1/sqrt(fan_in) weights.
    """
    problem = flowsim.problems.mlp(
        sizes, n=n, activation=activation, data="teacher", data_seed=seed,
        init="default" if variance is None else "balanced",
        variance=1.0 if variance is None else variance)
    # The data take keys 0, 1 of split(key(seed)); the network key 2 of the same split.
    net = problem.init(jr.split(jr.key(seed), 3)[2])
    return Problem(name or f"{activation} MLP {sizes}", net, problem.loss, t1,
                   inputs=problem.inputs,
                   note=f"{'->'.join(map(str, sizes))} {activation}, n={n}, T={t1:g}")


def fig2(*, quick: bool = False, t1: float = 20.0, seed: int = 0) -> Problem:
    """Du, Hu, Lee (2018) Fig 2: 1000->100->100->10 ReLU, 1000 points, balanced init 1e-4.

    `quick`: the same construction at 1/10 of the widths and 1/5 of the points.
    """
    if quick:
        p = relu_teacher((100, 10, 10, 10), 200, variance=1e-4, t1=t1, seed=seed)
        p.name = "Fig 2 network (reduced: 100->10->10->10, n=200)"
    else:
        p = relu_teacher((1000, 100, 100, 10), 1000, variance=1e-4, t1=t1, seed=seed)
        p.name = "Fig 2 network (1000->100->100->10, n=1000)"
    return p
