"""An exact solve's loop state on disk (.npz), so that a solve of hours survives interruptions.

The file holds every leaf of the loop's state (`ExactState`, batched or not) at an iteration
boundary, with a fingerprint of the problem, the sliding capacity and the record length it was
written at, the seconds spent, and one history row per write. A solve resumed from it goes on
bitwise as if never stopped: the loop's iterations depend on nothing but the state.
"""

import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .host import _Checkpoint, checkpoint_info as host_info
from .state import MAX_EVENTS

# A chunked solve writes its checkpoint after the first call that ends this long after the
# last write, and when it stops.
CHECKPOINT_SECONDS = 60.0


def _meta(path):
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["meta"])), {k: f[k] for k in f.files if k != "meta"}


class Checkpoint(_Checkpoint):
    """The checkpoint file of one solve (see the module docstring); the path's checks and the
    problem's fingerprint are the host-side loop's."""

    def __init__(self, path, params, loss, t0, t1, ts, solver, controller):
        super().__init__(path, params, loss, t0, t1, ts, solver, controller)
        self.elapsed = 0.0

    def load(self, like, records):
        """The saved state, or None without a file. `like(capacity, records)`: the state's
        shapes at a capacity. A trajectory that failed (event budget, step budget) is reopened
        where it stopped, so that a rerun with a larger budget carries on; the event record
        is cut or padded to `records` rows."""
        if not os.path.exists(self.path):
            return None
        try:
            meta, data = _meta(self.path)
            capacity, saved_records = int(meta["capacity"]), int(meta["records"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint: {self.path} is not a flowsim checkpoint of the "
                             f"exact path ({e}); delete it or pass another path") from None
        self.check_fingerprint(meta)
        shapes = like(capacity, saved_records)
        leaves, treedef = jax.tree.flatten(shapes)
        state = jax.tree.unflatten(
            treedef, [jnp.asarray(data[f"a{i}"], leaf.dtype) for i, leaf in enumerate(leaves)])
        self.history = meta.get("history", [])
        self.elapsed = float(meta.get("elapsed_s", 0.0))
        if saved_records != records:
            def fit(a, fill=0):
                if records <= a.shape[-1]:
                    return a[..., :records]
                pad = [(0, 0)] * (a.ndim - 1) + [(0, records - a.shape[-1])]
                return jnp.pad(a, pad, constant_values=fill)
            state = eqx.tree_at(lambda q: (q.ev_t, q.ev_kind, q.ev_entry), state,
                                (fit(state.ev_t), fit(state.ev_kind), fit(state.ev_entry)))
        failed = state.done & (state.result != 0)
        return eqx.tree_at(lambda q: (q.done, q.pending, q.result), state,
                           (state.done & ~failed,
                            state.pending | (failed & (state.result == MAX_EVENTS)),
                            jnp.where(failed, 0, state.result)))

    def save(self, state, started, force=False):
        """Writes `state` (atomically) if forced or `CHECKPOINT_SECONDS` have passed."""
        now = time.perf_counter()
        if not force and now - self.last_save < CHECKPOINT_SECONDS:
            return
        self.last_save = now
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
        leaves = [x for _, x in flat]
        elapsed = self.elapsed + now - started
        t = float(np.min(state.t))
        stats = {k: np.asarray(v).tolist() for k, v in state.stats.items()}
        n, idx = np.asarray(state.n), np.asarray(state.idx)
        sliding = idx[: int(n)].tolist() if n.ndim == 0 else [
            row[: int(m)].tolist() for row, m in zip(idx, n)]
        self.history.append([t, int(np.max(stats["num_events"])), int(np.max(n)), elapsed])
        meta = {"fingerprint": self.fingerprint, "capacity": state.capacity,
                "records": int(state.ev_t.shape[-1]), "elapsed_s": elapsed,
                "done": bool(np.all(state.done)), "history": self.history, "t": t,
                "stats": stats, "sliding": sliding,
                "paths": [jax.tree_util.keystr(path) for path, _ in flat]}
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(meta)),
                                **{f"a{i}": np.asarray(x) for i, x in enumerate(leaves)})
        os.replace(tmp, self.path)


def checkpoint_info(path, states: bool = False) -> dict:
    """What an exact solve's checkpoint holds: `t` reached (the least over a batch), `stats`
    there, `sliding` (the entries sliding; per member for a batch), `elapsed_s` (seconds
    spent, summed over resumed runs), `done`, `capacity`, and `history`, one row [t, events,
    entries sliding, seconds] per write; with `states` also `filled` (which save times the
    solve has passed) and `saved`, the leaves of the parameters at the save times (leading
    axes: batch, time). Files of the host-side loop (`host.kink_flow`) are read by
    `host.checkpoint_info`."""
    meta, data = _meta(os.fspath(path))
    if "capacity" not in meta:
        return host_info(path, states)
    info = {k: meta[k] for k in ("t", "stats", "sliding", "elapsed_s", "done", "capacity",
                                 "history")}
    if states:
        paths = meta["paths"]
        info["filled"] = data[f"a{paths.index('.filled')}"]
        info["saved"] = [data[f"a{i}"] for i, p in enumerate(paths) if p.startswith(".out")]
    return info
