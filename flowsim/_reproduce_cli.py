"""`flowsim reproduce` (placeholder until the reproductions land)."""


def add_parsers(sub) -> None:
    del sub
