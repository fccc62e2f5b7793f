"""Cheap calls for small solves: a compiled function called with its array leaves only, and a
memo of what is known about immutable arrays.

A 2 x 2 factorization's whole Tsit5 solve runs in ~0.1 ms, so the Python around it is most of
a call. `eqx.filter_jit` binds arguments with `inspect.Signature` and partitions inputs and
outputs on every call (~0.05 ms here); `bind` flattens once and hands `jax.jit` the
arrays. `Memo` keeps facts about JAX arrays (finite, the auto solver's choice): they are
immutable, so a fact about one array object holds for as long as that object lives.
"""

import functools
import weakref
from collections import OrderedDict

import equinox as eqx
import jax

_DYNAMIC = object()  # marks where an array leaf goes back in


class _Static:
    """A hashable stand-in for the non-array part of a call's arguments."""

    __slots__ = ("_hash", "leaves", "treedef")

    def __init__(self, treedef, leaves):
        self.treedef, self.leaves = treedef, leaves
        self._hash = hash((treedef, leaves))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Static) and self.treedef == other.treedef and \
            self.leaves == other.leaves


@functools.lru_cache(maxsize=256)
def _compiled(fn, static: _Static):
    def run(*arrays):
        it = iter(arrays)
        leaves = [next(it) if x is _DYNAMIC else x for x in static.leaves]
        return fn(*jax.tree.unflatten(static.treedef, leaves))

    run.__name__ = run.__qualname__ = fn.__name__  # compile counters see `jit(<fn>)`
    return jax.jit(run)


def bind(fn, *args):
    """A no-argument call of `eqx.filter_jit(fn)(*args)`: array leaves traced, every other leaf
    static (hashed), the outputs arrays (or None). Flattens `args` now, once; falls back to
    `eqx.filter_jit` when a static leaf is not hashable."""
    leaves, treedef = jax.tree.flatten(args)
    arrays = [x for x in leaves if eqx.is_array(x)]
    static = tuple(_DYNAMIC if eqx.is_array(x) else x for x in leaves)
    try:
        compiled = _compiled(fn, _Static(treedef, static))
    except TypeError:
        return functools.partial(eqx.filter_jit(fn), *args)
    return functools.partial(compiled, *arrays)



class Memo:
    """Facts about tuples of objects, kept while every object lives (weak references; a fact
    is dropped when one of its objects dies).

    `get(objs, extra)` returns the fact stored for exactly these objects (by identity) and an
    `extra` hashable key (by value), or None.
    Use it only for immutable objects (JAX arrays, Equinox modules holding them): a fact about
    a NumPy array would outlive an in-place change of it.
    """

    def __init__(self, maxsize: int = 256):
        self._facts: OrderedDict = OrderedDict()
        self._maxsize = maxsize

    def get(self, objs: tuple, extra=()):
        hit = self._facts.get((tuple(map(id, objs)), extra))
        if hit is None:
            return None
        refs, fact = hit
        if all(r() is o for r, o in zip(refs, objs)):
            return fact
        return None

    def put(self, objs: tuple, fact, extra=()) -> None:
        key = (tuple(map(id, objs)), extra)
        forget = lambda _, facts=self._facts: facts.pop(key, None)  # noqa: E731
        try:
            refs = tuple(weakref.ref(o, forget) for o in objs)
        except TypeError:  # not weakly referable: not remembered
            return
        self._facts[key] = (refs, fact)
        if len(self._facts) > self._maxsize:
            self._facts.popitem(last=False)


def is_immutable_array(x) -> bool:
    """A JAX array (concrete): its values cannot change while the object lives."""
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
