"""Where an exact-kink event's time goes: the compiled event loop's operations, profiled and
grouped by the part of the loop they come from.

Problem: one member of `benchmarks/kinks_batch.py` (the quickstart network, 10 -> 20 -> 20 -> 3
ReLU, 64 points, T = 2, Tsit5 at tol 1e-8), solved once to compile and once under
`jax.profiler.trace`. On the CPU the loop is a chain of small XLA operations (thunks), each a
microsecond or less, so their count per event is what the loop costs. Each operation is traced
back to its source through the compiled module's stack frames (dumped with `--xla_dump_to`)
and counted under the first matching part:

- `field: sliding slopes` / `field: plain`: the vector field, with the Filippov slopes solved
  in it (`sliding.solve_slopes`) or without;
- `release condition`, `crossing condition`: the event functions diffrax evaluates at every
  step end and in the root find;
- `event: hits`, `event: slopes`, `event: other`: handling an event (one-sided rates of the
  entries hit, the next piece's slopes and their Jacobian, releases and records);
- `piece: end` (pre-activations and slopes at the piece's end), `after piece` (saves,
  counters);
- `diffrax`: operations of the solve with no flowsim frame (stepping, dense output, step-size
  control, the root finder's loop); `no source`: copies and glue XLA inserted.

Run it in a fresh process (it sets XLA_FLAGS before JAX starts):

    python scripts/kinks_profile.py [--member 4] [--capacity 8] [--out F.json]

The parsing reads the text of XLA's dumps (jax 0.10); other versions may name things otherwise.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

PARTS = (
    ("field: sliding slopes", ("_vector_field",), ("solve_slopes",)),
    ("field: plain", ("_vector_field",), ()),
    ("release condition", ("_release_cond",), ()),
    ("crossing condition", ("_crossing_cond",), ()),
    ("event: hits", ("_hits",), ()),
    ("event: slopes", ("_settle_slopes",), ()),
    ("event: other", ("_handle_event",), ()),
    ("piece: end", ("_piece",), ()),
    ("after piece", ("_after_piece",), ()),
)


def _frames(text):
    """op name -> tuple of (file, function) frames, outermost first, from an HLO dump."""
    tables, section = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {},
                       "StackFrames": {}}, None
    for line in text.split("\n"):
        if line in tables:
            section = line
            continue
        if section is None:
            continue
        m = re.match(r"(\d+) (.*)", line)
        if not m:
            if section == "StackFrames" and tables["StackFrames"]:
                break
            continue
        value = m.group(2)
        tables[section][int(m.group(1))] = (
            value.strip('"') if section in ("FileNames", "FunctionNames")
            else {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", value)})

    def chain(frame):
        out = []
        while frame > 0 and frame in tables["StackFrames"]:
            fr = tables["StackFrames"][frame]
            loc = tables["FileLocations"][fr["file_location_id"]]
            out.append((tables["FileNames"][loc["file_name_id"]],
                        tables["FunctionNames"][loc["function_name_id"]].split(".")[-1]))
            frame = fr.get("parent_frame_id", 0) - 1
        return tuple(reversed(out))

    ops = dict(re.findall(r"%([\w.\-]+) = .*?stack_frame_id=(\d+)", text))
    return {op: chain(int(f)) for op, f in ops.items()}


def _part(chain):
    names = [fn for file, fn in chain if "/flowsim/" in file]
    inside = names[names.index("loop") + 1:] if "loop" in names else names
    in_solve = "diffeqsolve" in [fn for _, fn in chain]
    for label, anchors, needs in PARTS:
        if label.startswith(("piece", "after")) and in_solve:
            return "diffrax"
        if any(a in inside for a in anchors) and \
                all(any(n in name for name in inside) for n in needs):
            return label
    if in_solve:
        return "diffrax"
    return "other" if chain else "no source"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--member", type=int, default=4, help="member of the batch (default 4)")
    p.add_argument("--capacity", type=int, default=8,
                   help="first sliding capacity (default 8: one compiled program)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parents[1]
                   / "benchmarks" / "results" / "kinks_event_profile.json")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="kinks_profile_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={work}/hlo"
                               " --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"
                               " --xla_dump_hlo_module_re=jit_run")
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import jax

    jax.config.update("jax_enable_x64", True)
    import kinks_batch

    import flowsim

    nets, loss = kinks_batch.make(args.member + 1)
    net = kinks_batch.member(nets, args.member)
    kinks = flowsim.ExactKinks(capacity=args.capacity)

    def solve():
        traj = kinks_batch.flow(net, loss, kinks, batched=False)
        jax.block_until_ready(traj.loss)
        return traj

    solve()
    tic = time.perf_counter()
    traj = solve()
    wall = time.perf_counter() - tic
    with jax.profiler.trace(f"{work}/trace", create_perfetto_trace=True):
        solve()
    dumps = sorted(glob.glob(f"{work}/hlo/*jit_run.cpu_after_optimizations.txt"))
    if len(dumps) != 1:
        raise SystemExit(f"expected one compiled loop, found {len(dumps)}: pass --capacity "
                         f"at least the largest sliding set")
    frames = _frames(pathlib.Path(dumps[0]).read_text())
    trace = glob.glob(f"{work}/trace/plugins/profile/*/perfetto_trace.json.gz")[0]
    count, micros = collections.Counter(), collections.Counter()
    for e in json.load(gzip.open(trace))["traceEvents"]:
        a = e.get("args") or {}
        if e.get("ph") != "X" or a.get("hlo_module") != "jit_run" or \
                e["name"].startswith(("while", "cond", "end:")):
            continue
        part = _part(frames.get(a["hlo_op"], ()))
        count[part] += 1
        micros[part] += e.get("dur", 0.0)
    events = int(traj.stats["num_events"])
    total_n, total_us = sum(count.values()), sum(micros.values())
    rows = [{"part": k, "operations_per_event": count[k] / events,
             "share_of_operation_time": micros[k] / total_us} for k, _ in count.most_common()]
    print(f"member {args.member}: {events} events, {int(traj.stats['num_steps'])} steps, "
          f"sliding at most {int(traj.stats['num_sliding_max'])}; {wall * 1e3:.0f} ms "
          f"({wall / events * 1e3:.2f} ms per event), {total_n / events:.0f} operations per "
          f"event")
    print("| part | operations per event | share of their time |\n|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['operations_per_event']:.0f} | "
              f"{100 * r['share_of_operation_time']:.0f} % |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "problem": "quickstart member (10-20-20-3 ReLU, 64 points, T=2, Tsit5 tol 1e-8)",
        "member": args.member, "capacity": args.capacity, "events": events,
        "steps": int(traj.stats["num_steps"]),
        "sliding_max": int(traj.stats["num_sliding_max"]), "wall_s": wall,
        "operations_per_event": total_n / events, "parts": rows,
        "jax": jax.__version__, "cpu_count": os.cpu_count()}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
