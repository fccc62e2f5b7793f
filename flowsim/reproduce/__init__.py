"""Reproductions of the seed papers' figures and claims, each with a numeric verdict.

Every experiment writes PNG figures and `summary.json` (measured numbers and a pass/fail verdict
per claim, with the threshold used) into its output directory. `quick=True` runs a reduced size
in seconds; the default runs the paper's size.

**Example:**

```python
from flowsim import reproduce
reproduce.names()                     # ('du2018-fig1', ...)
report = reproduce.run("du2018-thm32", "out/thm32", quick=True)
report.passed, [c.name for c in report.claims]
```

The same from the command line: `flowsim reproduce du2018-thm32 --quick --out out/thm32`.
"""

from pathlib import Path

from . import (
    boursier2022_orthogonal,
    du2018_fig1,
    du2018_fig2,
    du2018_thm31,
    du2018_thm32,
    ji2018_alignment,
)
from ._base import Claim as Claim, Experiment as Experiment, Report as Report

__all__ = ["EXPERIMENTS", "Claim", "Experiment", "Report", "names", "run"]

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        du2018_fig1.EXPERIMENT,
        du2018_fig2.EXPERIMENT,
        du2018_thm31.EXPERIMENT,
        du2018_thm32.EXPERIMENT,
        ji2018_alignment.EXPERIMENT,
        boursier2022_orthogonal.EXPERIMENT,
    )
}
"""Registered experiments by name."""


def names() -> tuple[str, ...]:
    """The names of the registered reproductions."""
    return tuple(EXPERIMENTS)


def run(name: str, out=None, *, quick: bool = False, seeds: int | None = None,
        config: dict | None = None, verbose: bool = False) -> Report:
    """Runs one reproduction and writes its figures and `summary.json` into `out`.

    **Arguments:**

    - `name`: one of `names()`.
    - `out`: output directory (created); default `reproductions/<name>` for a full run with
      the default settings (the outputs the README shows), `runs/reproduce/<name>` for a quick
      or modified run (so that it never overwrites them).
    - `quick`: a reduced size that runs in seconds on a CPU (used by the tests).
    - `seeds`: number of random initialisations (batched with vmap); default per experiment.
    - `config`: settings to change from the (quick or full) defaults, e.g. `{"steps": 2000}`
      for a medium-size run; the names are listed by an error on an unknown one, and the
      changes are recorded in summary.json.
    - `verbose`: print the table of claims when done.

    **Returns:** the `Report` (claims with verdicts, numbers, figure paths).

    **Raises:** `KeyError` for an unknown name; `ValueError` for `seeds < 1` or a bad `config`.
    """
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown reproduction {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    if seeds is None:
        seeds = exp.default_seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"`seeds` must be a positive integer, got {seeds!r}")
    if out is None:
        out = Path("runs", "reproduce", name) if quick or config else Path("reproductions", name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(exp.name, exp.title, exp.reference, out, quick=quick, seeds=seeds,
                    overrides=config)
    exp.body(report)
    report.write()
    if verbose:
        print(report.table())
    return report
