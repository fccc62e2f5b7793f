"""The sweep config's schema: every section's fields, and each problem family's fields.

A family's fields are the keyword arguments of its function in `flowsim.problems` (same names,
same defaults, checked by the tests); `[init] scheme` and `variance` map to its `init` and
`variance` arguments.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from .._solvers import SOLVERS
from ..problems import FAMILIES
from ..problems.conv import INIT_SCHEMES as _CONV
from ..problems.deep_linear_logistic import INIT_SCHEMES as _DLL
from ..problems.factorization import INIT_SCHEMES as _FACTORIZATION
from ..problems.mlp import INIT_SCHEMES as _MLP
from ..problems.two_layer import INIT_SCHEMES as _TWO_LAYER

METRICS = ("loss", "invariants", "drift", "ledger", "discretization", "alignment", "solver_stats",
           "problem")


class ConfigError(ValueError):
    """A sweep config that cannot run: the message is one line naming the key and value."""


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str  # "int", "float", "str", "bool", "int_list", "float_list", "int_or_all"
    default: Any = None  # None: required (unless `optional`)
    check: Callable[[Any], str | None] | None = None
    choices: tuple | None = None
    sweepable: bool = True
    optional: bool = False
    doc: str = ""


def _positive(v):
    return None if v > 0 else "must be positive"


def _nonneg(v):
    return None if v >= 0 else "must be non-negative"


def _delta(v):
    return None if 0 <= v <= 0.5 else "must be in [0, 1/2]"


def _widths(v):
    if len(v) < 3:
        return "must list at least three widths (d_in, hidden..., d_out): a hidden layer to balance"
    if any(w < 1 for w in v):
        return "widths must be positive"
    return None


def _shape(n):
    def check(v):
        if len(v) != n:
            return f"must list {n} integers"
        if any(w < 1 for w in v):
            return "entries must be positive"
        return None
    return check


def _channels(v):
    if len(v) < 2:
        return "must list at least two convolutions (a hidden layer of filters to balance)"
    return None if all(c >= 1 for c in v) else "entries must be positive"


def _one_output(v):
    msg = _widths(v)
    if msg:
        return msg
    return None if v[-1] == 1 else "must end with one output (last width 1)"


def _nonempty(v):
    return None if v else "must list at least one value"


_REQUIRED = None
MLP_FIELDS = {
    "sizes": Field("int_list", _REQUIRED, _widths, doc="layer widths (d_in, ..., d_out)"),
    "activation": Field("str", "relu", choices=("relu", "leaky_relu", "linear", "tanh")),
    "negative_slope": Field("float", 0.01, _nonneg),
    "data": Field("str", "gaussian", choices=("gaussian", "teacher", "separable")),
    "n": Field("int", _REQUIRED, _positive, doc="number of training points"),
    "noise": Field("float", 0.0, _nonneg),
    "margin": Field("float", 0.1, _positive),
    "loss": Field("str", "square", choices=("square", "logistic")),
    "data_seed": Field("int", 0, _nonneg),
}

PROBLEM_FIELDS: dict[str, dict[str, Field]] = {
    "mlp": MLP_FIELDS,
    "factorization": {
        "shape": Field("int_list", _REQUIRED, _shape(2), doc="(m, n) of the target M"),
        "rank": Field("int", _REQUIRED, _positive, doc="columns of U and V"),
        "spectrum": Field("float_list", _REQUIRED, _nonempty, doc="singular values of M"),
        "data_seed": Field("int", 0, _nonneg),
    },
    "conv": {
        "in_shape": Field("int_list", _REQUIRED, _shape(3), doc="(channels, height, width)"),
        "channels": Field("int_list", _REQUIRED, _channels, doc="output channels per conv"),
        "out_features": Field("int", _REQUIRED, _positive),
        "kernel_size": Field("int", 3, _positive),
        "activation": Field("str", "relu", choices=("relu", "leaky_relu", "linear", "tanh")),
        "negative_slope": Field("float", 0.01, _nonneg),
        "n": Field("int", _REQUIRED, _positive, doc="number of training images"),
        "noise": Field("float", 0.0, _nonneg),
        "data_seed": Field("int", 0, _nonneg),
    },
    "two_layer_relu": {
        "dim": Field("int", _REQUIRED, _positive, doc="input dimension d"),
        "width": Field("int", _REQUIRED, _positive, doc="hidden ReLU units m"),
        "labels": Field("float_list", _REQUIRED, _nonempty,
                        doc="one label per orthogonal input (at most dim of them)"),
        "data_seed": Field("int", 0, _nonneg),
    },
    "deep_linear_logistic": {
        "sizes": Field("int_list", _REQUIRED, _one_output, doc="widths (d, hidden..., 1)"),
        "n": Field("int", _REQUIRED, _positive),
        "margin": Field("float", 0.1, _positive),
        "data_seed": Field("int", 0, _nonneg),
    },
}
"""Each family's `[problem]` fields (besides `kind`)."""

