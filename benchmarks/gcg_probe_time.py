"""What probe sampling saves in wall time: plain GCG scoring B candidates with the model every step, against
probe sampling (the model's first L layers rank 2B candidates, the model scores a random 2B/16 and the draft's
best 2B/R), at a fixed number of steps (early stop off), the story targets of benchmarks/data as lanes of one
program. Each configuration runs twice in this process and the second run is timed, so no figure includes
compilation; the ratio is per step, side by side on the same machine.

    python benchmarks/gcg_probe_time.py --out runs/bench_gcg_probe_time.json
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import jax

from jaxrisk.data.prompts import load_behaviors
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.redteam import PLAIN_GCG, GCGConfig
from jaxrisk.redteam.gcg_run import run_group
from jaxrisk.search import RunConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"
BEHAVIOURS = ROOT / "benchmarks" / "data" / "story_targets.jsonl"


def timed(lm, behaviours, cfg: GCGConfig, steps: int) -> dict:
    """Seconds per step of the second of two identical runs, and the candidates the model scored per step."""
    run_cfg = RunConfig(max_steps=steps, chunk_steps=steps, progress=False)
    run_group(lm, behaviours, cfg, run_cfg)                      # compiles
    t = time.perf_counter()
    rows = run_group(lm, behaviours, cfg, run_cfg)
    seconds = time.perf_counter() - t
    return {"seconds_per_step": seconds / steps,
            "model_evaluations_per_step": sum(r["candidates_evaluated"] for r in rows) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--behaviours", default=str(BEHAVIOURS))
    p.add_argument("--lanes", type=int, default=8, help="behaviours of the file searched at once")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--search-width", type=int, default=128, help="B: plain GCG's candidates per step")
    p.add_argument("--suffix-len", type=int, default=40)
    p.add_argument("--probe-layers", type=int, default=1)
    p.add_argument("--probe-ratio", type=int, default=8)
    p.add_argument("--out", default="runs/bench_gcg_probe_time.json")
    args = p.parse_args()

    lm = load_pretrained(args.model, dtype="float32")
    behaviours = load_behaviors(args.behaviours)[:args.lanes]
    plain = GCGConfig(search_width=args.search_width, topk=128, suffix_len=args.suffix_len, early_stop=False,
                      **PLAIN_GCG)
    probe = dataclasses.replace(plain, search_width=2 * args.search_width, probe_layers=args.probe_layers,
                                probe_ratio=args.probe_ratio)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "jax_device": str(jax.devices()[0]), "lanes": len(behaviours), "steps": args.steps,
              "plain": timed(lm, behaviours, plain, args.steps), "probe": timed(lm, behaviours, probe, args.steps)}
    record["probe"]["draft_ranks_per_step"] = 2 * args.search_width * len(behaviours)
    record["speedup_per_step"] = record["plain"]["seconds_per_step"] / record["probe"]["seconds_per_step"]
    for name in ("plain", "probe"):
        r = record[name]
        print(f"{name:>5}: {r['seconds_per_step'] * 1e3:.0f} ms per step, {r['model_evaluations_per_step']:.0f} "
              "candidates scored by the model per step", flush=True)
    print(f"probe sampling: {record['speedup_per_step']:.2f}x plain GCG's steps per second -> "
          f"{write_json(args.out, record)}")


if __name__ == "__main__":
    main()
