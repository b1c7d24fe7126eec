"""`jaxrisk <command>`: the command line, one module per command; flags shared by several live in `common`."""

from __future__ import annotations

import argparse
import signal
import sys

from jaxrisk import __version__, preemption
from jaxrisk.cli import circuits, detect, fragility, models, plan, redteam, scan, zoo
from jaxrisk.errors import InputError
from jaxrisk.preemption import Terminated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrisk",
                                     description="jaxrisk finds hidden risks in neural networks by gradient descent.")
    parser.add_argument("--version", action="version", version=f"jaxrisk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (scan, zoo, models, redteam, circuits, fragility, detect, plan):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit codes: 0 done, 2 bad input (InputError or argparse), 130 Ctrl-C, 143 SIGTERM."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    if not getattr(args, "no_compile_cache", False):
        use_compile_cache()
    try:
        if hasattr(args, "coordinator"):   # a search command: join the other processes before touching a device
            from jaxrisk.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id)
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
        preemption.clear()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def use_compile_cache() -> None:
    """Keep XLA's compiled programs on disk, so that the next run of the same search loads them instead of
    compiling (a scan's three programs: about 20 s on a GPU). A directory the user gave JAX wins;
    JAXRISK_COMPILE_CACHE=0 turns it off for every command."""
    import os

    import jax

    from jaxrisk.io import cache_root

    if os.environ.get("JAXRISK_COMPILE_CACHE", "1") != "0" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:   # JAX's default is 1 s
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _terminated(signum, frame):
    """SIGTERM (a scheduler's preemption, `kill`): a running search stops after its next checkpoint;
    anything else stops at once, as Ctrl-C would."""
    if not preemption.request():
        raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
