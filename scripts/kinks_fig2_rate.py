"""The exact path's rate on the Du–Hu–Lee Fig 2 network: the compiled event loop
(`gradient_flow`, `flowsim._exact`) next to the host-side loop (`flowsim._exact.host.kink_flow`)
over the same first events, in one process.

Each path first runs the same `--events` events (compiling), then again from t = 0, timed
(compilations inside the timed run are reported). Both must meet the same events at the
same times (1e-12 relative) before their times are compared. `projected_t20_h` scales the
host loop's measured 6.52 h (63,417 events, `benchmarks/results/kinks_fig2_exact_t20.json`)
by the ratio of the two rates, as if the ratio measured early held where hundreds of
entries slide (it does not: the compiled loop gains more there);
`scripts/kinks_fig2_projection.py` projects from the cost per event at each sliding
capacity instead.

    python scripts/kinks_fig2_rate.py [--events 600] [--out F.json]
"""

import time

import _fig2
import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np

import flowsim
from flowsim._exact import driver
from flowsim._exact.host import kink_flow

HOST_T20_S, HOST_T20_EVENTS = 23_462.0, 63_417


def compiled(net, loss, args, events):
    traj = flowsim.gradient_flow(net, loss, args.t1, ts=jnp.array([0.0, args.t1]),
                                 solver="tsit5", rtol=args.rtol, atol=args.rtol, throw=False,
                                 kinks=flowsim.ExactKinks(max_events=events))
    jax.block_until_ready(traj.models)
    ev = traj.events
    v = np.asarray(ev.valid)
    return traj, np.asarray(ev.t)[v]


def host(net, loss, args, events):
    ctrl = dfx.PIDController(rtol=args.rtol, atol=args.rtol)
    out, stats, result, pieces = kink_flow(net, loss, 0.0, args.t1, np.array([0.0, args.t1]),
                                           dfx.Tsit5(), ctrl, 50_000, events, record=True)
    return stats, np.array([p["t1"] for p in pieces for _ in p["events"]])


def main():
    p = _fig2.parser(__doc__)
    p.add_argument("--events", type=int, default=600)
    args = p.parse_args()
    net, loss = _fig2.fig2_problem(args.n)
    row = {"network": f"{args.n}->100->100->10 ReLU, {args.n} points", "rtol": args.rtol,
           "events": args.events}
    for name, run in (("compiled", compiled), ("host", host)):
        tic = time.perf_counter()
        run(net, loss, args, args.events)
        warm = time.perf_counter() - tic
        traces = driver.TRACES[0]
        tic = time.perf_counter()
        out = run(net, loss, args, args.events)
        wall = time.perf_counter() - tic
        row[name] = {"warm_s": warm, "wall_s": wall, "s_per_event": wall / args.events,
                     "compilations_in_timed_run": driver.TRACES[0] - traces}
        row[name]["event_times"] = out[1]
        if name == "compiled":
            traj = out[0]
            row[name].update({k: float(v) for k, v in traj.stats.items()
                              if k.startswith("num") or k == "t_reached"})
    a, b = row["compiled"].pop("event_times"), row["host"].pop("event_times")
    n = min(a.size, b.size)
    row["records"] = {"compiled": int(a.size), "host": int(b.size)}
    row["event_times_max_rel_diff"] = float(np.max(np.abs(a[:n] - b[:n]) / np.abs(b[:n])))
    assert a.size == b.size and row["event_times_max_rel_diff"] <= 1e-12, row
    ratio = row["host"]["s_per_event"] / row["compiled"]["s_per_event"]
    row["speedup"] = ratio
    row["projected_t20_h"] = HOST_T20_S / ratio / 3600
    _fig2.report(row, args.out)


if __name__ == "__main__":
    main()
