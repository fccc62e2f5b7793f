"""XLA's persistent compilation cache: compiled programs kept on disk for later processes."""

import contextlib
import os
import pathlib
import threading
import warnings

import equinox._errors as _eqx_errors
import jax

# Where the command line keeps compiled programs unless told otherwise.
CACHE_ENV = "FLOWSIM_COMPILATION_CACHE"


def default_cache_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/flowsim/jax`, `~/.cache/flowsim/jax` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "flowsim" / "jax"


def enable_compilation_cache(path=None) -> pathlib.Path | None:
    """Keeps compiled programs on disk (JAX's persistent compilation cache), so that a later
    process with the same shapes, solver and versions skips XLA's compilation.

    On 2 CPU cores the exact-kink event loop of a small network takes ~9 s to compile, of a
    ~15 s first call (`scripts/kinks_first_call.py`); from the cache the call takes the rest.
    `flowsim sweep` and `flowsim reproduce` call this at start.

    **Arguments:**

    - `path`: the cache directory. Default: `$FLOWSIM_COMPILATION_CACHE` if set (`off` turns
      the cache off), else `default_cache_dir()`.

    **Returns** the directory in use, or None when the cache stays off (a default directory
    that cannot be created: with a warning; a directory given that cannot: `ValueError`). A
    directory JAX was already given (`JAX_COMPILATION_CACHE_DIR`,
    `jax.config.jax_compilation_cache_dir`) is kept, not replaced.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return pathlib.Path(current)
    default = path is None and not os.environ.get(CACHE_ENV)
    if path is None:
        path = os.environ.get(CACHE_ENV) or default_cache_dir()
    if str(path).strip().lower() in ("off", "0", "none", ""):
        return None
    path = pathlib.Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = (f"compilation cache: cannot create {str(path)!r} ({e.strerror}); set "
               f"{CACHE_ENV} to a writable directory or to 'off'")
        if default:  # the default place is a convenience: go on without it
            warnings.warn(msg + "; compiling without it", stacklevel=2)
            return None
        raise ValueError(msg) from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


# diffrax's run-time checks of a solve's arguments (`diffeqsolve`: dt0's sign, the save
# times' order and range), by the start of their messages.
_PROVEN = ("Must have (t1 - t0) * dt0 >= 0", "saveat.ts must be increasing or decreasing.",
           "saveat.ts must lie between t0 and t1.")
_SKIP = {"depth": 0, "original": None}
_SKIP_LOCK = threading.Lock()


@contextlib.contextmanager
def proven_solve_checks():
    """Within it, `diffeqsolve`'s checks of its arguments are not traced: for solves whose
    arguments are valid by construction (dt0 >= 0 towards t1 >= t0; save times
    non-decreasing within [t0, t1]).

    With traced arguments each check is an `equinox.error_if`, a host callback, and JAX's
    persistent compilation cache stores no program with one: the exact-kink event loop and
    the smooth solve (their times are traced) could not be cached. Only those three checks,
    recognised by their messages, are skipped; every other `error_if` is traced as before
    (equinox's own setting untouched, so nothing cached elsewhere changes). Where equinox or
    diffrax name them otherwise nothing is skipped and only the caching is lost."""
    if not callable(getattr(_eqx_errors, "branched_error_if_impl_jit", None)):
        yield
        return
    with _SKIP_LOCK:
        if _SKIP["depth"] == 0:
            original = _SKIP["original"] = _eqx_errors.branched_error_if_impl_jit

            def checked(x, pred, index, msgs, *args, **kwargs):
                if len(msgs) == 1 and str(msgs[0]).startswith(_PROVEN):
                    return x
                return original(x, pred, index, msgs, *args, **kwargs)

            _eqx_errors.branched_error_if_impl_jit = checked
        _SKIP["depth"] += 1
    try:
        yield
    finally:
        with _SKIP_LOCK:
            _SKIP["depth"] -= 1
            if _SKIP["depth"] == 0:
                _eqx_errors.branched_error_if_impl_jit = _SKIP["original"]
