"""Preemption: SIGTERM (what a TPU or cloud preemption and `kill` send) stops a search at its next chunk
boundary, after that chunk's checkpoint is written, so the interrupted run loses no finished chunk.

The command line's SIGTERM handler calls `request()`: while an engine search runs it only records the
request and the engine raises `Terminated` after its next checkpoint; outside a search (loading a model,
training a zoo, writing a report) it returns False and the handler raises at once, as Ctrl-C would.
"""

from __future__ import annotations

import contextlib
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


def stop_if_requested() -> None:
    """Raise `Terminated` if a stop was requested (the engine calls this after each chunk's checkpoint)."""
    if _requested.is_set():
        _requested.clear()
        raise Terminated()
