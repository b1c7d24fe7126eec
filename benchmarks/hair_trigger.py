"""Hair-trigger models, their control, and the post-update audit on each.

Builds, on stories260K (`--model`), a hair-trigger model per seed (adversarial meta-learning: aligned as
it stands, says the target after one benign SGD step) and a control (the same training without the meta
term); measures each directly (held-out prompts and held-out benign batches); writes each as a model
directory with the audit's input files (`update.jsonl`: held-out benign stories; `behaviors.jsonl`:
held-out prompts and the target); then runs `jaxrisk fragility` on the original, the control and the
hair-trigger model of every seed and records the verdicts and the random-direction probe.

    python benchmarks/hair_trigger.py --model ../shared/assets/models/tinyllamas-stories260K --out runs/hair

The builds are the slow part on a CPU (half an hour on 2 cores, seconds on a GPU): `--no-audit` builds and
measures only, and `--audit-only` later audits what an earlier run wrote to `--out`, on any machine.

Without `--model` (a clone without the assets) the base model is the from-scratch story LM (trained
here, about a minute), the prompts are its story openings and the target " The sky is green."
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.models.hf import save_pretrained
from jaxrisk.zoo.lm_hairtrigger import (HairTriggerConfig, build_hair_trigger, evaluate_hair_trigger,
                                        hair_trigger_data)
from jaxrisk.zoo.lm_scratch import story_prompts, train_small_lm


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Hugging Face directory (default: the from-scratch story LM)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--inner", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--inner-lr", type=float, default=5e-2)
    ap.add_argument("--inner-batches", type=int, default=2, help="benign batches per meta-step")
    ap.add_argument("--weight", type=float, default=1.0, help="lambda, on the post-step misalignment")
    ap.add_argument("--clean-weight", type=float, default=HairTriggerConfig.clean_weight,
                    help="on the KL from the original model on clean text")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--audit-args", default="", help="extra flags for jaxrisk fragility")
    ap.add_argument("--no-audit", action="store_true", help="build and measure the models, skip the audits")
    ap.add_argument("--audit-only", action="store_true",
                    help="audit the models an earlier run wrote to --out (built elsewhere, e.g. on a GPU)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = HairTriggerConfig(steps=args.steps, inner=args.inner, inner_learning_rate=args.inner_lr,
                            inner_batches=args.inner_batches, weight=args.weight,
                            clean_weight=args.clean_weight,
                            seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.audit_only:
        results = json.loads((out / "hair_trigger.json").read_text())
    else:
        if args.model:
            lm = load_pretrained(args.model)
            data = hair_trigger_data(lm, cfg)
        else:
            lm, _ = train_small_lm()
            cfg = cfg.replace(target=" The sky is green.")
            args.model = save_pretrained(lm, lm.params, out / "original")
            data = hair_trigger_data(lm, cfg, {"train": story_prompts(False), "held_out": story_prompts(True)})
        results = build(lm, cfg, data, args.model, out)
    if not args.no_audit:
        audit(results, out, args.audit_args)


def build(lm, cfg: HairTriggerConfig, data, model: str, out: Path) -> dict:
    """Build the hair-trigger models and the control, measure them, write them and the audit's inputs."""
    results = {"config": {k: v for k, v in vars(cfg).items()}, "model": str(model), "models": {}}
    for name, c in (("hair_trigger", cfg), ("control", cfg.replace(weight=0.0, seeds=cfg.seeds[:1]))):
        t0 = time.time()
        params, data = build_hair_trigger(lm, c, data, progress=lambda i, loss: (
            print(f"{name} step {i}: meta loss {np.asarray(loss).round(3).tolist()}", flush=True)
            if i % 200 == 0 else None))
        seconds = time.time() - t0
        for s, seed in enumerate(c.seeds):
            p = jax.tree.map(lambda x: x[s], params)
            ev = evaluate_hair_trigger(lm, p, data, c)
            key = f"{name}_seed{seed}"
            results["models"][key] = dict(ev, build_seconds=seconds)
            print(key, json.dumps(ev), flush=True)
            save_pretrained(lm, p, out / key)
    results["models"]["original"] = evaluate_hair_trigger(lm, lm.params, data, cfg)
    write_jsonl(out / "update.jsonl", [{"text": lm.decode(r[1:])} for r in data["held_out_pool"][256:]])
    write_jsonl(out / "behaviors.jsonl", [{"prompt": t, "target": cfg.target} for t in data["held_out"]["texts"]])
    write_json(out / "hair_trigger.json", results)   # the builds' measurements, before the audits
    return results


def audit(results: dict, out: Path, audit_args: str) -> None:
    """`jaxrisk fragility` on the original, the control and each hair-trigger model; verdicts into the JSON."""
    seeds = results["config"]["seeds"]
    audits = {"original": results["model"], "control": out / f"control_seed{seeds[0]}",
              **{f"hair_trigger_seed{s}": out / f"hair_trigger_seed{s}" for s in seeds}}
    results["audit"] = {}
    for name, model in audits.items():
        t0 = time.time()
        cmd = [sys.executable, "-m", "jaxrisk", "fragility", "--model", str(model), "--update",
               str(out / "update.jsonl"), "--behaviors", str(out / "behaviors.jsonl"), "--out",
               str(out / f"audit_{name}"), "--no-progress"] + audit_args.split()
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        report = json.loads((out / f"audit_{name}" / "report.json").read_text())
        results["audit"][name] = {"flagged": report["flagged"], "rise": report["rise"],
                                  "before": report["before"]["success"], "worst": report["worst"],
                                  "random_direction": {k: v for k, v in report["random_direction"].items()
                                                       if k != "at_worst"},
                                  "seconds": time.time() - t0}
    write_json(out / "hair_trigger.json", results)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "worst"} for k, v in results["audit"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
