"""`flowsim sweep` and `flowsim report` (placeholder until the sweep module lands)."""


def add_parsers(sub) -> None:
    del sub
