"""The plausibility front of GCG: attack success vs request perplexity as the weight of log p(request) grows.

The request is goal + optimised suffix; its plausibility is its mean log-probability under a reference LM (here
the attacked model itself, `SequenceScorer`), added to GCG's objective with a weight. Every weight is a lane of
the same compiled program (behaviours x weights lanes, `run_group(..., weight_grid=...)`), so the sweep costs
one run. Success is checked as in gcg_success.py: greedy continuation of the returned prompt *text*, tokenised
again. Perplexity = exp(-mean log p(request tokens)); the goals alone give the natural-text reference.

    python benchmarks/gcg_plausibility.py --out runs/bench_gcg_plausibility.json    # + the .png beside it
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gcg_success import BEHAVIOURS, MODEL, lands

from jaxrisk.data.prompts import load_behaviors
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.redteam import PLAIN_GCG, GCGConfig
from jaxrisk.redteam.gcg_run import run_group
from jaxrisk.redteam.report import plot_plausibility_front
from jaxrisk.scorers import SequenceScorer
from jaxrisk.search import RunConfig


def perplexity(scorer, tokenizer, text: str) -> float:
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)[None]
    return float(np.exp(-scorer(jnp.asarray(ids), jnp.ones(ids.shape, bool))[0]))


def plot(record: dict, path: Path) -> None:
    b = record["budget"]
    plot_plausibility_front([dict(w, weights=[w["weight"]]) for w in record["weights"]], path,
                            f"GCG plausibility front: {record['behaviours']} targets, {b['steps']} steps x "
                            f"{b['search_width']}", reference=record["median_goal_perplexity"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--behaviours", default=str(BEHAVIOURS))
    ap.add_argument("--limit", type=int, default=12, help="the first N behaviours of the file")
    ap.add_argument("--weights", default="0,0.3,1,3", help="comma-separated weights of log p(request)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--search-width", type=int, default=128)
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--suffix-len", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_gcg_plausibility.json")
    args = ap.parse_args()

    behaviours = load_behaviors(args.behaviours)[:args.limit]
    weights = [float(w) for w in args.weights.split(",")]
    lm = load_pretrained(args.model, dtype="float32")
    scorer = SequenceScorer.of(lm)
    cfg = GCGConfig(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len, **PLAIN_GCG)
    t = time.perf_counter()
    rows = run_group(lm, behaviours, cfg, RunConfig(max_steps=args.steps, chunk_steps=10, seed=args.seed,
                                                    progress=True),
                     extras=[(0.0, scorer)], weight_grid=[[w] for w in weights])
    wall = time.perf_counter() - t
    per_weight = []
    for k, w in enumerate(weights):
        mine = rows[k::len(weights)]
        landed = [lands(lm, r["prompt"], r["target"]) for r in mine]
        ppl = [perplexity(scorer, lm.tokenizer, r["prompt"]) for r in mine]
        per_weight.append({"weight": w, "successes": sum(landed), "success_rate": sum(landed) / len(mine),
                           "median_request_perplexity": float(np.median(ppl)),
                           "rows": [{"goal": r["behavior"], "target": r["target"], "landed": ok, "perplexity": p,
                                     "suffix": r["suffix"]} for r, ok, p in zip(mine, landed, ppl)]})
        print(f"w={w:<5g} {sum(landed)}/{len(mine)} landed, median request perplexity {np.median(ppl):.1f}",
              flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "jax_device": str(jax.devices()[0]), "model": args.model, "behaviours": len(behaviours),
              "budget": {"steps": args.steps, "search_width": args.search_width, "topk": args.topk,
                         "suffix_len": args.suffix_len}, "wall_seconds": round(wall, 1),
              "median_goal_perplexity": float(np.median([perplexity(scorer, lm.tokenizer, b.goal)
                                                         for b in behaviours])),
              "weights": per_weight}
    out = write_json(args.out, record)
    plot(record, out.with_suffix(".png"))
    print(f"-> {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
