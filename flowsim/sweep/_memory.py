"""What one compiled call of a sweep holds in memory, estimated before anything runs.

The estimate is an upper bound over the grid (the largest widths, steps and saves of every
axis together), in float64 bytes, of the arrays that grow with the problem:

- per seed, the saved parameters of GD and of the flow (saves x parameters each), twice over
  for the metrics computed from them, the solver's working copies (16 x parameters) and the
  network's activations on the data (4 x points x hidden units);
- once per call, the per-step arrays of GD (step sizes, their sums: 3 x steps) and the data.

`check(cfg, devices)` refuses a config whose call would not fit in the memory of the device
it runs on, naming both numbers and the setting that makes it fit (`[run] batch_size`, or a
smaller problem when one seed alone is too large).
"""

from .._problem import available_memory_bytes, device_memory_bytes, format_bytes
from ._config import Config, ConfigError, default_save_every

BYTES = 8  # float64


def available_bytes(device=None) -> int:
    """Memory a compiled call on `device` can use: an accelerator's free memory, else the
    host's available memory."""
    free = device_memory_bytes(device) if device is not None else None
    return available_memory_bytes() if free is None else free


def _values(cfg: Config, section: str, key: str) -> list:
    v = cfg.sections.get(section, {}).get(key)
    return v if (section, key) in cfg.axes else [v]


def estimate(cfg: Config) -> tuple[int, int, int]:
    """(bytes per seed, bytes per call shared by its seeds, seeds per call), upper bounds over
    the grid."""
    def weights(s):
        return sum(a * b for a, b in zip(s, s[1:]))

    sizes = max(_values(cfg, "problem", "sizes"), key=weights)
    params = weights(sizes)
    hidden = sum(sizes[1:-1])
    n = max(_values(cfg, "problem", "n"))
    saves, steps = 0, 0
    if cfg.has_gd:
        steps = max(_values(cfg, "gd", "steps"))
        for st in _values(cfg, "gd", "steps"):
            for se in _values(cfg, "gd", "save_every"):
                saves = max(saves, st // (se or default_save_every(st)) + 1)
    elif cfg.has_flow:
        saves = max(_values(cfg, "flow", "saves"))
    copies = (cfg.has_gd + cfg.has_flow) * 2
    per_seed = BYTES * (params * (copies * saves + 16) + 4 * n * hidden + 4 * hidden * saves)
    shared = BYTES * (3 * steps + n * (sizes[0] + sizes[-1]))
    batch = cfg.sections["run"]["batch_size"]
    seeds = min(batch, cfg.seeds) if batch > 0 else cfg.seeds
    return per_seed, shared, seeds


_gb = format_bytes


def describe(cfg: Config, n_devices: int = 1) -> str:
    per_seed, shared, seeds = estimate(cfg)
    per_device = -(-seeds // n_devices)
    return (
        f"memory: ~{_gb(per_seed * per_device + shared)} per compiled call and device "
        f"({per_device} seeds x {_gb(per_seed)} + {_gb(shared)} shared; estimate, upper bound)"
    )


def check(cfg: Config, devices) -> None:
    """Raises `ConfigError` if a compiled call of `cfg` cannot fit in memory."""
    per_seed, shared, seeds = estimate(cfg)
    n_dev = max(len(devices), 1)
    per_device = -(-seeds // n_dev)
    need = per_seed * per_device + shared
    have = available_bytes(devices[0] if devices else None)
    if need <= have:
        return
    fit = (have - shared) // per_seed * n_dev if have > shared else 0
    if fit >= 1:
        fix = (f"set [run] batch_size = {int(fit)} (seeds per compiled call; now "
               f"{seeds})")
    else:
        fix = ("one seed alone does not fit: use smaller [problem].sizes or [problem].n, fewer "
               "[gd].steps or a larger [gd].save_every")
    where = "device" if devices and devices[0].platform != "cpu" else "machine"
    raise ConfigError(
        f"{cfg.path}: a compiled call needs ~{_gb(need)} ({per_device} seeds x "
        f"{_gb(per_seed)} + {_gb(shared)}), the {where} has {_gb(have)} available; {fix}"
    )
