"""How often GCG lands, and what each part of the stronger search buys: the behaviour set of
benchmarks/data/story_targets.jsonl (multi-token story targets stories260K does not say unprompted) at one
stated budget (steps x candidates per step), plain GCG and each part switched on, and nanoGCG 0.3.0 at the
same budget, in one script.

    python benchmarks/gcg_success.py --out runs/bench_gcg_success.json
    python benchmarks/gcg_success.py --variants gcg,all --no-nanogcg     # a quicker look

Success is checked independently of the search: the returned prompt *text* is tokenised again and the
model's greedy continuation must start with the target's tokens. nanoGCG needs transformers <= 4.47, so
it runs in its own venv (see benchmarks/gcg_vs_nanogcg.py); its success is checked the same way (greedy
generation from goal + its best string, tokenised; also reported: success on the ids it optimised, goal and
suffix tokenised apart, which is what its own early stop checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxrisk.data.prompts import load_behaviors
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.redteam import PLAIN_GCG, GCGConfig, RedteamConfig, run
from jaxrisk.search import RunConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"
BEHAVIOURS = ROOT / "benchmarks" / "data" / "story_targets.jsonl"

DEFAULTS = {name: getattr(GCGConfig(), name) for name in PLAIN_GCG}   # GCGConfig()'s four parts over plain GCG

# each part alone on plain GCG (GCGConfig(**PLAIN_GCG)), then together
VARIANTS = {
    "gcg": {},
    "matches": {"select": "matches"},
    "mellowmax": {"mellowmax_alpha": 1.0},   # nanoGCG's use_mellowmax, its default alpha
    "margin": {"margin": 1.0},
    "buffer": {"buffer_size": 4},
    "multi": {"n_replace": 4, "n_replace_final": 1},
    "no_revisit": {"no_revisit": True},
    "restart": {"restart_patience": 50},   # back to the start suffix after 50 steps without a better suffix
    # the model's first layer ranks 256 candidates, the model scores 16 + 32 of them: about plain GCG's compute
    "probe": {"probe_layers": 1, "search_width": 256},
    "target_init": {"init_from_target": True},
    "random_positions": {"positions": "random"},
    "restart_matches": {"restart_patience": 50, "select": "matches"},
    "restart_matches_target": {"restart_patience": 50, "select": "matches", "init_from_target": True},
    "defaults": DEFAULTS,   # the four above
    # the defaults, each restart redrawing half of the start's tokens at random (explores other basins)
    "defaults_noisy_restarts": DEFAULTS | {"restart_noise": 0.5},
    # the defaults with a target loss that weighs the tokens still wrong (deep target tokens lose to the prior)
    "defaults_margin": DEFAULTS | {"margin": 1.0},
    "defaults_mellowmax": DEFAULTS | {"mellowmax_alpha": 1.0},
    "warm": {"warm_start_step": 100},   # half of the default budget, then unsolved ones go on from solved suffixes
    "all": {"select": "matches", "buffer_size": 4, "n_replace": 4, "n_replace_final": 1, "no_revisit": True},
}


def lands(lm, prompt: str, target: str) -> bool:
    """The model's greedy continuation of the prompt text, tokenised again, starts with the target."""
    tok = lm.tokenizer
    ids = tok(prompt)["input_ids"]
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    return lm.generate([np.asarray(ids, np.int32)], max_new_tokens=len(target_ids))[0][:len(target_ids)] == target_ids


def run_variant(lm, behaviours, base: GCGConfig, parts: dict, steps: int, seed: int, restarts: int = 1) -> dict:
    cfg = RedteamConfig(run=RunConfig(max_steps=steps, chunk_steps=10, seed=seed, progress=False, restarts=restarts),
                        group=len(behaviours), gcg=dataclasses.replace(base, **parts))
    t = time.perf_counter()
    rows = run(lm, behaviours, cfg).rows
    wall = time.perf_counter() - t
    landed = [lands(lm, r["prompt"], r["target"]) for r in rows]
    return {"parts": parts, "successes": sum(landed), "success_rate": sum(landed) / len(rows),
            "wall_seconds": round(wall, 1), "candidates": sum(r["candidates_evaluated"] for r in rows),
            "mean_steps": float(np.mean([r["steps"] for r in rows])),
            "rows": [{"goal": r["behavior"], "target": r["target"], "landed": ok, "steps": r["steps"],
                      "loss": r["loss"], "suffix": r["suffix"], "warm_start_from": r.get("warm_start_from")}
                     for r, ok in zip(rows, landed)]}


def run_nanogcg(args, behaviours) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"goal": b.goal, "target": b.target} for b in behaviours], f)
    t = time.perf_counter()
    proc = subprocess.run([args.nanogcg_python, str(ROOT / "benchmarks" / "nanogcg_runner.py"), args.model, f.name,
                           str(args.steps), str(args.search_width), str(args.topk), str(args.suffix_len),
                           str(args.seed), "1"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"successes": sum(r["success"] for r in rows), "success_rate": sum(r["success"] for r in rows) / len(rows),
            "successes_on_its_ids": sum(r["success_ids"] for r in rows),
            "stopped_early": sum(r["stopped_early"] for r in rows),
            "wall_seconds": round(wall, 1), "candidates": sum(r["candidates"] for r in rows), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--behaviours", default=str(BEHAVIOURS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--search-width", type=int, default=128)
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--suffix-len", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--restarts", type=int, default=1,
                    help="independent lanes per behaviour, each of --steps steps (the budget is their sum; each "
                         "lane stops when it lands, a behaviour's other lanes go on)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--no-nanogcg", action="store_true")
    ap.add_argument("--nanogcg-python", default=str(ROOT / ".venv-nanogcg" / "bin" / "python"))
    ap.add_argument("--out", default="runs/bench_gcg_success.json")
    args = ap.parse_args()

    behaviours = load_behaviors(args.behaviours)
    lm = load_pretrained(args.model, dtype="float32")
    unprompted = [b.target for b in behaviours if lands(lm, b.goal, b.target)]
    if unprompted:
        raise SystemExit(f"the model already says these unprompted: {unprompted}")
    base = GCGConfig(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len, **PLAIN_GCG)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "jax_device": str(jax.devices()[0]), "model": args.model, "behaviours": len(behaviours),
              "budget": {"steps": args.steps, "search_width": args.search_width, "topk": args.topk,
                         "suffix_len": args.suffix_len, "restarts": args.restarts,
                         "candidates_per_behaviour": args.steps * args.search_width * args.restarts},
              "variants": {}}
    for name in args.variants.split(","):
        record["variants"][name] = run_variant(lm, behaviours, base, VARIANTS[name], args.steps, args.seed,
                                               args.restarts)
        v = record["variants"][name]
        print(f"{name:>11}: {v['successes']}/{len(behaviours)} landed, {v['wall_seconds']} s, "
              f"{v['candidates']} candidates, {v['mean_steps']:.0f} steps on average", flush=True)
    if not args.no_nanogcg:
        record["nanogcg"] = run_nanogcg(args, behaviours)
        print(f"    nanogcg: {record['nanogcg']['successes']}/{len(behaviours)} landed "
              f"({record['nanogcg']['successes_on_its_ids']} on the ids it optimised), "
              f"{record['nanogcg']['wall_seconds']} s", flush=True)
    print(f"-> {write_json(args.out, record)}")


if __name__ == "__main__":
    main()
