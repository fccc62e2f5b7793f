"""The result store: one netCDF file per finished grid point, written atomically.

Layout of an output directory::

    OUT/config.toml        the config the store belongs to (written once)
    OUT/manifest.json      finished points with their parameters and timings (informational)
    OUT/points/KEY.nc      one file per finished point; KEY hashes the point's parameters
    OUT/report/            figures and tables from `flowsim report`

A point file appears only complete: it is written under a temporary name, flushed to disk and
renamed (`os.replace` is atomic on POSIX). A point counts as finished exactly when its file
exists, so a run killed at any moment loses at most the points in flight, and a rerun skips
what is done. The manifest is a convenience rebuilt from the point files; nothing depends on it.
"""

import contextlib
import json
import os
import pathlib
import tempfile
import time

import numpy as np

from ._config import Config, ConfigError, Point, load_config

POINTS = "points"
CONFIG = "config.toml"
MANIFEST = "manifest.json"


def point_path(out: pathlib.Path, point: Point) -> pathlib.Path:
    return out / POINTS / f"{point.key}.nc"


def _fsync_dir(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: pathlib.Path):
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`
    (atomic on POSIX), on failure removed. A reader sees the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    _chmod_default(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _chmod_default(path) -> None:
    """mkstemp creates 0600 files; results are ordinary files (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


def open_store(out: pathlib.Path, config: Config, *, resume: bool) -> None:
    """Creates `out` for `config`, or checks that an existing store belongs to it."""
    cfg_path = out / CONFIG
    if cfg_path.exists():
        old = load_config(cfg_path)
        if old.digest() != config.digest():
            raise ConfigError(
                f"{out}: holds results of a different config ({cfg_path}); use another --out, or "
                f"delete the directory to start over"
            )
    else:
        if resume:
            raise ConfigError(f"{out}: nothing to resume (no {CONFIG} there)")
        (out / POINTS).mkdir(parents=True, exist_ok=True)
        text = config.source if config.source is not None else to_toml(config.to_dict())
        atomic_write_bytes(cfg_path, text.encode())
    (out / POINTS).mkdir(parents=True, exist_ok=True)
    # Temporary files of a killed run: never a finished point, safe to remove.
    for tmp in (out / POINTS).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def finished(out: pathlib.Path, points: list[Point]) -> list[bool]:
    return [point_path(out, p).exists() for p in points]


def write_point(out: pathlib.Path, point: Point, dataset) -> None:
    """Writes one point's dataset atomically (temp file, fsync, rename)."""
    path = point_path(out, point)
    with _atomic_target(path) as tmp:
        dataset.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")


def update_manifest(out: pathlib.Path, config: Config, points: list[Point]) -> None:
    entries = {}
    for p, done in zip(points, finished(out, points)):
        entries[p.key] = {
            "index": p.index,
            "coords": p.coords,
            "file": f"{POINTS}/{p.key}.nc" if done else None,
            "finished": done,
        }
    manifest = {
        "config_digest": config.digest(),
        "axes": list(config.axis_names),
        "total": len(points),
        "finished": sum(e["finished"] for e in entries.values()),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "points": entries,
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())


def load(out, *, allow_partial: bool = True):
    """The results of a sweep as one `xarray.Dataset` with dims (grid axes..., seed, time, ...).

    **Arguments:**

    - `out`: the sweep's output directory.
    - `allow_partial`: include a sweep that is not finished (missing points are NaN and
      `finished` is False there); with False, raise if any point is missing.

    **Returns:** an `xarray.Dataset`. Data variables: the recorded metrics (`loss_gd`,
    `drift_gd`, `disc_parameter`, ... see the README), flow solver statistics, `finished`
    and per-point timings (`wall_seconds`, ...). Attributes: the config TOML (`config_toml`),
    library versions, device, and the grid axes.

    **Example:**

    ```python
    ds = flowsim.sweep.load("runs/quickstart")
    ds["drift_gd"].sel(delta=0.25).max("time")
    ```
    """
    import xarray as xr

    out = pathlib.Path(out)
    cfg_path = out / CONFIG
    if not cfg_path.exists():
        raise ConfigError(f"{out}: not a sweep directory (no {CONFIG})")
    config = load_config(cfg_path)
    points = config.points()
    axes = config.axis_names
    parts = []
    done = []
    attrs: dict = {}
    for p in points:
        path = point_path(out, p)
        if not path.exists():
            done.append(False)
            continue
        done.append(True)
        with xr.open_dataset(path, engine="netcdf4") as ds:
            ds = ds.load()
        if not attrs:
            attrs = {
                k: v
                for k, v in ds.attrs.items()
                if k not in ("point_key", "point_label", "point_params")
            }
        ds.attrs = {}
        ds = ds.drop_vars(
            [v for v in ds.coords if v not in ds.dims and v != "layer"], errors="ignore"
        )
        if axes:
            ds = ds.expand_dims({a: [p.coords[a]] for a in axes})
        parts.append(ds)
    if not allow_partial and not all(done):
        raise ConfigError(f"{out}: {done.count(False)} of {len(points)} points are not finished")
    if not parts:
        merged = xr.Dataset()
    elif not axes:
        merged = parts[0]
    elif all(done):
        # A complete grid: concatenation keeps integer dtypes (no fill needed).
        shape = tuple(len(config.axis_values(a)) for a in axes)
        nested = np.empty(shape, dtype=object)
        for i, ds in enumerate(parts):
            nested[np.unravel_index(i, shape)] = ds
        merged = xr.combine_nested(
            nested.tolist(),
            concat_dim=list(axes),
            join="outer",
            combine_attrs="drop",
            data_vars="all",
            coords="different",
            compat="no_conflicts",
        )
    else:  # missing points become NaN
        merged = xr.merge(parts, join="outer", compat="no_conflicts", combine_attrs="drop")
    if axes:
        merged = merged.reindex({a: config.axis_values(a) for a in axes})
        merged = merged.transpose(*axes, "seed", "time", ..., missing_dims="ignore")
        shape = tuple(len(config.axis_values(a)) for a in axes)
        merged["finished"] = (axes, np.asarray(done).reshape(shape))
    else:
        merged["finished"] = ((), np.asarray(done[0]))
    merged.attrs.update(attrs)
    merged.attrs["config_toml"] = cfg_path.read_text()
    merged.attrs["grid_axes"] = json.dumps(list(axes))
    merged.attrs["points_finished"] = int(sum(done))
    merged.attrs["points_total"] = len(points)
    return merged


def to_toml(sections: dict) -> str:
    """A minimal TOML writer for validated configs (tables of scalars and lists)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)
