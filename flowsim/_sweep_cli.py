"""`flowsim sweep CONFIG.toml` and `flowsim report DIR`: thin wrappers over `flowsim.sweep`."""

import os
import sys

from ._errors import UsageError


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of GD / gradient-flow experiments from a TOML config",
        description="Run every grid point of CONFIG (list-valued fields are sweep axes), seeds "
        "batched and sharded over all devices. Each finished point is written "
        "atomically to OUT; rerunning skips finished points.",
    )
    p.add_argument("config", metavar="CONFIG.toml")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/<config name>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an existing run in OUT (a plain rerun also skips finished points)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate the config and list the grid; run nothing"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar: one plain line per finished point (for logs)",
    )
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="shard seeds over N local devices (default: [run].devices, all)",
    )
    p.add_argument(
        "--max-points",
        type=int,
        metavar="N",
        help="stop after N points (the rest stay for a later run)",
    )
    p.add_argument("--report", action="store_true", help="write the report when done")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="check the config end to end in seconds: 2 seeds, at most 20 GD steps and 11 "
        "flow saves, into OUT (default runs/<config name>-smoke)",
    )
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize: seeds are split over processes/hosts; "
        "coordinator from the flags below or JAX's environment/cluster detection",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT")
    g.add_argument("--num-processes", type=int, metavar="N")
    g.add_argument("--process-id", type=int, metavar="I")
    p.set_defaults(handler=_sweep)

    r = sub.add_parser(
        "report",
        help="figures and a table of headline numbers from a sweep directory",
        description="Write drift.png, discretization.png, loss.png, problem.png (the problem "
        "family's own quantities), summary.md and summary.csv to DIR/report/.",
    )
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--dest", metavar="DIR", help="write here instead of DIR/report")
    r.set_defaults(handler=_report)


def _distributed(args) -> None:
    import jax

    kwargs = {}
    if args.coordinator:
        kwargs["coordinator_address"] = args.coordinator
    if args.num_processes is not None:
        kwargs["num_processes"] = args.num_processes
    if args.process_id is not None:
        kwargs["process_id"] = args.process_id
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:
        pass
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--distributed: {str(e).splitlines()[0]}") from None


def _sweep(args) -> int:
    from . import sweep

    for name in ("devices", "max_points"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} = {v}: must be a positive integer")
    try:
        if args.distributed:
            _distributed(args)
        res = sweep.run(
            args.config,
            args.out,
            resume=args.resume,
            dry_run=args.dry_run,
            quiet=args.quiet,
            devices=args.devices,
            max_points=args.max_points,
            smoke=args.smoke,
        )
        if args.report and not args.dry_run:
            import jax

            if jax.process_index() == 0:
                paths = sweep.report(res.out)
                print(f"report: {paths[0].parent}{os.sep}", file=sys.stderr)
    except sweep.ConfigError as e:
        raise UsageError(str(e)) from None
    return 0


def _report(args) -> int:
    from . import sweep

    try:
        paths = sweep.report(args.dir, dest=args.dest)
    except sweep.ConfigError as e:
        raise UsageError(str(e)) from None
    for path in paths:
        print(path)
    return 0
