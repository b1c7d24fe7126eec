"""`jaxrisk <command>`: the command line, one module per command; flags shared by several live in `common`."""

from __future__ import annotations

import argparse
import signal
import sys

from jaxrisk import __version__
from jaxrisk.cli import circuits, detect, fragility, models, redteam, scan, zoo
from jaxrisk.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrisk",
                                     description="jaxrisk finds hidden risks in neural networks by gradient descent.")
    parser.add_argument("--version", action="version", version=f"jaxrisk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (scan, zoo, models, redteam, circuits, fragility, detect):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit codes: 0 done, 2 bad input (InputError or argparse), 130 Ctrl-C, 143 SIGTERM."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    try:
        return args.func(args)
    except InputError as e:
        print(f"jaxrisk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        out = getattr(args, "out", None)
        print(f"\njaxrisk: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; what finished is "
              f"saved{f' in {out}' if out else ''}: run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`), handled like Ctrl-C: stop between steps, keep checkpoints."""


def _terminated(signum, frame):
    raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
