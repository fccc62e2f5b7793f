"""What every reproduction shares: claims with thresholds, the summary it writes, figure helpers."""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

_RELATIONS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda m, t: m <= t,
    ">=": lambda m, t: m >= t,
    "<": lambda m, t: m < t,
    ">": lambda m, t: m > t,
}


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of a paper, checked as `measured RELATION threshold`.

    - `name`: a short identifier, e.g. `"ratio_constant"`.
    - `statement`: the claim in words, with the quantity measured.
    - `measured`, `threshold`: floats; `relation` one of `<=`, `>=`, `<`, `>`.
    - `passed`: the verdict (False for a non-finite measurement).
    """

    name: str
    statement: str
    measured: float
    relation: str
    threshold: float
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "statement": self.statement,
            "measured": _jsonable(self.measured),
            "relation": self.relation,
            "threshold": self.threshold,
            "passed": self.passed,
        }


class Report:
    """The outcome of one reproduction: its configuration, claims, numbers and figures.

    Experiments fill it through `claim`, `record` and `save_figure`; `flowsim.reproduce.run`
    then writes `summary.json` and prints `table()`.
    """

    def __init__(self, name: str, title: str, reference: str, out: Path, *, quick: bool,
                 seeds: int, overrides: dict[str, Any] | None = None):
        self.name = name
        self.title = title
        self.reference = reference
        self.out = Path(out)
        self.quick = quick
        self.seeds = seeds
        self.overrides = dict(overrides or {})
        self.config: dict[str, Any] = {}
        self.claims: list[Claim] = []
        self.numbers: dict[str, Any] = {}
        self.notes: list[str] = []
        self.figures: list[Path] = []
        self.runtime_s: float | None = None
        self._t0 = time.perf_counter()

    def setup(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The experiment's configuration: its defaults with `overrides` applied (checked)."""
        unknown = sorted(set(self.overrides) - set(defaults))
        if unknown:
            raise ValueError(
                f"{self.name} has no setting {', '.join(map(repr, unknown))}; its settings are "
                f"{', '.join(sorted(defaults))}"
            )
        cfg = dict(defaults)
        for key, value in self.overrides.items():
            default = defaults[key]
            if isinstance(default, tuple):
                value = tuple(value)
            elif isinstance(default, float) and isinstance(value, int | float):
                value = float(value)
            elif type(value) is not type(default):
                raise ValueError(
                    f"setting {key!r} of {self.name} must be like {default!r}, got {value!r}"
                )
            cfg[key] = value
        if self.overrides:
            self.note(f"settings changed from the {'quick' if self.quick else 'full'} defaults: "
                      f"{self.overrides}")
        self.config = cfg
        return cfg

    @property
    def passed(self) -> bool:
        """True when every claim passed."""
        return all(c.passed for c in self.claims)

    def claim(self, name: str, statement: str, measured, relation: str, threshold: float) -> Claim:
        """Checks `measured RELATION threshold` and records the verdict."""
        if relation not in _RELATIONS:
            raise ValueError(f"`relation` must be one of {list(_RELATIONS)}, got {relation!r}")
        m = float(measured)
        ok = math.isfinite(m) and _RELATIONS[relation](m, float(threshold))
        c = Claim(name, statement, m, relation, float(threshold), bool(ok))
        self.claims.append(c)
        return c

    def record(self, **numbers) -> None:
        """Measured numbers to keep in summary.json (arrays become lists)."""
        self.numbers.update({k: _jsonable(v) for k, v in numbers.items()})

    def note(self, text: str) -> None:
        """A sentence for the reader of summary.json (method used, what was not run, ...)."""
        self.notes.append(text)

    def save_figure(self, fig: Figure, filename: str) -> Path:
        """Writes `fig` as a PNG into the output directory and remembers it."""
        path = self.out / filename
        fig.savefig(path, dpi=110)
        self.figures.append(path)
        return path

    def to_json(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "name": self.name,
            "title": self.title,
            "reference": self.reference,
            "quick": self.quick,
            "seeds": self.seeds,
            "overrides": _jsonable(self.overrides),
            "passed": self.passed,
            "claims": [c.to_json() for c in self.claims],
            "config": _jsonable(self.config),
            "numbers": self.numbers,
            "notes": self.notes,
            "figures": [p.name for p in self.figures],
            "runtime_s": self.runtime_s,
            "flowsim_version": __version__,
        }

    def write(self) -> Path:
        """Writes summary.json atomically into the output directory."""
        self.runtime_s = round(time.perf_counter() - self._t0, 2)
        path = self.out / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def table(self) -> str:
        """A plain-text table: claim, measured, threshold, verdict."""
        rows = [(c.name, _fmt(c.measured), f"{c.relation} {_fmt(c.threshold)}",
                 "pass" if c.passed else "FAIL") for c in self.claims]
        head = ("claim", "measured", "threshold", "verdict")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        size = "quick" if self.quick else "full"
        if self.overrides:
            size += ", modified"
        out = [f"{self.name} ({size}, {self.seeds} seed{'s' if self.seeds != 1 else ''}): "
               f"{self.title}", line.format(*head), line.format(*("-" * w for w in widths))]
        out += [line.format(*r) for r in rows]
        verdict = "all claims pass" if self.passed else "SOME CLAIMS FAIL"
        rt = f" in {self.runtime_s:.1f} s" if self.runtime_s is not None else ""
        out.append(f"{verdict}{rt}; figures and summary.json in {self.out}")
        return "\n".join(out)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A registered reproduction: `body(report)` runs it and fills the report.

    - `default_seeds`: number of random initialisations for `seeds=None`.
    """

    name: str
    title: str
    reference: str
    body: Callable[[Report], None]
    default_seeds: int = 1


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e4:
        return f"{x:.4g}"
    return f"{x:.3e}"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "__array__") and not isinstance(x, str):
        arr = np.asarray(x)
        if arr.ndim == 0:
            return _jsonable(arr.item())
        return _jsonable(arr.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)  # JSON has no NaN/inf
    return x


# ---- figure helpers ---------------------------------------------------------------------------

def figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.2, height: float = 3.9):
    """A matplotlib Figure (no pyplot state) with a grid of axes, constrained layout."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def finish(ax, *, xlabel: str, ylabel: str, title: str | None = None, logx: bool = False,
           logy: bool = False, legend: bool = True, legend_loc: str = "best") -> None:
    """Labels, scales, grid and legend for one axes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc=legend_loc)


def positive(x, floor: float = 1e-300):
    """x clipped away from 0 for a log axis (rounding-level zeros would vanish from the plot)."""
    return np.maximum(np.asarray(x, dtype=float), floor)
