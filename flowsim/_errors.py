"""The command line's error type, in a module of its own so that every subcommand can raise it
without importing `flowsim.cli` (which imports the subcommands)."""


class UsageError(Exception):
    """A mistake in the command line or a config file: printed as one line, exit status 2."""
