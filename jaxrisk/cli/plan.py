"""`jaxrisk plan`: per-device memory of a GCG search on a mesh, and the widest search that fits, before renting it."""

from __future__ import annotations

import json
import os

from jaxrisk.cli.common import POSITIVE, comma_list, number
from jaxrisk.errors import InputError

NAMES = ("llama-3.2-1b", "llama-3-8b", "qwen2.5-7b")   # jaxrisk.models.named (not imported here: no JAX for --help)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory of a GCG search on a mesh (weights, lanes, candidates), and "
                                    "the widest search that fits; compiled ahead of time on simulated CPU devices")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="DIR", help="a Hugging Face model directory (only config.json is read)")
    which.add_argument("--config", choices=NAMES, help="a full-size configuration by name")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--devices", type=POSITIVE, required=True, help="devices of the mesh you plan for")
    p.add_argument("--fsdp", type=POSITIVE, default=1)
    p.add_argument("--tensor", type=POSITIVE, default=1)
    p.add_argument("--lanes", type=POSITIVE, default=8, help="lanes run at once (behaviours x restarts, or --lanes)")
    p.add_argument("--search-widths", type=comma_list(POSITIVE, "widths", "128,512"), default=[64, 128, 256, 512, 1024],
                   metavar="B,B,...", help="candidates per step to plan for")
    p.add_argument("--suffix-len", type=POSITIVE, default=20)
    p.add_argument("--topk", type=POSITIVE, default=256)
    p.add_argument("--prompt-len", type=POSITIVE, default=32, help="tokens before the suffix (template + goal)")
    p.add_argument("--target-len", type=POSITIVE, default=16)
    p.add_argument("--memory-gb", type=number(0.0, above=True), default=80.0,
                   help="memory of one device, GiB (default 80: an H100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    """Compile the GCG chunk ahead of time for each width on `--devices` simulated CPU devices and report."""
    # planning never runs the search: simulate the target's device count on this host's CPU
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from jaxrisk.models.hf import read_config
    from jaxrisk.models.named import named_config
    from jaxrisk.redteam.config import GCGConfig
    from jaxrisk.redteam.plan import GiB, widest_fitting
    from jaxrisk.search.config import RunConfig

    if len(jax.devices()) < args.devices:
        raise InputError(f"--devices {args.devices}: this process already started JAX with {len(jax.devices())} "
                         "devices; run `jaxrisk plan` in a fresh process")
    cfg = named_config(args.config) if args.config else read_config(__import__("pathlib").Path(args.model))[0]
    run = RunConfig(devices=args.devices, fsdp=args.fsdp, tensor=args.tensor)
    plans, widest = widest_fitting(cfg, int(args.memory_gb * GiB), widths=tuple(args.search_widths),
                                   dtype=args.dtype, run=run, gcg=GCGConfig(suffix_len=args.suffix_len, topk=args.topk),
                                   lanes=args.lanes, prompt_len=args.prompt_len, target_len=args.target_len)
    mesh = f"restarts {args.devices // (args.fsdp * args.tensor)} x fsdp {args.fsdp} x tensor {args.tensor}"
    if args.json:
        print(json.dumps({"model": args.config or args.model, "dtype": args.dtype, "mesh": mesh,
                          "memory_bytes": int(args.memory_gb * GiB), "widest_fitting": widest,
                          "plans": [p.as_dict() for p in plans]}))
        return 0
    print(f"{args.config or args.model} ({cfg.n_params() / 1e9:.2f}B parameters, {args.dtype}) on {mesh}, "
          f"{plans[0].lanes} lanes ({plans[0].lanes_per_device} per device); per device:")
    print(f"  {'width':>6} {'weights GiB':>11} {'lanes MiB':>9} {'candidates GiB':>14} {'total GiB':>9}  "
          f"fits {args.memory_gb:g} GiB")
    for p in plans:
        print(f"  {p.search_width:>6} {p.weights / GiB:>11.2f} {p.lane_state / 2**20:>9.2f} "
              f"{p.candidates / GiB:>14.2f} {p.total / GiB:>9.2f}  {'yes' if p.total <= args.memory_gb * GiB else 'no'}")
    print(f"widest search that fits: {widest if widest else 'none (add devices, --tensor or --fsdp, or fewer lanes)'}")
    return 0
