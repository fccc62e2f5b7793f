"""The `flowsim` command line: a thin layer over the public API.

Subcommands live in their own modules; each provides `add_parser(subparsers)` and a handler
`run(args) -> int`. User mistakes print one line and exit with status 2, never a traceback.
"""

import argparse
import sys

from . import __version__
from ._errors import UsageError as UsageError


def _parser() -> argparse.ArgumentParser:
    from . import _reproduce_cli, _sweep_cli

    parser = argparse.ArgumentParser(
        prog="flowsim",
        description="High-precision gradient flow and gradient descent on homogeneous networks.",
    )
    parser.add_argument("--version", action="version", version=f"flowsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _sweep_cli.add_parsers(sub)
    _reproduce_cli.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("sweep", "reproduce"):
            _compilation_cache()
        return int(args.handler(args) or 0)
    except UsageError as e:
        print(f"flowsim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowsim {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stdout = None
        return 141


def _compilation_cache() -> None:
    """Compiled programs kept on disk for the next run (`flowsim.enable_compilation_cache`:
    `$FLOWSIM_COMPILATION_CACHE`, `off` to turn it off)."""
    from ._cache import enable_compilation_cache

    try:
        enable_compilation_cache()
    except ValueError as e:
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
