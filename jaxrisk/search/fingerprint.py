"""A run's identity that is the same in every process: arrays by content, static configuration by value.

A checkpoint is only resumed by the run that wrote it. `repr` of a pytree's structure
holds memory addresses (`<function dot_general at 0x7f...>`), which differ between
processes, so the structure is walked instead: every leaf by its key path, dtype,
shape and bytes; every static (aux) value by its type and fields, functions by their
code and closure, classes by their qualified names. A value it cannot identify is an
error, never a guess.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_CALLABLES = (type, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


def fingerprint(*parts: Any) -> str:
    """Hex digest of `parts` (pytrees): equal across processes exactly when the runs are equal."""
    h = hashlib.sha256()
    for part in parts:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(part)
        _feed(h, treedef, set())
        for path, leaf in leaves:
            h.update(jax.tree_util.keystr(path).encode())
            _feed(h, leaf, set())
    return h.hexdigest()[:16]


def _name(x: Any) -> str:
    return f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', getattr(x, '__name__', type(x).__name__))}"


def _feed(h, x: Any, path: set[int]) -> None:
    """Write a canonical encoding of `x` into the hash `h` (`path`: ids being encoded, against cycles)."""
    tag = lambda s: h.update(s.encode() + b"\x00")  # noqa: E731
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
        return tag(f"{type(x).__name__}:{x!r}")
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(x)
        if a.dtype.hasobject:   # its bytes are pointers, different in every process
            raise TypeError(f"fingerprint: an array of Python objects (shape {a.shape}) has no stable identity")
        tag(f"array:{a.dtype}:{a.shape}")
        return h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))   # the bytes, without a copy
    if isinstance(x, np.dtype):
        return tag(f"dtype:{x}")
    if isinstance(x, enum.Enum):
        return tag(f"enum:{_name(type(x))}.{x.name}")
    if isinstance(x, types.CodeType):
        tag(f"code:{x.co_qualname if hasattr(x, 'co_qualname') else x.co_name}")
        h.update(x.co_code)
        return _feed(h, (x.co_consts, x.co_names), path)
    if isinstance(x, types.FunctionType):   # by its code and what it closes over: two lambdas differ
        tag(f"function:{_name(x)}")
        for part in (x.__code__, x.__defaults__, x.__kwdefaults__,
                     tuple(_contents(cell) for cell in x.__closure__ or ())):
            _feed(h, part, path | {id(x)})
        return
    if isinstance(x, _CALLABLES):
        return tag(f"callable:{_name(x)}")
    if id(x) in path:
        return tag("cycle")
    path = path | {id(x)}
    if isinstance(x, jax.tree_util.PyTreeDef):
        data = x.node_data()
        tag(f"treedef:{x.num_leaves}:{x.num_nodes}")
        if data is not None:
            _feed(h, data[0], path)
            _feed(h, data[1], path)
        for child in x.children():
            _feed(h, child, path)
        return
    if callable(getattr(x, "fingerprint", None)):   # an object that knows its own identity (e.g. a tokenizer wrapper)
        return tag(f"{_name(type(x))}:{x.fingerprint()}")
    if isinstance(x, functools.partial):
        tag("partial")
        for part in (x.func, x.args, x.keywords):
            _feed(h, part, path)
        return
    if isinstance(x, Mapping):
        tag(f"map:{_name(type(x))}:{len(x)}")
        for key, value in sorted(x.items(), key=lambda kv: _digest(kv[0])):
            _feed(h, key, path)
            _feed(h, value, path)
        return
    if isinstance(x, (list, tuple)):
        tag(f"seq:{_name(type(x))}:{len(x)}")
        for item in x:
            _feed(h, item, path)
        return
    if isinstance(x, (set, frozenset)):
        tag(f"set:{len(x)}")
        for d in sorted(_digest(item) for item in x):
            tag(d)
        return
    if dataclasses.is_dataclass(x):
        fields = [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
    elif hasattr(x, "__dict__") or hasattr(type(x), "__slots__"):
        names = list(getattr(x, "__dict__", {})) + [s for c in type(x).__mro__ for s in getattr(c, "__slots__", ())]
        fields = sorted(((n, getattr(x, n)) for n in dict.fromkeys(names)
                         if not n.startswith("__") and hasattr(x, n)), key=lambda nv: nv[0])
    else:   # guessing (by type name) could make two different runs look the same
        raise TypeError(f"fingerprint: cannot identify a {_name(type(x))} by value; give it a fingerprint() method")
    tag(f"object:{_name(type(x))}:{len(fields)}")
    for name, value in fields:
        tag(name)
        _feed(h, value, path)


def _contents(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:   # a closure cell not yet bound
        return "<empty cell>"


def _digest(x: Any) -> str:
    h = hashlib.sha256()
    _feed(h, x, set())
    return h.hexdigest()
