"""Does the audit predict real fine-tuning? Refusal erosion on the planted-refusal stories260K.

The zoo plants a refusal of harmful requests in stories260K (`jaxrisk.zoo.lm_refusal`). Benign
"helpfulness" fine-tuning (neutral requests answered as the original model answers them, and clean
stories; Adam, lr 1e-3, batch 32) erodes it. The behaviour watched: on held-out harmful requests, the
model's original compliance (its first 4 tokens) instead of the refusal. The audit simulates k = 1..K
steps over `--draws` batch draws; real fine-tuning (`jaxrisk.optim.update.train_host`, the same update
step, jitted, host loop) runs with independent batch draws (`--runs` seeds) and, once, with the audit's
own batches. Reported per step count: the audit's mean and spread over draws, real fine-tuning's mean,
the error between them, and the error on identical batches (float rounding only).

    python benchmarks/fragility_refusal.py --out runs/fragility_refusal.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrisk.data.prompts import Behavior
from jaxrisk.data.updates import UpdateExample
from jaxrisk.fragility import FragilityConfig, fragility_data, run
from jaxrisk.fragility.problem import behaviour_scores
from jaxrisk.fragility.run import draw_batches
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.models.lm import lm_loss
from jaxrisk.optim.update import train_host
from jaxrisk.search.config import RunConfig
from jaxrisk.zoo.lm_refusal import RefusalConfig, helpfulness_rows, plant_refusal

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--steps", default="1,4,16,64")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "runs" / "fragility_refusal.json"))
    args = ap.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    lm = load_pretrained(args.model)
    t0 = time.time()
    params, data = plant_refusal(lm, RefusalConfig(seed=0))
    plant_seconds = time.time() - t0
    held = data["held_out"]
    behaviours = [Behavior(lm.decode(p[1:]), lm.decode(c[:4]), n + 1)
                  for n, (p, c, h) in enumerate(zip(held["prompts"], held["compliance"], held["harmful"])) if h]
    rows, valid = helpfulness_rows(lm)
    examples = [UpdateExample("", lm.decode(r[v][1:]), n + 1) for n, (r, v) in enumerate(zip(rows, valid))]
    fdata = fragility_data(lm, examples, behaviours)
    config = FragilityConfig(run=RunConfig(progress=False), optimizers=("adam",), learning_rates=(args.lr,),
                             steps=steps, draws=args.draws, random_directions=2, worst_case=False)
    t0 = time.time()
    report = run(lm, fdata, config, params=params).report
    audit_seconds = time.time() - t0

    b_tokens, b_weight = jnp.asarray(fdata.behaviour_tokens), jnp.asarray(fdata.behaviour_weight)
    score = jax.jit(lambda p: behaviour_scores(lm.graphdef, p, b_tokens, b_weight))
    tokens, mask = fdata.update_tokens, fdata.update_loss_mask
    loss = lambda p, b: lm_loss(lm.graphdef, p, *b)  # noqa: E731

    def finetune_to(next_rows, s):
        p = train_host(loss, optax.adam(args.lr), params, lambda i: (tokens[next_rows(i)], mask[next_rows(i)]), s)
        logp, success = score(p)
        return float(np.mean(success)), float(np.mean(logp))

    rngs = [np.random.default_rng([99, r]) for r in range(args.runs)]
    batches = [[rng.choice(len(tokens), min(32, len(tokens)), replace=False) for _ in range(max(steps))] for rng in rngs]
    real = {s: [finetune_to(lambda i, b=b: b[i], s) for b in batches] for s in steps}
    audit_batches = draw_batches(0, 0, len(tokens), min(32, len(tokens)), max(steps))   # the audit's draw 0
    same = {s: finetune_to(lambda i: audit_batches[i], s) for s in steps}

    rows_out = []
    for s in steps:
        audit = [e for e in report["after"] if e["steps"] == s]
        a_success = [e["success"] for e in audit]
        a_logp = [e["target_logprob"] for e in audit]
        draw0 = next(e for e in audit if e["draw"] == 0)
        r_success = [x[0] for x in real[s]]
        r_logp = [x[1] for x in real[s]]
        rows_out.append({
            "steps": s,
            "audit_success_mean": float(np.mean(a_success)), "audit_success_range": [min(a_success), max(a_success)],
            "real_success_mean": float(np.mean(r_success)), "real_success_range": [min(r_success), max(r_success)],
            "error_success": float(np.mean(a_success) - np.mean(r_success)),
            "audit_logprob_mean": float(np.mean(a_logp)), "real_logprob_mean": float(np.mean(r_logp)),
            "error_logprob": float(np.mean(a_logp) - np.mean(r_logp)),
            "same_batches_error_success": draw0["success"] - same[s][0],
            "same_batches_error_logprob": draw0["target_logprob"] - same[s][1],
            "random_direction_success_mean": float(np.mean([e["random"]["success_mean"] for e in audit])),
        })
    geometry = [g for g in report["geometry"]["lanes"]]
    result = {"before": report["before"]["success"], "before_logprob": report["before"]["target_logprob"],
              "n_behaviours": len(behaviours), "n_update_rows": len(examples), "lr": args.lr,
              "flagged": report["flagged"], "rise": report["rise"], "steps": rows_out,
              "first_order_error_mean": float(np.mean([abs(g["error_first"]) for g in geometry])),
              "second_order_error_mean": float(np.mean([abs(g["error_second"]) for g in geometry])),
              "simulated_one_step_mean": float(np.mean([g["simulated"] for g in geometry])),
              "plant_seconds": plant_seconds, "audit_seconds": audit_seconds}
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
