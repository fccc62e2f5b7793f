"""What one compiled call of a sweep holds in memory, estimated before anything runs.

The estimate is an upper bound over the grid (the largest widths, steps and saves of every
axis together), in float64 bytes, of the arrays that grow with the problem:

- per seed, the saved parameters of GD and of the flow (saves x parameters each), twice over
  for the metrics computed from them, the solver's working copies (16 x parameters) and the
  network's activations on the data (4 x points x hidden units);
- once per call, the per-step arrays of GD (step sizes, their sums: 3 x steps) and the data.

Sizes come from each distinct problem of the grid, built once (its data, and its model as
shapes only).

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


def _problem_sizes(cfg: Config):
    """(parameters, hidden units, points, data numbers) of every distinct problem of the grid
    (each built once: data and a model template, no parameters allocated)."""
    import itertools

    import equinox as eqx
    import jax
    import jax.random as jr

    from ..models import AbstractModel
    from . import _families

    axes = [(s, k) for s, k in cfg.axes if s in ("problem", "init")]
    for combo in itertools.product(*(cfg.sections[s][k] for s, k in axes)):
        params = {"problem": dict(cfg.sections["problem"]), "init": dict(cfg.sections["init"])}
        for (s, k), v in zip(axes, combo):
            params[s][k] = v
        problem = _families.cached_build(params, cfg.path)
        model = _families.model_template(problem)
        n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array_like))
                       if hasattr(x, "size"))
        hidden = 0
        if isinstance(model, AbstractModel):
            units = eqx.filter_eval_shape(lambda k, p=problem: p.init(k).hidden_units(), jr.key(0))
            hidden = sum(i.shape[-2] for i, _ in units)
        inputs = problem.inputs
        n = inputs.shape[0] if inputs is not None else 0
        data = sum(x.size for x in jax.tree.leaves(problem) if eqx.is_array(x))
        yield n_params, hidden, n, data


def estimate(cfg: Config) -> tuple[int, int, int]:
    """(bytes per seed, bytes per call shared by its seeds, seeds per call), upper bounds over
    the grid."""
    sizes = list(_problem_sizes(cfg))
    params = max(s[0] for s in sizes)
    hidden = max(s[1] for s in sizes)
    n = max(s[2] for s in sizes)
    data = max(s[3] for s in sizes)
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
    shared = BYTES * (3 * steps + data)
    batch = cfg.sections["run"]["batch_size"]
    seeds = min(batch, cfg.seeds) if batch > 0 else cfg.seeds
    return per_seed, shared, seeds


_SIZE_FIELDS = {
    "mlp": ("sizes", "n"),
    "factorization": ("shape", "rank"),
    "conv": ("in_shape", "channels", "n"),
    "two_layer_relu": ("width",),
    "deep_linear_logistic": ("sizes", "n"),
}
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
        size = " or ".join(f"[problem].{k}" for k in _SIZE_FIELDS.get(cfg.kind, ())) \
            or "the [problem] keys"
        fix = (f"one seed alone does not fit: use a smaller {size}, fewer [gd].steps or a "
               f"larger [gd].save_every")
    where = "device" if devices and devices[0].platform != "cpu" else "machine"
    raise ConfigError(
        f"{cfg.path}: a compiled call needs ~{_gb(need)} ({per_device} seeds x "
        f"{_gb(per_seed)} + {_gb(shared)}), the {where} has {_gb(have)} available; {fix}"
    )
