"""The result store: one netCDF file per finished grid point, written atomically.

Layout of an output directory::

    OUT/config.toml        the config the store belongs to (written once)
    OUT/manifest.json      finished points with their parameters and timings (informational)
    OUT/points/KEY.nc      one file per finished point; KEY hashes the point's parameters
    OUT/report/            figures and tables from `flowsim report`

    OUT/.lock              held (flock) by the one sweep writing here; names it

A point file appears only complete: it is written under a temporary name, flushed to disk and
renamed (`os.replace` is atomic on POSIX). A point counts as finished when its file exists and
opens as the point's netCDF file, so a run killed at any moment loses at most the points in
flight, and a rerun skips what is done; a file that does not open (a disk that lost it, a
copy cut short) is moved to `points/bad/` and its point computed again. One sweep at a time
writes to a store: it holds an exclusive lock on `OUT/.lock`, and a second one is refused
with the first one's process id and host. The manifest is a convenience rebuilt from the point
files; nothing depends on it.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np

from ._config import Config, ConfigError, Point, load_config

POINTS = "points"
CONFIG = "config.toml"
MANIFEST = "manifest.json"
LOCK = ".lock"
BAD = "bad"


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=".tmp")
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


def check_out_dir(out: pathlib.Path) -> None:
    """Refuses an output directory that cannot hold a store, before any work is done."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == out else f"cannot be created: {probe} is a file"
        raise ConfigError(f"{out}: {what}; give a directory as the output (--out)")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == out else f" (nothing can be created in {probe})"
        raise ConfigError(f"{out}: not writable{where}; choose another output directory (--out)")
    points = out / POINTS
    if points.is_dir() and not os.access(points, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{points}: not writable, so no point could be stored; fix its permissions "
            f"(chmod u+w) or choose another output directory (--out)"
        )


class StoreLock:
    """An exclusive `flock` on `OUT/.lock`, held while a sweep writes to the store.

    The file names its holder (pid, host, start time) for the message a second sweep gets.
    The lock goes with the process: a killed sweep leaves a stale file but no lock.
    """

    def __init__(self, out: pathlib.Path):
        self.path = out / LOCK
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(self._fd)
            os.close(self._fd)
            raise ConfigError(
                f"{out}: another sweep is writing to this store ({holder}); wait for it to "
                f"finish, or use another --out"
            ) from None
        info = {"pid": os.getpid(), "host": platform.node(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _read_holder(fd) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def open_store(out: pathlib.Path, config: Config, *, resume: bool) -> StoreLock:
    """Creates `out` for `config`, or checks that an existing store belongs to it; returns the
    store's lock, held until `release()`."""
    check_out_dir(out)
    cfg_path = out / CONFIG
    if cfg_path.exists():
        old = load_config(cfg_path)
        if old.digest() != config.digest():
            raise ConfigError(
                f"{out}: holds results of a different config ({cfg_path}); use another --out, or "
                f"delete the directory to start over"
            )
    elif resume:
        raise ConfigError(f"{out}: nothing to resume (no {CONFIG} there)")
    try:
        (out / POINTS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the store: {e.strerror}; choose another --out") \
            from None
    lock = StoreLock(out)
    try:
        if not cfg_path.exists():
            text = config.source if config.source is not None else to_toml(config.to_dict())
            atomic_write_bytes(cfg_path, text.encode())
        # Under the lock no other sweep writes here: every temporary file is a killed run's.
        for tmp in (out / POINTS).glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def finished(out: pathlib.Path, points: list[Point]) -> list[bool]:
    return [point_path(out, p).exists() for p in points]


def point_problem(path: pathlib.Path, key: str | None = None) -> str | None:
    """Why the point file `path` is not a finished point (None if it is): it must open as
    netCDF and carry its point's key."""
    import netCDF4

    try:
        with netCDF4.Dataset(path, "r") as nc:
            found = nc.getncattr("point_key") if "point_key" in nc.ncattrs() else None
    except OSError as e:
        size = path.stat().st_size if path.exists() else 0
        what = "empty" if size == 0 else f"{size} bytes, truncated or not netCDF"
        return f"cannot be opened ({what}: {e.strerror or e})"
    if key is not None and found != key:
        return f"holds point {found!r}, not {key!r}"
    return None


def verify_finished(out: pathlib.Path, points: list[Point], say) -> list[bool]:
    """`finished`, with every existing point file opened: a bad one is moved to `points/bad/`
    (one line through `say`) and counts as not finished, so that it is computed again."""
    done = []
    for p in points:
        path = point_path(out, p)
        if not path.exists():
            done.append(False)
            continue
        problem = point_problem(path, p.key)
        if problem is not None:
            bad = out / POINTS / BAD
            bad.mkdir(exist_ok=True)
            dest = bad / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(path, dest)
            say(f"flowsim sweep: {path}: {problem}; moved to {dest}, computing the point again")
        done.append(problem is None)
    return done


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
        try:
            with xr.open_dataset(path, engine="netcdf4") as ds:
                ds = ds.load()
        except (OSError, ValueError) as e:
            reason = point_problem(path) or f"cannot be read ({e})"
            raise ConfigError(
                f"{path}: {reason}; `flowsim sweep {cfg_path} --out {out} --resume` moves it "
                f"aside and computes the point again"
            ) from None
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
