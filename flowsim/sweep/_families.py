"""What `[problem] kind` decides in a config: its fields, its `[init]` schemes and defaults,
its checks and its metrics; and building a grid point's problem."""

import inspect
import json
import os
import sys
from typing import Any

from .. import problems as _problems
from ..models import as_activation
from ..problems import user as _user
from ._schema import (
    ALIGNMENT,
    HAS_METRICS,
    INIT_SCHEMES,
    PIECEWISE_LINEAR,
    PROBLEM_FIELDS,
    ConfigError,
    Field,
)

KIND = Field("str", "mlp", sweepable=False,
             doc='problem family, or "package.module:function" for your own')


def kind_of(prefix: str, raw) -> str:
    """The `[problem] kind` of a raw config, checked: a family name or a factory name."""
    problem = raw.get("problem") if isinstance(raw, dict) else None
    kind = problem.get("kind", "mlp") if isinstance(problem, dict) else "mlp"
    where = f"{prefix}[problem].kind = {json.dumps(kind)}"
    if isinstance(kind, list):
        raise ConfigError(f"{where}: cannot be swept; families have different fields, run one "
                          f"sweep per family")
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: must be a string")
    if kind not in _problems.FAMILIES and not _user.is_factory_name(kind):
        names = ", ".join(map(json.dumps, _problems.FAMILIES))
        raise ConfigError(f'{where}: must be one of {names} or "package.module:function" (a '
                          f"factory of your own)")
    return kind


def problem_schema(kind: str, raw_problem) -> dict[str, Field]:
    """The `[problem]` fields of `kind`; a user factory takes any key (its arguments)."""
    if kind in PROBLEM_FIELDS:
        return {"kind": KIND, **PROBLEM_FIELDS[kind]}
    keys = raw_problem if isinstance(raw_problem, dict) else {}
    return {"kind": KIND, **{k: Field("any", None, optional=True) for k in keys if k != "kind"}}


def init_schema(prefix: str, kind: str, base: dict[str, Field], raw_init) -> dict[str, Field]:
    """`[init]` with the family's scheme choices; a user factory draws its own models."""
    if kind not in INIT_SCHEMES:
        given = [k for k in ("scheme", "variance") if isinstance(raw_init, dict) and k in raw_init]
        if given:
            raise ConfigError(f"{prefix}[init].{given[0]}: a problem of your own draws its models "
                              f"in init(key); remove it (pass settings as [problem] keys)")
        return {k: f for k, f in base.items() if k not in ("scheme", "variance")}
    out = dict(base)
    out["scheme"] = Field("str", None, choices=INIT_SCHEMES[kind], optional=True,
                          doc=base["scheme"].doc)
    return out


def fill_defaults(kind: str, sections) -> None:
    """`[init] scheme` and `variance` not given: the family function's defaults."""
    if kind not in _problems.FAMILIES:
        return
    params = inspect.signature(_problems.FAMILIES[kind]).parameters
    sections["init"].setdefault("scheme", params["init"].default)
    sections["init"].setdefault("variance", params["variance"].default)


def check_user(prefix: str, kind: str, sections, axes, path: str | None = None) -> None:
    """The factory imports and takes the `[problem]` keys (first value of each axis). A module
    next to the config file `path` is found: its directory joins the end of `sys.path`."""
    if kind in _problems.FAMILIES:
        return
    if path and os.path.isfile(path):
        here = os.path.dirname(os.path.abspath(path))
        if here not in sys.path:
            sys.path.append(here)
    args = {k: (v[0] if ("problem", k) in axes else v)
            for k, v in sections["problem"].items() if k != "kind"}
    try:
        factory = _user.load_factory(kind)
        _user.check_arguments(kind, factory, args)
    except ValueError as e:
        raise ConfigError(f"{prefix}[problem].kind = {json.dumps(kind)}: {e}") from None


def has_kinks(kind: str, activation: str | None) -> bool | None:
    """Whether the family's network has ReLU kinks (None: unknown, a user factory)."""
    if kind in PIECEWISE_LINEAR:
        return PIECEWISE_LINEAR[kind]
    if kind in PROBLEM_FIELDS:
        return activation is not None and as_activation(activation).has_kinks
    return None


def applicable_metrics(kind: str) -> set[str] | None:
    """Metrics the family can produce (None: every one; a user factory is checked at run)."""
    if kind not in _problems.FAMILIES:
        return None
    out = {"loss", "invariants", "drift", "ledger", "discretization", "solver_stats"}
    if kind in ALIGNMENT:
        out.add("alignment")
    if kind in HAS_METRICS:
        out.add("problem")
    return out


def build(params) -> Any:
    """The problem of one grid point (resolved parameters)."""
    p, init = dict(params["problem"]), params["init"]
    kind = p.pop("kind")
    if kind in _problems.FAMILIES:
        return _problems.FAMILIES[kind](**p, init=init["scheme"], variance=init["variance"])
    return _user.build(kind, p)


_BUILT: dict[str, Any] = {}
_BUILT_MAX = 16


def _build_key(params) -> str:
    return json.dumps([params["problem"], {k: v for k, v in params["init"].items()
                                           if k in ("scheme", "variance")}], sort_keys=True)


def cached_build(params, path: str = "<config>"):
    """`build`, remembered for the last few distinct problems (the memory check and the run
    build each once). A family's or factory's error becomes a `ConfigError` naming the config
    `path`, the kind and the problem's fields."""
    key = _build_key(params)
    if key not in _BUILT:
        try:
            problem = build(params)
        except (ValueError, TypeError) as e:
            kind = params["problem"]["kind"]
            fields = {k: v for k, v in params["problem"].items() if k != "kind"}
            raise ConfigError(f"{path}: [problem].kind = {json.dumps(kind)} with "
                              f"{json.dumps(fields)}: cannot be built: {e}") from None
        while len(_BUILT) >= _BUILT_MAX:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = problem
    return _BUILT[key]


INVARIANT_METRICS = ("invariants", "drift", "ledger", "alignment")


def model_template(problem):
    """The problem's model as shapes only (no arrays allocated)."""
    import equinox as eqx
    import jax.random as jr

    return eqx.filter_eval_shape(problem.init, jr.key(0))


def supported_metrics(problem) -> set[str]:
    """The metrics a built problem's model supports: the balance invariants need a
    `flowsim.models.AbstractModel`, alignment two adjacent matrix layers."""
    from ..models import AbstractModel

    model = model_template(problem)
    out = {"loss", "discretization", "solver_stats", "problem"}
    if isinstance(model, AbstractModel):
        out |= {"invariants", "drift", "ledger"}
        import equinox as eqx
        import jax.random as jr

        layers = eqx.filter_eval_shape(lambda k: problem.init(k).layers, jr.key(0))
        if sum(1 for w in layers if len(w.shape) == 2) >= 2:
            out.add("alignment")
    return out
