"""ReLU kinks at scale: the Du–Hu–Lee Fig 2 network's gradient flow to t = 20, exact vs smooth.

The flow of the 1000 -> 100 -> 100 -> 10 ReLU network (1000 Gaussian points, targets from a
random teacher of the same shape, balanced initialisation) has 200,000 pre-activation surfaces.
This script measures, with Tsit5 at rtol = atol (default 1e-8):

1. the plain adaptive solve (`kinks="smooth"`) to t1: wall time, steps, rejected steps and the
   layer-gap drift (the exact flow conserves the gaps: the drift is the a-posteriori check);
2. how many kinks the flow crosses: the activation pattern (as bits) is saved at every
   accepted step of a second smooth solve (and at `--saves` equally spaced times), and the
   flips of every entry between consecutive steps are counted: entries that flip once (a
   crossing), and entries that flip back and forth (3 or more times: the smooth solver
   zig-zagging across a surface that the exact flow slides on, or many true crossings);
3. the exact path (`kinks="exact"`) for `--exact-events` events: wall time per event and
   time covered, hence the projected cost of the exact solve over the flips counted in 2;
   its layer-gap drift up to `--exact-t` (saved at 11 times there), next to the smooth
   solve's over the same interval, and the smooth solve's distance from it there against the
   smooth solve's own error estimate (`flowsim.estimate_error`). With `--checkpoint FILE` the
   exact solve keeps its state in FILE and resumes from it, so the full horizon can be run
   in pieces: `--exact-t 20 --exact-events 1000000 --checkpoint runs/fig2_exact.npz`, stopped
   by SIGINT or SIGTERM (`timeout 3h ...`) and restarted at will; the wall time is summed over
   the runs;
4. (`--late-start T`) the exact path late in the flow: started from the smooth solve's state
   at T for `--late-events` events, which shows how many entries slide at once there and
   what an event costs then;
5. the documented mode for this size, the smooth solve with its a-posteriori error estimate
   (`flowsim.estimate_error(..., kinks="smooth")`: a second solve at rtol / 10) to t1: wall time,
   estimate and drift, next to the plain smooth solve of step 1;
6. (`tolerances`, not in the default steps: ~80 min) smooth solves at rtol, rtol / 10 and
   rtol / 100, and their pairwise distances at the 11 saved times: how the error shrinks with
   the tolerance, hence how far the estimate of step 5 can be trusted.
7. (`progress`, with `--checkpoint`, not in the default steps) the checkpointed exact solve of
   step 3 as far as it has got: events, sliding entries, seconds, layer-gap drift over the
   save times passed, and there the smooth solve's true error (its distance from the exact
   path) next to its error estimate, and GD (`--gd-etas`) against it at the last of those
   times; with `--out`, a figure of it next to the JSON (.png).
8. (`carry`, with `--checkpoint`, not in the default steps) what carrying the first layer's
   pre-activations in the pieces' state saves (docs/kinks.md, Cost): from a copy of the
   checkpoint, `--carry-events` events after 30 of warm-up, with and without, in one process;
   both must reach the same time with the same events before the times are compared. The
   checkpoint itself is not touched.

    python scripts/kinks_fig2.py [--t1 20] [--rtol 1e-8] [--n 1000] [--saves 2001]
                                 [--exact-events 100] [--exact-t 0.02]
                                 [--checkpoint FILE]
                                 [--late-start 19.5] [--late-events 100]
                                 [--carry-events 200]
                                 [--steps smooth,pattern,exact,late,estimate,tolerances,progress,
                                          carry]
                                 [--out results.json]
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time

import _fig2
import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import flowsim
from flowsim import invariants as inv
from flowsim._exact import events as exact_events
from flowsim._exact.checkpoint import checkpoint_info


def pattern_flips(net, loss, t1, rtol, saves, max_steps=5_000):
    """How the activation pattern changes along a smooth solve: at every accepted step, and
    between `saves` equally spaced times (as bits, one solve)."""
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def field(t, p, args):
        g = eqx.filter_grad(lambda q: loss(eqx.combine(q, static)))(p)
        return jax.tree.map(jnp.negative, g)

    def pattern(t, p, args):
        zs = eqx.combine(p, static).forward(loss.X)[1]
        return jnp.packbits(jnp.concatenate([(z > 0).ravel() for z in zs]))

    # diffrax fills its save buffers with inf before the solve; cast to uint8 that warns.
    with np.errstate(invalid="ignore"):
        sol = eqx.filter_jit(dfx.diffeqsolve)(
            dfx.ODETerm(field), dfx.Tsit5(), 0.0, t1, None, params,
            saveat=dfx.SaveAt(subs=[dfx.SubSaveAt(ts=jnp.linspace(0.0, t1, saves), fn=pattern),
                                    dfx.SubSaveAt(steps=True, fn=pattern)]),
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol), max_steps=max_steps,
        )
    at_saves = np.asarray(sol.ys[0])  # (saves, surfaces / 8) uint8
    accepted = int(sol.stats["num_accepted_steps"])
    at_steps = np.concatenate([at_saves[:1], np.asarray(sol.ys[1])[:accepted]])

    def count(b):
        return np.array([int(np.unpackbits(x ^ y).sum()) for x, y in zip(b[:-1], b[1:])])

    # Per entry: how often it flips from one accepted step to the next.
    flips = np.zeros(np.unpackbits(at_steps[0]).size, np.int64)
    for x, y in zip(at_steps[:-1], at_steps[1:]):
        flips += np.unpackbits(x ^ y)
    net_change = np.unpackbits(at_steps[0] ^ at_steps[-1]).astype(bool)
    per_interval = count(at_saves)
    return {
        "surfaces": int(flips.size),
        "accepted_steps": accepted,
        "flips_between_steps": int(flips.sum()),
        "entries_that_flip": int(np.sum(flips > 0)),
        "entries_flipping_once": int(np.sum(flips == 1)),
        "entries_flipping_3_or_more_times": int(np.sum(flips >= 3)),
        "flips_of_those": int(flips[flips >= 3].sum()),
        "max_flips_of_one_entry": int(flips.max()),
        "entries_changed_t0_to_t1": int(net_change.sum()),
        "pattern_changes_between_saves": int(per_interval.sum()),
        "pattern_changes_half_rate": int(count(at_saves[::2]).sum()),
        "changes_by_tenth_of_horizon": [int(c.sum()) for c in np.array_split(per_interval, 10)],
    }


def flat(traj):
    """(time, parameters): every saved state as one vector."""
    leaves = jax.tree.leaves(eqx.filter(traj.models, eqx.is_inexact_array))
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def solve(net, loss, t1, rtol, kinks, ts=None, keep=None, max_events=10_000, checkpoint=None,
          error_estimate=False, **kw):
    ts = jnp.linspace(0, t1, 11) if ts is None else ts
    if kinks == "exact":
        kinks = flowsim.ExactKinks(max_events=max_events, checkpoint=checkpoint)
    run = flowsim.estimate_error if error_estimate else flowsim.gradient_flow
    start = time.perf_counter()
    traj = run(net, loss, t1, ts=ts, solver="tsit5", rtol=rtol, atol=rtol, kinks=kinks,
               throw=False, **kw)
    wall = time.perf_counter() - start
    if keep is not None:
        keep.append(traj)
    reached = float(traj.stats["t_reached"])
    upto = np.flatnonzero(np.asarray(traj.ts) <= reached)[-1]
    gaps = np.asarray(inv.layer_gaps(traj.models))[: upto + 1]
    norms = np.asarray(inv.layer_norms(traj.model_at(0)))
    row = {
        **{k: float(v) for k, v in traj.stats.items()},
        "wall_s": wall,
        "result": int(np.asarray(traj.result._value)),
        "drift_measured_up_to_t": float(traj.ts[upto]),
        "layer_gap_t0": [float(g) for g in gaps[0]],
        "layer_gap_drift": [float(d) for d in np.max(np.abs(gaps - gaps[0]), axis=0)],
        "layer_gap_drift_relative": [float(d) for d in
                                     np.max(np.abs(gaps - gaps[0]), axis=0) / norms[1:]],
    }
    return row


def segment_start(path):
    """The exact solve's state in its checkpoint before this run (`t` 0 for a fresh solve),
    and the code version that runs it."""
    if path is not None and os.path.exists(path):
        before = checkpoint_info(path)
    else:
        before = {"t": 0.0, "stats": {"num_events": 0}, "elapsed_s": 0.0}
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*cmd):
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=here).stdout

    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return {**before, "commit": git("rev-parse", "--short", "HEAD").strip()
            + ("+changes" if dirty else "")}


def segment_end(path, before, interrupted):
    """What this run of a checkpointed exact solve did, appended to `<path>.segments.jsonl`
    (one line per run: the code version, flow time and events covered, seconds)."""
    after = checkpoint_info(path)
    row = {"commit": before["commit"], "interrupted": interrupted,
           "t_from": before["t"], "t_to": after["t"],
           "events_from": before["stats"]["num_events"], "events_to": after["stats"]["num_events"],
           "wall_s": after["elapsed_s"] - before["elapsed_s"], "elapsed_s": after["elapsed_s"],
           "sliding_now": len(after["sliding"]), "stats": after["stats"],
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(f"{path}.segments.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def exact_so_far(net, loss, path, exact_t, rtol, etas=()):
    """The checkpointed exact solve as far as it has got: its event counts, seconds and the
    layer-gap drift over the save times it has passed, and the smooth solve's distance from
    it there (its true error, with the exact path as reference) next to the smooth solve's
    error estimate over the same times; and gradient descent with the step sizes `etas` at
    the last of those times (distance from the exact path, fitted order in eta)."""
    info = checkpoint_info(path, states=True)
    ts = np.linspace(0, exact_t, 11)
    passed = np.flatnonzero(info["filled"])
    if passed.size < 2:
        return {"t_reached": info["t"], "note": "no save time after t = 0 passed yet"}
    params, static = eqx.partition(net, eqx.is_inexact_array)
    leaves = [np.asarray(x)[passed] for x in info["saved"]]
    exact = eqx.combine(jax.tree.unflatten(jax.tree.structure(params), leaves), static)
    gaps = np.asarray(inv.layer_gaps(exact))
    norms = np.asarray(inv.layer_norms(net))
    kept = []
    smooth = solve(net, loss, ts[passed[-1]], rtol, "smooth", ts=jnp.asarray(ts[passed]),
                   keep=kept, error_estimate=True, max_steps=50_000)
    e = np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
    s = flat(kept[0])
    scale = np.max(np.linalg.norm(e, axis=1))
    dist = np.linalg.norm(s - e, axis=1) / scale
    # Gradient descent at matched time t = k eta converges to the flow at first order: an
    # independent check of the exact path through its thousands of events.
    t_last, gd = float(ts[passed[-1]]), {}
    for eta in etas:
        steps = round(t_last / eta)
        start = time.perf_counter()
        run = flowsim.gradient_descent(net, loss, steps, learning_rate=eta, save_every=steps)
        final = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(
            eqx.filter(run.final_model(), eqx.is_inexact_array))])
        gd[f"{eta:g}"] = {"steps": steps, "wall_s": time.perf_counter() - start,
                          "distance_from_exact_path": float(np.linalg.norm(final - e[-1]) / scale)}
    if len(etas) > 1:
        off = [gd[f"{eta:g}"]["distance_from_exact_path"] for eta in etas]
        gd["fitted_order"] = float(np.polyfit(np.log(etas), np.log(off), 1)[0])
    return {
        "surfaces": int(sum(z.size for z in net.forward(loss.X)[1])),
        "t_reached": info["t"], **{k: v for k, v in info["stats"].items()},
        "sliding_now": len(info["sliding"]), "elapsed_s": info["elapsed_s"],
        "wall_s_per_event": info["elapsed_s"] / max(info["stats"]["num_events"], 1),
        "save_times_passed": [float(t) for t in ts[passed]],
        "layer_gap_drift": [float(d) for d in np.max(np.abs(gaps - gaps[0]), axis=0)],
        "layer_gap_drift_relative": [float(d) for d in
                                     np.max(np.abs(gaps - gaps[0]), axis=0) / norms[1:]],
        "smooth": smooth,
        "smooth_distance_from_exact_path": [float(d) for d in dist],
        "gd_at_last_save_time": {"t": t_last, **gd},
    }


def plot_progress(row, checkpoint, png):
    """Events, entries sliding and seconds along the exact solve's flow time (from the
    checkpoint's history and the ends of the runs logged), and the smooth solve's distance
    from the exact path at the save times passed."""
    from flowsim.reproduce._base import figure, finish

    points = [(0.0, 0, 0, 0.0)]
    log = f"{checkpoint}.segments.jsonl"
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                r = json.loads(line)
                points.append((r["t_to"], r["events_to"], r["sliding_now"], r["elapsed_s"]))
    points += [tuple(h) for h in checkpoint_info(checkpoint)["history"]]
    t, events, sliding, seconds = np.array(sorted(set(points))).T
    fig, axes = figure(3, 1, width=4.6, height=3.6)
    ax = axes[0, 0]
    ax.plot(t, events, ".-", ms=3, label="events")
    finish(ax, xlabel="flow time t", ylabel="events (crossings, slides, releases)",
           title="exact path: events, entries sliding", legend=False)
    twin = ax.twinx()
    twin.plot(t, sliding, ".-", ms=3, color="C1")
    twin.set_ylabel("entries sliding", color="C1")
    ax = axes[0, 1]
    ax.plot(t, seconds / 3600, ".-", ms=3)
    finish(ax, xlabel="flow time t", ylabel="hours (summed over runs)",
           title="exact path: wall time", legend=False)
    ax = axes[0, 2]
    times, dist = row.get("save_times_passed", []), row.get("smooth_distance_from_exact_path")
    if dist:
        ax.semilogy(times[1:], dist[1:], "o-", label="smooth (rtol 1e-8) vs exact")
        ax.axhline(row["smooth"]["error_estimate"], color="C1", ls="--",
                   label="its error estimate (max)")
        gd = row["gd_at_last_save_time"]
        for i, (eta, r) in enumerate((k, v) for k, v in gd.items() if isinstance(v, dict)):
            ax.plot([gd["t"]], [r["distance_from_exact_path"]], "s", color=f"C{i + 2}",
                    label=f"GD, eta = {eta}")
        ax.set_xlim(0, 1.05 * times[-1])
    else:
        ax.text(0.5, 0.5, "no save time passed yet", ha="center", transform=ax.transAxes)
    finish(ax, xlabel="flow time t", ylabel="relative distance",
           title="smooth solve's error", logy=bool(dist))
    fig.suptitle(f"Fig 2 network ({row['surfaces']:,} surfaces), exact path to "
                 f"t = {row['t_reached']:.3g}", fontsize=10)
    fig.savefig(png, dpi=110)


def late(net, loss, t_start, t1, rtol, events):
    """The exact path from the smooth solve's state at `t_start`: entries that the smooth
    solver zig-zags across sit within its error of their surfaces there, so the exact path
    meets them at once (sliding, or crossing). An estimate of what the exact flow holds at
    that time: the smooth state is the exact one only to the smooth solve's error."""
    start = time.perf_counter()
    smooth = flowsim.gradient_flow(net, loss, t_start, ts=jnp.array([0.0, t_start]),
                                   solver="tsit5", rtol=rtol, atol=rtol, kinks="smooth",
                                   max_steps=50_000)
    smooth_s = time.perf_counter() - start
    start = time.perf_counter()
    traj = flowsim.gradient_flow(smooth.model_at(1), loss, t1, t0=t_start,
                                 ts=jnp.array([t_start, t1]), solver="tsit5", rtol=rtol,
                                 atol=rtol, kinks=flowsim.ExactKinks(max_events=events),
                                 throw=False, max_steps=50_000, progress=True)
    wall = time.perf_counter() - start
    row = {k: float(v) for k, v in traj.stats.items() if k != "layer_gap_drift"}
    return {**row, "t_start": t_start, "smooth_to_t_start_wall_s": smooth_s, "wall_s": wall,
            "wall_s_per_event": wall / max(row["num_events"], 1),
            "flow_time_covered": row["t_reached"] - t_start}