INIT_SCHEMES = {
    "mlp": _MLP,
    "factorization": _FACTORIZATION,
    "conv": _CONV,
    "two_layer_relu": _TWO_LAYER,
    "deep_linear_logistic": _DLL,
}
"""Each family's `[init] scheme` choices; the first is not necessarily the default (that is
the family function's `init` default)."""

PIECEWISE_LINEAR = {"two_layer_relu": True, "factorization": False, "deep_linear_logistic": False}
"""Families whose kinks are fixed; the others have an `activation` field that decides."""

ALIGNMENT = ("mlp", "factorization", "deep_linear_logistic")
"""Families whose networks have two adjacent matrix layers (the `alignment` metric)."""

HAS_METRICS = ("factorization", "two_layer_relu", "deep_linear_logistic")
"""Families with metrics of their own (`problem.metrics`, the `problem` metric)."""

assert set(PROBLEM_FIELDS) == set(FAMILIES) == set(INIT_SCHEMES)

SCHEMA: dict[str, dict[str, Field]] = {
    "problem": {
        "kind": Field("str", "mlp", doc='problem family, or "package.module:function"'),
        **MLP_FIELDS,
    },
    "init": {
        "scheme": Field("str", None, optional=True,
                         doc="initialisation scheme of the family (default: the family's)"),
        "variance": Field(
            "float",
            None,
            _positive,
            optional=True,
            doc="entry variance; its meaning per scheme is the family's (default: the family's)",
        ),
        "seeds": Field(
            "int",
            _REQUIRED,
            _positive,
            sweepable=False,
            doc="number of random initialisations per grid point",
        ),
        "base_seed": Field("int", 0, _nonneg),
    },
    "gd": {
        "eta0": Field("float", _REQUIRED, _positive),
        "delta": Field("float", 0.0, _delta),
        "schedule": Field("str", "power", choices=("power", "constant")),
        "steps": Field("int", _REQUIRED, _positive),
        "save_every": Field("int", 0, _nonneg, doc="0: about 100 saved iterates"),
    },
    "flow": {
        "solver": Field("str", "auto", choices=SOLVERS),
        "rtol": Field("float", 1e-8, _positive),
        "atol": Field("float", 1e-8, _positive),
        "max_steps": Field("int", 100_000, _positive),
        "kinks": Field(
            "str",
            "auto",
            choices=("auto", "exact", "smooth"),
            doc="ReLU kinks: exact events + sliding, smooth (adaptive solver as is), or auto "
                "(exact up to 20,000 pre-activation surfaces)",
        ),
        "max_events": Field("int", 10_000, _positive, doc="kink events before a solve fails"),
        "error_estimate": Field(
            "bool",
            False,
            sweepable=False,
            optional=True,
            doc="also solve at tolerances / 10 and record flow_error_estimate (with "
                "solver_stats): the estimated relative global error of each flow",
        ),
        "t1": Field(
            "float",
            0.0,
            _positive,
            optional=True,
            doc="flow horizon; only without [gd] (with [gd] the flow follows GD times)",
        ),
        "saves": Field(
            "int",
            101,
            lambda v: None if v >= 2 else "must be at least 2",
            doc="number of equally spaced save times; only without [gd]",
        ),
    },
    "metrics": {
        "record": Field(
            "str_set",
            "all",
            sweepable=False,
            doc=f'metrics to record, from {", ".join(METRICS)}, or "all"',
        ),
    },
    "run": {
        "devices": Field(
            "int_or_all",
            "all",
            sweepable=False,
            doc='devices to shard the seeds over: "all" or a number',
        ),
        "batch_size": Field(
            "int", 0, _nonneg, sweepable=False, doc="seeds per compiled call; 0: all seeds at once"
        ),
    },
}
_OPTIONAL_SECTIONS = ("gd", "flow")  # present = run it
