"""jaxrisk GCG vs nanoGCG on the same model directory, behaviours, search width and top-k, in one script.

nanoGCG needs transformers <= 4.47, so it runs in its own venv (created once):

    python3 -m venv .venv-nanogcg && .venv-nanogcg/bin/pip install torch==2.13.0 transformers==4.47.1 nanogcg==0.3.0
    python benchmarks/gcg_vs_nanogcg.py --out runs/bench_gcg.json

Reported, for each side: candidate evaluations per second (candidates whose loss was computed, after the
re-tokenisation filter, over the whole wall time including gradients), wall time to first success per
behaviour, and the success rate after the same step budget (success = greedy generation from the
optimised ids starts with the target). jaxrisk runs all behaviours at once (and, separately, one
behaviour with one restart, the honest like-for-like ratio); nanoGCG runs them one after another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import tempfile
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
BEHAVIORS = [("Lily saw a", "big snake"), ("Tom went to the", "dragon"), ("The dog said", "no"),
             ("Mom gave Ben a", "red car"), ("Once upon a time, there was a", "robot"),
             ("The little bird", "flew to the moon"), ("Sue and Tim ate", "a pizza"), ("The sun was", "green")]


def summarise(rows: list[dict], wall: float, candidates: int) -> dict:
    firsts = [r["seconds"] for r in rows if r["success"]]
    return {"behaviours": len(rows), "successes": sum(r["success"] for r in rows),
            "success_rate": sum(r["success"] for r in rows) / len(rows), "wall_seconds": wall,
            "candidates": candidates, "candidates_per_second": candidates / wall,
            "median_seconds_to_success": statistics.median(firsts) if firsts else None}


def run_nanogcg(args, behaviors, steps: int, early_stop: bool) -> tuple[dict, list[dict]]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"goal": b.goal, "target": b.target} for b in behaviors], f)
    t = time.perf_counter()
    proc = subprocess.run([args.nanogcg_python, str(ROOT / "benchmarks" / "nanogcg_runner.py"), args.model, f.name,
                           str(steps), str(args.search_width), str(args.topk), str(args.suffix_len), "0",
                           "1" if early_stop else "0"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = summarise(rows, sum(r["seconds"] for r in rows), sum(r["candidates"] for r in rows))
    summary["process_seconds"] = wall   # includes loading the model in the subprocess
    return summary, rows


def run_jaxrisk(lm, behaviors, cfg, steps, restarts, seed):
    """Wall time includes compiling the group's program (a few seconds)."""
    t = time.perf_counter()
    rows = run_group(lm, behaviors, cfg, RunConfig(restarts=restarts, max_steps=steps, chunk_steps=5, seed=seed,
                                                   progress=False))
    wall = time.perf_counter() - t
    return summarise(rows, wall, sum(r["candidates_evaluated"] for r in rows)), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--search-width", type=int, default=512)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=20)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--throughput-steps", type=int, default=10, help="fixed budget for the raw throughput runs")
    ap.add_argument("--nanogcg-python", default=str(ROOT / ".venv-nanogcg" / "bin" / "python"))
    ap.add_argument("--out", default="runs/bench_gcg.json")
    args = ap.parse_args()

    behaviors = [Behavior(g, t, i + 1) for i, (g, t) in enumerate(BEHAVIORS)]
    cfg = GCGConfig(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len, **PLAIN_GCG)
    lm = load_pretrained(args.model, dtype="float32")
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "jax_device": str(jax.devices()[0]), "model": args.model, "steps": args.steps,
              "search_width": args.search_width, "topk": args.topk, "suffix_len": args.suffix_len}

    record["jaxrisk_1x1"], _ = run_jaxrisk(lm, behaviors[:1], cfg, args.steps, 1, 0)
    print("jaxrisk 1 behaviour x 1 restart:", record["jaxrisk_1x1"], flush=True)
    record["jaxrisk_all_x1"], rows1 = run_jaxrisk(lm, behaviors, cfg, args.steps, 1, 0)
    print(f"jaxrisk {len(behaviors)} behaviours x 1 restart:", record["jaxrisk_all_x1"], flush=True)
    record["jaxrisk_all_xR"], rowsr = run_jaxrisk(lm, behaviors, cfg, args.steps, args.restarts, 0)
    print(f"jaxrisk {len(behaviors)} behaviours x {args.restarts} restarts:", record["jaxrisk_all_xR"], flush=True)

    record["nanogcg"], ng_rows = run_nanogcg(args, behaviors, args.steps, early_stop=True)
    print("nanoGCG:", record["nanogcg"], flush=True)
    ng_1 = ng_rows[0]
    record["ratios"] = {
        "candidates_per_second_all_x1": record["jaxrisk_all_x1"]["candidates_per_second"]
        / record["nanogcg"]["candidates_per_second"],
        "candidates_per_second_all_xR": record["jaxrisk_all_xR"]["candidates_per_second"]
        / record["nanogcg"]["candidates_per_second"],
        "candidates_per_second_1x1": record["jaxrisk_1x1"]["candidates_per_second"]
        / (ng_1["candidates"] / ng_1["seconds"]),
    }
    # Raw throughput: a fixed budget with early stop off, so finished lanes waste nothing on either side.
    fixed = dataclasses.replace(cfg, early_stop=False)
    n = args.throughput_steps
    raw = {"steps": n}
    raw["jaxrisk_1x1"], _ = run_jaxrisk(lm, behaviors[:1], fixed, n, 1, 0)
    raw["jaxrisk_all_x1"], _ = run_jaxrisk(lm, behaviors, fixed, n, 1, 0)
    raw["jaxrisk_all_xR"], _ = run_jaxrisk(lm, behaviors, fixed, n, args.restarts, 0)
    raw["nanogcg"], raw_rows = run_nanogcg(args, behaviors, n, early_stop=False)
    ng_rate = raw["nanogcg"]["candidates_per_second"]
    raw["ratios"] = {k: raw[k]["candidates_per_second"] / ng_rate for k in ("jaxrisk_all_x1", "jaxrisk_all_xR")}
    raw["ratios"]["jaxrisk_1x1"] = raw["jaxrisk_1x1"]["candidates_per_second"] / (
        raw_rows[0]["candidates"] / raw_rows[0]["seconds"])
    record["fixed_budget_throughput"] = raw
    print("fixed budget:", raw, flush=True)
    record["per_behaviour"] = {"jaxrisk_x1": rows1, "jaxrisk_xR": rowsr, "nanogcg": ng_rows}
    print("ratios:", record["ratios"])
    print(f"-> {write_json(args.out, record)}")


if __name__ == "__main__":
    main()
