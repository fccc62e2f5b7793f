"""The user's own problems: a factory named `"package.module:function"`."""

import importlib
import inspect
from collections.abc import Callable

from ._base import AbstractProblem


def is_factory_name(kind: str) -> bool:
    """True for `"package.module:function"` (a user factory), False for a family name."""
    return ":" in kind


def load_factory(name: str) -> Callable[..., AbstractProblem]:
    """Imports `"package.module:function"` and returns the function.

    **Raises:** `ValueError` with one line naming what could not be found and how to fix it.
    """
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"{name!r}: a problem factory is named 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{name!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); install "
            f"its package or add its directory to PYTHONPATH"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{name!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{name!r}: {attr!r} is not callable; name a function that returns a "
                         f"flowsim.problems.AbstractProblem")
    return obj


def check_arguments(name: str, factory: Callable, kwargs: dict) -> None:
    """ValueError (one line) if `factory(**kwargs)` cannot bind: an unknown or missing key."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"{name!r} cannot take these [problem] keys: {e}") from None
    except ValueError:  # no signature (a builtin): let the call decide
        return


def build(name: str, kwargs: dict) -> AbstractProblem:
    """Calls the factory `name` with `kwargs` and checks that it returned a problem."""
    factory = load_factory(name)
    check_arguments(name, factory, kwargs)
    problem = factory(**kwargs)
    if not isinstance(problem, AbstractProblem):
        raise ValueError(
            f"{name!r} returned a {type(problem).__name__}, not a "
            f"flowsim.problems.AbstractProblem; subclass it (fields: loss; method: init(key))"
        )
    return problem
