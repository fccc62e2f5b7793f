"""Sweep configs: the schema, validation to one clear message, and grid expansion.

A config is a TOML file (or the equivalent dict) with the sections `[problem]`, `[init]`,
`[gd]`, `[flow]`, `[metrics]` and `[run]`. Any field given a list (a list of lists for fields
that are lists themselves, such as `sizes`) is a sweep axis; the grid is the product of the
axes. Validation reads the whole config before anything runs and raises `ConfigError` with one
line naming the key, the bad value and what is allowed.
"""

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from . import _families
from ._schema import (
    _OPTIONAL_SECTIONS,
    _REQUIRED,
    METRICS,
    SCHEMA,
    SOLVERS,
    ConfigError,
    Field as _Field,
)

__all__ = ["METRICS", "SOLVERS", "Config", "ConfigError", "Point", "load_config"]

SCHEMA_VERSION = 1
SMOKE_SEEDS = 2
SMOKE_STEPS = 20
SMOKE_SAVES = 11


def _describe(kind, choices):
    if choices:
        return "one of " + ", ".join(json.dumps(c) for c in choices)
    return {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "true or false",
        "int_list": "a list of integers",
        "float_list": "a list of numbers",
        "any": "a TOML value",
        "str_set": 'a list of metric names or "all"',
        "int_or_all": 'a positive integer or "all"',
    }[kind]


def _fmt(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{...}"
    return repr(value)


def _check_scalar(where: str, value, field: _Field):
    """Validates one (non-axis) value; returns it normalised (ints to float for floats)."""

    def bad(msg):
        return ConfigError(f"{where} = {_fmt(value)}: {msg}")

    kind = field.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be {_describe(kind, None)}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(f"must be {_describe(kind, None)}")
        if not math.isfinite(value):
            raise bad("must be finite")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise bad(f"must be {_describe(kind, field.choices)}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad(f"must be {_describe(kind, None)}")
    elif kind == "int_list":
        if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value
        ):
            raise bad(f"must be {_describe(kind, None)}")
    elif kind == "float_list":
        if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, int | float) for v in value
        ):
            raise bad(f"must be {_describe(kind, None)}")
        if not all(math.isfinite(v) for v in value):
            raise bad("must be finite")
        value = [float(v) for v in value]
    if field.choices is not None and value not in field.choices:
        raise bad(f"must be {_describe(kind, field.choices)}")
    if field.check is not None:
        msg = field.check(value)
        if msg:
            raise bad(msg)
    return value


def _is_axis(value, field: _Field) -> bool:
    if field.kind in ("int_list", "float_list"):
        return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)
    return isinstance(value, list)


def _validate_section(prefix: str, name: str, raw, schema: Mapping[str, _Field]):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}[{name}] = {_fmt(raw)}: must be a table (a [{name}] section)")
    out: dict[str, Any] = {}
    for key in raw:
        if key not in schema:
            known = ", ".join(schema)
            raise ConfigError(f"{prefix}[{name}].{key}: unknown key; [{name}] takes {known}")
    for key, field in schema.items():
        where = f"{prefix}[{name}].{key}"
        if key not in raw:
            if field.default is _REQUIRED and not field.optional:
                raise ConfigError(f"{where}: missing; {field.doc or 'required'}")
            if field.kind == "str_set":
                out[key] = _check_metrics(where, field.default)
            elif not field.optional:
                out[key] = field.default
            continue
        value = raw[key]
        if field.kind == "str_set":
            out[key] = _check_metrics(where, value)
        elif field.kind == "int_or_all":
            if value != "all" and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{where} = {_fmt(value)}: must be {_describe(field.kind, None)}")
            out[key] = value
        elif _is_axis(value, field):
            if not field.sweepable:
                raise ConfigError(f"{where} = {_fmt(value)}: cannot be swept; give one value")
            if not value:
                raise ConfigError(f"{where} = []: an empty sweep axis; give at least one value")
            vals = [_check_scalar(f"{where}[{i}]", v, field) for i, v in enumerate(value)]
            if len({json.dumps(v) for v in vals}) != len(vals):
                raise ConfigError(f"{where} = {_fmt(value)}: repeats a value")
            out[key] = vals
        else:
            out[key] = _check_scalar(where, value, field)
    return out