def carried_first_layer(net, loss, path, t1, exact_t, rtol, events, warmup=30):
    """Seconds per event from a copy of the checkpoint `path`, with the first layer's
    pre-activations carried in the pieces' state (at any input width) and without
    (`flowsim._exact.events._FIRST_STATE`, `_FIRST_STATE_MIN_INPUTS`): `warmup`
    events (compilation), then `events` timed; both must end at the same time and events.
    `t1`, `exact_t`: those of the solve that wrote the checkpoint (step 3)."""
    rows = {}
    minimum = exact_events._FIRST_STATE_MIN_INPUTS
    with tempfile.TemporaryDirectory() as folder:
        for carry in (True, False):
            copy = os.path.join(folder, f"carry_{carry}.npz")
            shutil.copy(path, copy)
            exact_events._FIRST_STATE = carry
            exact_events._FIRST_STATE_MIN_INPUTS = 0
            row = {}
            try:
                for name, n in (("warmup", warmup), ("timed", events)):
                    before = checkpoint_info(copy)
                    start = time.perf_counter()
                    flowsim.gradient_flow(net, loss, t1, ts=jnp.linspace(0, exact_t, 11),
                                          solver="tsit5", rtol=rtol, atol=rtol,
                                          throw=False, max_steps=50_000,
                                          kinks=flowsim.ExactKinks(
                                              max_events=before["stats"]["num_events"] + n,
                                              checkpoint=copy))
                    wall = time.perf_counter() - start
                    after = checkpoint_info(copy)
                    done = after["stats"]["num_events"] - before["stats"]["num_events"]
                    row[name] = {"wall_s": wall, "events": done, "t_from": before["t"],
                                 "t_to": after["t"], "sliding_now": len(after["sliding"]),
                                 "stats": after["stats"], "wall_s_per_event": wall / max(done, 1)}
            finally:
                exact_events._FIRST_STATE, exact_events._FIRST_STATE_MIN_INPUTS = True, minimum
            rows["carried" if carry else "plain"] = row
            print("carry" if carry else "plain", json.dumps(row["timed"]), flush=True)
    a, b = rows["carried"]["timed"], rows["plain"]["timed"]
    if a["stats"] != b["stats"] or abs(a["t_to"] - b["t_to"]) > 1e-9 * max(1.0, b["t_to"]):
        raise RuntimeError(f"with and without the carried pre-activations the solves differ: "
                           f"t = {a['t_to']!r} against {b['t_to']!r}, {a['stats']} against "
                           f"{b['stats']}")
    rows["t_difference"] = abs(a["t_to"] - b["t_to"])
    rows["time_ratio_carried_to_plain"] = a["wall_s"] / b["wall_s"]
    return rows


