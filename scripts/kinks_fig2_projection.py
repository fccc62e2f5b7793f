"""The exact path's time to t = 20 on the Du–Hu–Lee Fig 2 network, projected from what an
event costs at each sliding capacity.

An event's cost follows the capacity of the sliding set (its padded size: the residuals of
the sliding slopes run over that many rows, their Jacobian is that square), far more than
the events' kind. The reference solve to t = 20 (63,417 events,
`benchmarks/results/kinks_fig2_exact_checkpoint.npz`, whose `history` holds flow time,
events, entries sliding and seconds every 60 s) says how many events happen while n entries
slide. This script measures the seconds per event at each capacity K, at a fixed K
(shrinking off; and once as a solve sets it, started at 128 from t = 10), timed on a second
run after a first that compiles:

- K = 8 from t = 0 (at most 7 entries slide there);
- K = 16 ... 128 from the smooth solve's state at t = 10 (crossings, <= 15 entries sliding);
- K = 256 ... 1024 from the smooth solve's state at t = 19.5 (every event there starts a
  slide: the set grows by one per event);

and sums, over the reference history, events x seconds per event at the capacity the solve
runs at, following the sizes of the set by `flowsim._exact.state.next_capacity`'s rule
(doubled when the set outgrows it, brought down when it falls to a quarter).

    python scripts/kinks_fig2_projection.py [--events 200] [--out F.json]
"""

import json
import os
import time

import _fig2
import jax
import jax.numpy as jnp
import numpy as np

import flowsim
from flowsim._exact import solve as exact_solve
from flowsim._exact.state import next_capacity, shrinks

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                         "kinks_fig2_exact_checkpoint.npz")
PHASES = ((0.0, (8,)), (10.0, (16, 32, 64, 128)), (19.5, (256, 512, 1024)))


def reference_history():
    """(events, entries sliding) per 60 s of the reference solve to t = 20."""
    with np.load(REFERENCE, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
    history = np.asarray(json.loads(meta["history"]) if isinstance(meta["history"], str)
                         else meta["history"])
    return np.diff(history[:, 1], prepend=0.0), history[:, 2], meta["stats"]["num_events"]


def capacities(sliding):
    """The capacity the solve runs at through the reference history's sliding-set sizes, by
    `next_capacity`'s rule: doubled while the set outgrows it, brought down to the smallest
    power of two >= max(8, 2 n) when the set falls to a quarter of it."""
    k, out = 8, []
    for n in sliding:
        while n > k:
            k = next_capacity(k)
        if shrinks(k, n):
            k = next_capacity(k, int(n))
        out.append(k)
    return out


def seconds_per_event(model, loss, t0, capacity, events, rtol, shrink=False):
    exact_solve._SHRINK = shrink
    runs = []
    for _ in range(2):
        tic = time.perf_counter()
        traj = flowsim.gradient_flow(model, loss, 20.0, t0=t0, ts=jnp.array([t0, 20.0]),
                                     solver="tsit5", rtol=rtol, atol=rtol, throw=False,
                                     max_steps=50_000,
                                     kinks=flowsim.ExactKinks(max_events=events,
                                                              capacity=capacity))
        jax.block_until_ready(traj.models)
        runs.append(time.perf_counter() - tic)
    stats = {k: float(v) for k, v in traj.stats.items() if k != "layer_gap_drift"}
    assert shrink or stats["num_sliding_max"] <= capacity, stats
    return {"t_start": t0, "first_run_s": runs[0], "timed_s": runs[1],
            "s_per_event": runs[1] / stats["num_events"],
            **{k: stats[k] for k in ("num_events", "num_crossings", "num_sliding_intervals",
                                     "num_sliding_max", "num_steps")}}


def project(rates, shrinking, args):
    """The projection from the seconds per event by capacity (`rates`), as written to --out."""
    events, sliding, total = reference_history()
    by_capacity = {}
    for e, k in zip(events, capacities(sliding)):
        by_capacity[k] = by_capacity.get(k, 0.0) + e
    projected = sum(e * rates[k]["s_per_event"] for k, e in by_capacity.items())
    row = {"network": f"{args.n}->100->100->10 ReLU, {args.n} points", "rtol": args.rtol,
           "seconds_per_event_by_capacity": rates,
           "started_at_128_shrinking_from_t10": shrinking,
           "reference_events_by_capacity": {str(k): int(e) for k, e in
                                            sorted(by_capacity.items())},
           "reference_events": int(total),
           "projected_t20_s": projected, "projected_t20_h": projected / 3600,
           "cpu_count": os.cpu_count(), "jax": jax.__version__}
    return row


def main():
    p = _fig2.parser(__doc__)
    p.add_argument("--events", type=int, default=200,
                   help="events timed per capacity (at most 150 from t = 19.5)")
    args = p.parse_args()
    net, loss = _fig2.fig2_problem(args.n)
    rates, shrinking = {}, None
    for t0, phase_capacities in PHASES:
        start = time.perf_counter()
        model = net
        if t0 > 0:
            smooth = flowsim.gradient_flow(net, loss, t0, ts=jnp.array([0.0, t0]),
                                           solver="tsit5", rtol=args.rtol, atol=args.rtol,
                                           kinks="smooth", max_steps=50_000)
            model = smooth.model_at(1)
        smooth_s = time.perf_counter() - start
        for k in phase_capacities:
            events = min(args.events, 150) if t0 > 15 else args.events
            rates[k] = seconds_per_event(model, loss, t0, k, events, args.rtol)
            rates[k]["smooth_to_t_start_s"] = smooth_s
            print(k, json.dumps(rates[k]), flush=True)
        if t0 == 10.0:
            # The capacity as a solve sets it: started at 128, it comes down to 16.
            shrinking = seconds_per_event(model, loss, t0, 128, args.events, args.rtol, True)
            print("started at 128, shrinking", json.dumps(shrinking), flush=True)
    row = project(rates, shrinking, args)
    _fig2.report(row, args.out)


if __name__ == "__main__":
    main()
