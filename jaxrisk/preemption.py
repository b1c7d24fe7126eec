"""Preemption: SIGTERM (what a TPU or cloud preemption and `kill` send) stops a search at its next chunk
boundary, after that chunk's checkpoint is written, so the interrupted run loses no finished chunk.

The command line's SIGTERM handler calls `request()`: while an engine search runs it only records the
request and the engine raises `Terminated` after its next checkpoint; outside a search (loading a model,
training a zoo, writing a report) it returns False and the handler raises at once, as Ctrl-C would.
"""

from __future__ import annotations

import contextlib
import sys
import threading

_requested = threading.Event()
_searching = 0


class Terminated(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM): handled like Ctrl-C, with what finished kept."""


def request() -> bool:
    """Ask the running search to stop after its next checkpoint; False when no search is running."""
    if not _searching:
        return False
    _requested.set()
    return True


@contextlib.contextmanager
def searching():
    """Marks an engine search as running (the engine wraps its chunk loop in this)."""
    global _searching
    _searching += 1
    try:
        yield
    finally:
        _searching -= 1


def clear() -> None:
    """Forget a request no search acted on (the command ended first)."""
    _requested.clear()


def stop_if_requested(step: int) -> None:
    """Raise `Terminated` if a stop was requested (the engine calls this after each chunk's checkpoint, `step`
    counting its chunks). In a multi-process job JAX's runtime catches SIGTERM itself and every process must
    stop at the same chunk (else the others wait forever in a collective): its preemption sync point says when."""
    if _requested.is_set():
        _requested.clear()
        raise Terminated()
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            raise Terminated()
