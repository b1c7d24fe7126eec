"""GCG with early stop: lanes that finish idle until their group's slowest lane stops, unless a work queue hands
them the next behaviour. Four ways to run the same 32 behaviours on 8 lanes, in one process:

* fixed budget: early stop off, groups of 8 (the raw candidate rate every lane keeps busy);
* waves (jaxrisk before the queue): early stop on, groups of 8, each group as long as its slowest behaviour;
* queue: early stop on, one group of 32 on 8 lanes (`--group 32 --lanes 8`): between chunks a finished lane
  takes the next behaviour;
* queue + shrinking tail (jaxrisk's default): the same, and once no behaviour waits the last ones move onto
  fewer lanes when that saves more than the smaller chunk's compile (`RunConfig.shrink_lanes`).

Counted rate = candidates whose loss was computed by a live lane, over the wall time. Each configuration runs
twice and the second run is timed, so no figure includes compilation.

    python benchmarks/gcg_queue.py --out runs/bench_gcg_queue.json
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import jax

from jaxrisk.data.prompts import Behavior
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.redteam import PLAIN_GCG, GCGConfig
from jaxrisk.redteam.gcg_run import run_group
from jaxrisk.search import RunConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"
GOALS = ["Lily saw a", "Tom went to the", "The dog said", "Mom gave Ben a", "Once upon a time, there was a",
         "The little bird", "Sue and Tim ate", "The sun was"]
TARGETS = ["big snake", "dragon", "no", "red car"]
BEHAVIORS = [Behavior(g, t, i + 1) for i, (t, g) in enumerate(itertools.product(TARGETS, GOALS))]   # 32


def timed(lm, behaviors, cfg: GCGConfig, run_cfg: RunConfig, group: int) -> dict:
    t = time.perf_counter()
    rows = []
    for g in range(0, len(behaviors), group):
        rows += run_group(lm, behaviors[g:g + group], cfg, run_cfg.replace(seed=run_cfg.seed + g))
    wall = time.perf_counter() - t
    candidates = sum(r["candidates_evaluated"] for r in rows)
    return {"behaviours": len(rows), "successes": sum(r["success"] for r in rows), "wall_seconds": round(wall, 2),
            "candidates": candidates, "candidates_per_second": round(candidates / wall, 1),
            "steps": sum(r["steps"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--search-width", type=int, default=128)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--suffix-len", type=int, default=10)
    p.add_argument("--chunk", type=int, default=5, help="steps per chunk: a finished lane waits at most this long")
    p.add_argument("--out", default="runs/bench_gcg_queue.json")
    args = p.parse_args()
    lm = load_pretrained(args.model)
    cfg = GCGConfig(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len, **PLAIN_GCG)
    run_cfg = RunConfig(max_steps=args.steps, chunk_steps=args.chunk, progress=False, devices=1)
    fixed = GCGConfig(**{**cfg.__dict__, "early_stop": False})
    kept = run_cfg.replace(shrink_lanes=False)
    setups = {"fixed budget (early stop off, groups of 8)": (fixed, kept, 8),
              "waves (early stop, groups of 8, 8 lanes throughout)": (cfg, kept, 8),
              "queue (early stop, 32 behaviours on 8 lanes throughout)": (cfg, kept.replace(lanes=8), 32),
              "queue + shrinking tail (the default)": (cfg, run_cfg.replace(lanes=8), 32)}
    results = {}
    for name, (c, r, group) in setups.items():
        timed(lm, BEHAVIORS, c, r, group)   # compiles every group's shapes: untimed
        results[name] = timed(lm, BEHAVIORS, c, r, group)
        print(name, results[name], flush=True)
    fixed = results["fixed budget (early stop off, groups of 8)"]["candidates_per_second"]
    for row in results.values():
        row["rate_vs_fixed_budget"] = round(row["candidates_per_second"] / fixed, 3)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}",
              "model": args.model, "steps": args.steps, "search_width": args.search_width, "topk": args.topk,
              "suffix_len": args.suffix_len, "chunk_steps": args.chunk, "results": results}
    write_json(args.out, record)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
