"""What the commands share: flag types checked by the library's own range checks, the run and model flags
(defined once), and the one mapping of the run flags to a `RunConfig`."""

from __future__ import annotations

import argparse

from jaxrisk.errors import InputError, require_int, require_number, require_seed


def _flag_type(convert, check, what: str):
    """argparse type: `convert` the text, then `check` the value with the library's own range checks
    (errors.require_*); argparse reports either failure as `argument --flag: ...` with exit code 2."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check(value)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return parse


def int_at_least(minimum: int):
    return _flag_type(int, lambda v: require_int("flag", v, minimum), "an integer")


def number(minimum: float | None = None, above: bool = False):
    return _flag_type(float, lambda v: require_number("flag", v, minimum, above=above), "a number")


def penalty_list(text: str) -> list[float]:
    """argparse type: comma-separated sparsity weights, each a finite number >= 0."""
    parse = number(0.0)
    values = [parse(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 3,4.5,6; got {text!r}")
    return values


def comma_list(convert, what: str, example: str):
    """argparse type: a comma-separated list, each item parsed by `convert` (an argparse type)."""
    def parse(text: str):
        values = [convert(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, e.g. {example}; got {text!r}")
        return values
    return parse


POSITIVE = int_at_least(1)
SEED = _flag_type(int, lambda v: require_seed("flag", v), "an integer")


def add_seed_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_run_flags(p: argparse.ArgumentParser, *, restarts_help: str, steps_help: str | None = None,
                  restarts_default: int | None = None, max_steps_default: int | None = None,
                  steps_alias: bool = False) -> None:
    """--seed --devices --restarts --max-steps --no-progress: the fields of `RunConfig` a user sets. A default
    of None leaves the field to the command's library config. `steps_alias`: `--steps`, with `--max-steps`
    accepted as the same flag."""
    add_seed_flag(p)
    mesh = p.add_argument_group("devices and hosts (one mesh: restarts x fsdp x tensor)")
    mesh.add_argument("--devices", type=POSITIVE, default=None,
                      help="devices of the mesh (default: every device of every host)")
    mesh.add_argument("--fsdp", type=POSITIVE, default=None,
                      help="mesh axis splitting each weight's model dimension (default 1)")
    mesh.add_argument("--tensor", type=POSITIVE, default=None,
                      help="mesh axis splitting heads and hidden units (default 1); lanes run over devices / (fsdp x "
                           "tensor)")
    mesh.add_argument("--lanes", type=POSITIVE, default=None,
                      help="search items run at once (default: all); fewer make a work queue: a lane that finishes "
                           "takes the next item between chunks")
    mesh.add_argument("--coordinator", metavar="HOST:PORT",
                      help="multi-process run: address of process 0 (not needed on a TPU pod, SLURM or a JobSet)")
    mesh.add_argument("--num-processes", type=POSITIVE, metavar="N", help="multi-process run: number of processes")
    mesh.add_argument("--process-id", type=int_at_least(0), metavar="I", help="multi-process run: this process, 0..N-1")
    p.add_argument("--restarts", type=POSITIVE, default=restarts_default, help=restarts_help)
    names = ("--steps", "--max-steps") if steps_alias else ("--max-steps",)
    p.add_argument(*names, dest="max_steps", type=POSITIVE, default=max_steps_default,
                   metavar="STEPS" if steps_alias else None, help=steps_help)
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs for the next run (default: kept in $JAXRISK_CACHE/xla, "
                        "~/.cache/jaxrisk/xla, unless JAX_COMPILATION_CACHE_DIR names another place)")
    add_progress_flag(p)


def run_config(args: argparse.Namespace, base=None, **defaults):
    """The run flags as a `RunConfig`: a flag given wins over `defaults` (RunConfig fields the command
    chooses, e.g. checkpoint_dir), which win over `base` (the command's library default; else RunConfig())."""
    from jaxrisk.search.config import RunConfig

    flags = {"seed": args.seed, "devices": args.devices, "restarts": args.restarts, "max_steps": args.max_steps,
             "fsdp": args.fsdp, "tensor": args.tensor, "lanes": args.lanes}
    given = {name: value for name, value in flags.items() if value is not None}
    return (base or RunConfig()).replace(**{**defaults, **given}, progress=not args.no_progress)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="local Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="parameter dtype (default: as the checkpoint declares)")


def dtype(args: argparse.Namespace) -> str | None:
    return None if args.dtype == "auto" else args.dtype


def load_lm(args: argparse.Namespace, run=None):
    """`--model` at `--dtype`; with model axes in the run's mesh (`--fsdp` / `--tensor`), each weight is placed on
    that mesh by the partition table and stays there while it is searched."""
    from jaxrisk.models import load_pretrained

    mesh = run.mesh() if run is not None and run.fsdp * run.tensor > 1 else None
    return load_pretrained(args.model, dtype=dtype(args), mesh=mesh)