def main():
    parser = _fig2.parser(__doc__)
    parser.add_argument("--saves", type=int, default=2001,
                        help="times at which the activation pattern is saved (step 2)")
    parser.add_argument("--exact-events", type=int, default=100,
                        help="events the exact path is run for (step 3)")
    parser.add_argument("--exact-t", type=float, default=0.02,
                        help="drift of the exact and smooth paths compared up to this time")
    parser.add_argument("--late-start", type=float, default=None,
                        help="step 4: start the exact path from the smooth state at this time")
    parser.add_argument("--late-events", type=int, default=100,
                        help="events the late exact path is run for (step 4)")
    parser.add_argument("--checkpoint", default=None,
                        help="step 3: keep the exact solve's state in this .npz file and resume "
                             "from it (stop a run with Ctrl-C, SIGINT or SIGTERM; each run is "
                             "logged in <checkpoint>.segments.jsonl)")
    parser.add_argument("--gd-etas", default="2e-3,1e-3,5e-4",
                        help="step 7: GD step sizes compared with the exact path (empty: none)")
    parser.add_argument("--carry-events", type=int, default=200,
                        help="step 8: events timed with and without the carried pre-activations")
    names = ("smooth", "pattern", "exact", "late", "estimate", "tolerances", "progress", "carry")
    parser.add_argument("--steps", default=",".join(names[:-3]),
                        help="which steps to run (late only with --late-start)")
    args = parser.parse_args()
    if args.checkpoint is not None:
        # Stop the checkpointed solve with SIGINT or SIGTERM, also when started in the
        # background of a non-interactive shell (which starts it with SIGINT ignored).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
    steps = set(args.steps.split(","))
    unknown = steps - set(names)
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(sorted(unknown))}; "
                     f"choose from {','.join(names)}")
    net, loss = _fig2.fig2_problem(args.n)
    rows = {}
    if "smooth" in steps:
        rows["smooth"] = solve(net, loss, args.t1, args.rtol, "smooth", max_steps=50_000)
        print("smooth", json.dumps(rows["smooth"]), flush=True)
    if "pattern" in steps:
        start = time.perf_counter()
        rows["pattern"] = pattern_flips(net, loss, args.t1, args.rtol, args.saves)
        rows["pattern"]["wall_s"] = time.perf_counter() - start
        print("pattern changes", json.dumps(rows["pattern"]), flush=True)
    if "exact" in steps:
        early = jnp.linspace(0, args.exact_t, 11)
        kept = []
        before = segment_start(args.checkpoint)
        try:
            exact = solve(net, loss, args.t1, args.rtol, "exact", ts=early, max_steps=50_000,
                          max_events=args.exact_events, progress=True, keep=kept,
                          checkpoint=args.checkpoint)
        except KeyboardInterrupt:
            if args.checkpoint is None:
                raise
            row = segment_end(args.checkpoint, before, interrupted=True)
            print("exact (interrupted)", json.dumps(row), flush=True)
            return
        if args.checkpoint is not None:
            exact["segment"] = segment_end(args.checkpoint, before, interrupted=False)
            exact["wall_s_all_segments"] = exact["segment"]["elapsed_s"]
        smooth = solve(net, loss, args.exact_t, args.rtol, "smooth", ts=early, keep=kept,
                       error_estimate=True)
        if exact["t_reached"] >= args.exact_t:
            # What the estimate estimates, with the exact path (at the same rtol) as reference.
            e, s = flat(kept[0]), flat(kept[1])
            smooth["distance_from_exact_path"] = float(
                np.max(np.linalg.norm(s - e, axis=1)) / np.max(np.linalg.norm(e, axis=1)))
        rows["smooth_to_exact_t"] = smooth
        print("smooth to --exact-t", json.dumps(rows["smooth_to_exact_t"]), flush=True)
        per_event = exact.get("wall_s_all_segments", exact["wall_s"]) / max(
            exact["num_events"], 1)
        exact["wall_s_per_event"] = per_event
        if "pattern" in rows:
            exact["projected_wall_s_for_counted_changes"] = (
                per_event * rows["pattern"]["flips_between_steps"])
        rows["exact"] = exact
        print("exact", json.dumps(exact), flush=True)
    if "late" in steps and args.late_start is not None:
        rows["late"] = late(net, loss, args.late_start, args.t1, args.rtol, args.late_events)
        print("late", json.dumps(rows["late"]), flush=True)
    if "estimate" in steps:
        rows["estimate"] = solve(net, loss, args.t1, args.rtol, "smooth", max_steps=50_000,
                                 error_estimate=True)
        print("smooth with error estimate", json.dumps(rows["estimate"]), flush=True)
    if "tolerances" in steps:
        kept, tols = [], [args.rtol, args.rtol / 10, args.rtol / 100]
        rows["tolerances"] = {f"{tol:g}": solve(net, loss, args.t1, tol, "smooth", keep=kept,
                                                max_steps=200_000) for tol in tols}
        ys = [flat(traj) for traj in kept]
        scale = np.max(np.linalg.norm(ys[-1], axis=1))
        for (i, a), (j, b) in [((0, ys[0]), (1, ys[1])), ((0, ys[0]), (2, ys[2])),
                               ((1, ys[1]), (2, ys[2]))]:
            rows["tolerances"][f"distance_{tols[i]:g}_{tols[j]:g}"] = list(
                np.linalg.norm(a - b, axis=1) / scale)
        print("tolerances", json.dumps(rows["tolerances"]), flush=True)
    if "progress" in steps:
        if args.checkpoint is None:
            parser.error("--steps progress reads the exact solve's --checkpoint FILE")
        etas = [float(e) for e in args.gd_etas.split(",") if e]
        rows["progress"] = exact_so_far(net, loss, args.checkpoint, args.exact_t, args.rtol,
                                        etas)
        print("exact so far", json.dumps(rows["progress"]), flush=True)
        if args.out:
            png = os.path.splitext(args.out)[0] + ".png"
            plot_progress(rows["progress"], args.checkpoint, png)
            print("figure:", png)
    if "carry" in steps:
        if args.checkpoint is None:
            parser.error("--steps carry starts from the exact solve's --checkpoint FILE")
        rows["carry"] = carried_first_layer(net, loss, args.checkpoint, args.t1, args.exact_t,
                                            args.rtol, args.carry_events)
        print("carried first layer", json.dumps(
            {k: rows["carry"][k] for k in ("t_difference", "time_ratio_carried_to_plain")}),
            flush=True)
    rows["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("peak RSS (GB):", rows["peak_rss_gb"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
