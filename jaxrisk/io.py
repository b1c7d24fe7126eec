"""Atomic result writing (a reader never sees a half-written file) and jaxrisk's cache directory."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from jaxrisk.errors import InputError


def cache_root() -> Path:
    """Where jaxrisk keeps what it can rebuild (demo models, activations, compiled programs):
    `$JAXRISK_CACHE`, default `~/.cache/jaxrisk`."""
    return Path(os.environ.get("JAXRISK_CACHE", Path.home() / ".cache" / "jaxrisk"))


def is_writer() -> bool:
    """Whether this process writes results, reports and checkpoint markers: always in a single-process run;
    in a multi-process job (`jaxrisk.distributed`) process 0 only."""
    jax = sys.modules.get("jax")   # never imported just to ask (`jaxrisk --help` stays free of JAX)
    return jax is None or jax.process_index() == 0


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it into place. In a multi-process
    job only process 0 writes (every process computes the same results): the others return at once."""
    path = Path(path)
    if not is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private to their writer
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def prepare_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output directory (if needed) and prove it writable, before any slow work starts."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    return out


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (see `strict_json`), written atomically."""
    text = json_text(obj, indent=2)
    return atomic_write(path, lambda f: f.write(text))


def json_text(obj: Any, indent: int | None = None) -> str:
    """`obj` as strict JSON: a value that is NaN or infinite becomes null, and a top-level object says which
    and why under "not_finite" (JSON has no NaN; readers other than Python's reject it)."""
    clean, replaced = strict_json(obj)
    if replaced and isinstance(clean, dict):
        clean["not_finite"] = replaced
    return json.dumps(clean, indent=indent, allow_nan=False)


def strict_json(obj: Any, where: str = "") -> tuple[Any, dict[str, str]]:
    """(obj with numpy values as Python ones and non-finite floats as None, {JSON path: 'nan' | 'inf' | '-inf'})."""
    import numpy as np

    replaced: dict[str, str] = {}

    def walk(x, at):
        if isinstance(x, np.ndarray):
            x = x.tolist()
        elif isinstance(x, np.generic):
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            replaced[at or "$"] = repr(x)
            return None
        if isinstance(x, dict):
            return {str(k): walk(v, f"{at}.{k}" if at else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"not JSON serialisable: {type(x).__name__} at {at or '$'}")

    return walk(obj, where), replaced
