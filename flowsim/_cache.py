"""XLA's persistent compilation cache: compiled programs kept on disk for later processes."""

import os
import pathlib
import warnings

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
