"""Sweeps over grids and seeds: TOML config -> batched, sharded runs -> result store -> report.

The command line (`flowsim sweep`, `flowsim report`) is a thin layer over these functions:

- `load_config(path_or_dict)`: read and validate a config (`ConfigError`: one line naming the key);
- `Config.points()`: the grid, one `Point` per combination of the sweep axes;
- `run(config, out)`: run every unfinished point and write it atomically to `out`;
- `load(out)`: the whole store as one `xarray.Dataset` with dims (grid axes..., seed, time);
- `report(out)`: figures and a table of headline numbers in `out/report/`.

**Example:**

```python
import flowsim
res = flowsim.sweep.run("examples/quickstart.toml", "runs/quickstart")
ds = flowsim.sweep.load("runs/quickstart")
ds["drift_gd"].max("time").median("seed")
flowsim.sweep.report("runs/quickstart")
```
"""

from ._config import (
    METRICS as METRICS,
    SOLVERS as SOLVERS,
    Config as Config,
    ConfigError as ConfigError,
    Point as Point,
    load_config as load_config,
)
from ._report import report as report
from ._run import SweepResult as SweepResult, run as run
from ._store import load as load

__all__ = [
    "METRICS",
    "SOLVERS",
    "Config",
    "ConfigError",
    "Point",
    "SweepResult",
    "load",
    "load_config",
    "report",
    "run",
]