def _check_metrics(where, value):
    if value == "all":
        return list(METRICS)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{where} = {_fmt(value)}: must be a list of metric names or "all"')
    for v in value:
        if v not in METRICS:
            raise ConfigError(
                f"{where} = {_fmt(value)}: unknown metric {json.dumps(v)}; choose from "
                f"{', '.join(METRICS)}"
            )
    return list(dict.fromkeys(value))


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: the fully resolved parameters of every section, and its key."""

    index: int
    params: dict[str, dict[str, Any]]
    coords: dict[str, Any]  # axis name -> coordinate value (hashable, storable)
    key: str

    @property
    def label(self) -> str:
        if not self.coords:
            return "point"
        return ", ".join(f"{k}={v}" for k, v in self.coords.items())


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated sweep config.

    **Fields:** `sections` (validated values, sweep axes as lists), `axes` (ordered
    `(section, key)` pairs of the sweep axes), `source` (the config TOML text or None) and
    `path` (where it was read from, for messages).
    """

    sections: dict[str, dict[str, Any]]
    axes: tuple[tuple[str, str], ...]
    source: str | None
    path: str
    explicit_metrics: bool = False

    @property
    def kind(self) -> str:
        return self.sections["problem"]["kind"]

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(key for _, key in self.axes)

    @property
    def has_gd(self) -> bool:
        return "gd" in self.sections

    @property
    def has_flow(self) -> bool:
        return "flow" in self.sections

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.sections["metrics"]["record"])

    @property
    def seeds(self) -> int:
        return self.sections["init"]["seeds"]

    def axis_values(self, name: str) -> list:
        section = next(s for s, k in self.axes if k == name)
        return [coord_value(v) for v in self.sections[section][name]]

    @property
    def num_points(self) -> int:
        """The grid size, without building the grid."""
        return math.prod(len(self.sections[s][k]) for s, k in self.axes)

    def iter_points(self):
        """The grid lazily, in row-major order of the axes (first axis slowest)."""
        choices = [self.sections[s][k] for s, k in self.axes]
        for i, combo in enumerate(itertools.product(*choices)):
            params = copy.deepcopy(self.sections)
            coords = {}
            for (s, k), v in zip(self.axes, combo):
                params[s][k] = v
                coords[k] = coord_value(v)
            _resolve(params)
            yield Point(i, params, coords, point_key(params))

    def points(self) -> list[Point]:
        """The grid, in row-major order of the axes (first axis slowest)."""
        return list(self.iter_points())

    def to_dict(self) -> dict:
        return copy.deepcopy(self.sections)

    def smoke(self) -> "Config":
        """The same grid, cut to check a config end to end in seconds: at most `SMOKE_SEEDS`
        seeds, `SMOKE_STEPS` GD steps (about 10 saved) and `SMOKE_SAVES` flow saves. Its digest
        differs: it is a store of its own."""
        sections = copy.deepcopy(self.sections)
        sections["init"]["seeds"] = min(sections["init"]["seeds"], SMOKE_SEEDS)
        cuts = [("gd", "steps", lambda v: min(v, SMOKE_STEPS)),
                ("flow", "saves", lambda v: min(v, SMOKE_SAVES))]
        for section, key, cut in cuts:
            if section not in sections or key not in sections[section]:
                continue
            v = sections[section][key]
            sections[section][key] = (list(dict.fromkeys(cut(x) for x in v))
                                      if (section, key) in self.axes else cut(v))
        if "gd" in sections:
            sections["gd"]["save_every"] = 0
        axes = tuple((s, k) for s, k in self.axes
                     if not isinstance(sections[s][k], list) or len(sections[s][k]) > 1
                     or sections[s][k] == self.sections[s][k])
        for s, k in set(self.axes) - set(axes):
            sections[s][k] = sections[s][k][0]
        return Config(sections, axes, None, f"{self.path} (smoke)", self.explicit_metrics)

    def digest(self) -> str:
        """A hash of the validated config: same digest, same grid and results."""
        blob = json.dumps({"v": SCHEMA_VERSION, "c": _hashable(self.sections)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def coord_value(v):
    """A grid value as a coordinate: lists (layer sizes) become strings like "8-16-2"."""
    if isinstance(v, list):
        return "-".join(str(x) for x in v)
    return v


def point_key(params) -> str:
    """Hash of a point's resolved parameters (run-only settings excluded: they change no result)."""
    core = {k: v for k, v in _hashable(params).items() if k != "run"}
    blob = json.dumps({"v": SCHEMA_VERSION, "p": core}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hashable(sections):
    """The sections as hashed: an "mlp" problem keeps the key `model` that it had before
    problem families existed, so that stores written then still resume."""
    problem = sections.get("problem", {})
    if problem.get("kind") != "mlp":
        return sections
    out = dict(sections)
    out["problem"] = {("model" if k == "kind" else k): v for k, v in problem.items()}
    return out


def default_save_every(steps: int, target: int = 100) -> int:
    """The smallest divisor s of `steps` with steps / s <= target.

    Equivalently steps / q for the largest divisor q <= target of `steps`: at most `target`
    trial divisions, whatever the size of `steps` (a prime gives s = steps: two saves).
    """
    q = next(q for q in range(min(target, steps), 0, -1) if steps % q == 0)
    return steps // q


def _resolve(params) -> None:
    gd = params.get("gd")
    if gd is not None and gd["save_every"] == 0:
        gd["save_every"] = default_save_every(gd["steps"])


def _cross_checks(prefix: str, sections, axes) -> None:
    """Constraints between keys; checked on every grid value they could take."""

    def values(section, key):
        v = sections[section].get(key)
        return v if (section, key) in axes else [v]

    has_gd, has_flow = "gd" in sections, "flow" in sections
    if not (has_gd or has_flow):
        raise ConfigError(f"{prefix}nothing to run: add a [gd] section, a [flow] section or both")
    kind = sections["problem"]["kind"]
    for sizes in values("problem", "sizes") if kind == "mlp" else ():
        for loss in values("problem", "loss"):
            if loss == "logistic" and sizes[-1] != 1:
                raise ConfigError(
                    f"{prefix}[problem].sizes = {_fmt(sizes)}: the logistic loss needs one "
                    f"output (last width 1)"
                )
    for data in values("problem", "data") if kind == "mlp" else ():
        for loss in values("problem", "loss"):
            if loss == "logistic" and data != "separable":
                raise ConfigError(
                    f'{prefix}[problem].loss = "logistic": needs labels; set [problem].data = '
                    f'"separable" (got {json.dumps(data)})'
                )
    if has_flow and "exact" in values("flow", "kinks"):
        for act in values("problem", "activation"):
            if _families.has_kinks(kind, act) is False:
                what = (f"[problem].activation = {json.dumps(act)}" if act is not None
                        else f"kind = {json.dumps(kind)}")
                raise ConfigError(
                    f'{prefix}[flow].kinks = "exact": needs a ReLU or leaky-ReLU network, but '
                    f'{what} has no kinks; use kinks = "auto" or "smooth"'
                )
    if kind == "two_layer_relu":
        for dim in values("problem", "dim"):
            for labels in values("problem", "labels"):
                if len(labels) > dim:
                    raise ConfigError(
                        f"{prefix}[problem].labels = {_fmt(labels)}: one label per orthogonal "
                        f"input, and R^{dim} holds at most {dim} ([problem].dim)"
                    )
    if kind == "factorization":
        for shape in values("problem", "shape"):
            for spec in values("problem", "spectrum"):
                if len(spec) > min(shape):
                    raise ConfigError(
                        f"{prefix}[problem].spectrum = {_fmt(spec)}: a {shape[0]} x {shape[1]} "
                        f"target has at most {min(shape)} singular values"
                    )
    if has_gd and ("gd", "delta") in axes and "constant" in values("gd", "schedule"):
        raise ConfigError(
            f'{prefix}[gd].delta is a sweep axis, but schedule = "constant" ignores it (every '
            f'delta would give the same points); use schedule = "power" or give one delta'
        )
    if has_gd:
        for steps in values("gd", "steps"):
            for se in values("gd", "save_every"):
                if se and steps % se:
                    raise ConfigError(
                        f"{prefix}[gd].save_every = {se}: must divide [gd].steps = {steps}"
                    )
    if has_gd and has_flow:
        for key in ("t1", "saves"):
            if key in sections["flow"] and sections["flow"].get(f"_{key}_given"):
                raise ConfigError(
                    f"{prefix}[flow].{key}: not allowed with [gd]; the flow is saved at the GD "
                    f"times t_k = sum of eta_i"
                )
    if has_flow and not has_gd and "t1" not in sections["flow"]:
        raise ConfigError(f"{prefix}[flow].t1: missing; the flow horizon (required without [gd])")
    need_both = [m for m in ("discretization",) if m in sections["metrics"]["record"]]
    if need_both and not (has_gd and has_flow) and sections["metrics"].get("_explicit"):
        raise ConfigError(
            f'{prefix}[metrics].record: "discretization" compares GD with the flow; it needs '
            f"both [gd] and [flow]"
        )
    if (
        "ledger" in sections["metrics"]["record"]
        and not has_gd
        and sections["metrics"].get("_explicit")
    ):
        raise ConfigError(f'{prefix}[metrics].record: "ledger" is the GD drift ledger; add [gd]')


def validate(raw: Mapping, path: str = "<config>") -> Config:
    """Validates a config dict (as parsed from TOML) into a `Config`.

    **Raises:** `ConfigError` with one line: `PATH: [section].key = VALUE: what is wrong`.
    """
    prefix = f"{path}: "
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}a config must be a table of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in SCHEMA:
            raise ConfigError(
                f"{prefix}[{name}]: unknown section; sections are {', '.join(SCHEMA)}"
            )
    for name in ("problem", "init"):
        if name not in raw:
            raise ConfigError(f"{prefix}[{name}]: missing section")
    kind = _families.kind_of(prefix, raw)
    sections: dict[str, dict[str, Any]] = {}
    axes: list[tuple[str, str]] = []
    for name, schema in SCHEMA.items():
        if name in _OPTIONAL_SECTIONS and name not in raw:
            continue
        if name == "problem":
            schema = _families.problem_schema(kind, raw.get(name))
        elif name == "init":
            schema = _families.init_schema(prefix, kind, schema, raw.get(name))
        section = _validate_section(prefix, name, raw.get(name, {}), schema)
        for key, field in schema.items():
            if (
                key in section
                and field.kind not in ("str_set", "int_or_all")
                and _is_axis(raw.get(name, {}).get(key), field)
            ):
                axes.append((name, key))
        sections[name] = section
    _families.fill_defaults(kind, sections)
    _families.check_user(prefix, kind, sections, set(axes), path)
    metrics_raw = raw.get("metrics", {})
    explicit = isinstance(metrics_raw, dict) and "record" in metrics_raw
    flow_raw = raw.get("flow", {}) if isinstance(raw.get("flow", {}), dict) else {}
    # Markers for the cross-checks (removed afterwards).
    sections["metrics"]["_explicit"] = explicit and metrics_raw["record"] != "all"
    if "flow" in sections:
        sections["flow"]["_t1_given"] = "t1" in flow_raw
        sections["flow"]["_saves_given"] = "saves" in flow_raw
    _cross_checks(prefix, sections, set(axes))
    _check_metrics_apply(prefix, kind, sections)
    sections["metrics"].pop("_explicit")
    if "flow" in sections:
        sections["flow"].pop("_t1_given")
        sections["flow"].pop("_saves_given")
        if "gd" in sections:
            sections["flow"].pop("saves", None)
    # Keep only the metrics this config can produce.
    record = sections["metrics"]["record"]
    if not ("gd" in sections and "flow" in sections):
        record = [m for m in record if m != "discretization"]
    if "gd" not in sections:
        record = [m for m in record if m != "ledger"]
    sections["metrics"]["record"] = record
    return Config(sections, tuple(axes), None, path, explicit_metrics=explicit
                  and metrics_raw["record"] != "all")


def _check_metrics_apply(prefix: str, kind: str, sections) -> None:
    """Asked-for metrics the family cannot produce: an error; "all": the ones it can."""
    can = _families.applicable_metrics(kind)
    if can is None:
        return
    record = sections["metrics"]["record"]
    if sections["metrics"]["_explicit"]:
        bad = [m for m in record if m not in can]
        if bad:
            raise ConfigError(
                f"{prefix}[metrics].record: {json.dumps(bad[0])} does not apply to kind = "
                f"{json.dumps(kind)}; it records {', '.join(m for m in METRICS if m in can)}"
            )
    sections["metrics"]["record"] = [m for m in record if m in can]


def load_config(config: "str | os.PathLike | Mapping | Config") -> Config:
    """Reads and validates a sweep config from a TOML path, a TOML string or a dict.

    **Raises:** `ConfigError` (one line) for a missing file, bad TOML or an invalid config.
    """
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return validate(config)
    path = os.fspath(config)
    if "\n" in path or "=" in path:  # a TOML string
        text, where = path, "<config>"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory; give the config's TOML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not a text file in UTF-8 (byte {e.start}: {e.reason}); save the config "
                f"as UTF-8 TOML"
            ) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        where = path
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    cfg = validate(raw, where)
    return dataclasses.replace(cfg, source=text)
