"""`flowsim reproduce NAME`: the seed papers' figures and claims (thin wrapper over
`flowsim.reproduce`)."""

from ._errors import UsageError


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="reproduce a seed paper's figure or theorem, with a pass/fail verdict per claim",
        description="Run one reproduction: PNG figures and summary.json (measured numbers, a "
                    "verdict per claim with its threshold) are written to OUT, and a table is "
                    "printed. Exit status 1 if a claim fails.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="the reproduction (see --list)")
    p.add_argument("--list", action="store_true", help="list the reproductions and exit")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: reproductions/NAME for a full run, "
                        "runs/reproduce/NAME with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a reduced size that runs in seconds (the tests use it)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="number of random initialisations (default: per reproduction)")
    p.set_defaults(handler=_reproduce)


def _reproduce(args) -> int:
    from . import reproduce

    if args.list:
        width = max(map(len, reproduce.names()))
        for name, exp in reproduce.EXPERIMENTS.items():
            print(f"{name:<{width}}  {exp.title}  [{exp.reference}]")
        return 0
    if args.name is None:
        raise UsageError("give a reproduction NAME or --list; names: "
                         + ", ".join(reproduce.names()))
    if args.name not in reproduce.EXPERIMENTS:
        raise UsageError(f"unknown reproduction {args.name!r}; choose one of "
                         + ", ".join(reproduce.names()))
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds = {args.seeds}: must be a positive integer")
    report = reproduce.run(args.name, args.out, quick=args.quick, seeds=args.seeds)
    print(report.table())
    return 0 if report.passed else 1
