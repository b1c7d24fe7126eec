"""Does freezing a safety circuit during benign fine-tuning retain more of the safety behaviour?

Model: stories260K with a planted refusal (`jaxrisk.zoo.lm_refusal`, seed 0). Circuits: learned with the
"remove" objective (smallest set whose ablation removes the refusal; several penalties, one program) and
with the "alignment" objective. Benign update: next-token fine-tuning on requests for neutral objects
answered as the original model answers them, mixed with clean stories (`helpfulness_rows`), the kind of
helpfulness update that erodes a refusal. Arms, each with the same data order, steps and learning rate:
full fine-tuning; the circuit's parameters frozen; as many randomly chosen units frozen (the control).
Reported: refusal rate on held-out harmful requests (unseen names and frames) after the update, mean
over seeds.

    python benchmarks/circuit_freezing.py --out runs/bench_freezing.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from jaxrisk.circuits import CircuitConfig, CircuitProblem, circuit_from_logits, sparsity
from jaxrisk.circuits.tuning import circuit_param_mask, fraction_of_parameters
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.optim import finetune
from jaxrisk.search import RunConfig, engine
from jaxrisk.zoo.lm_refusal import RefusalConfig, alignment_rows, helpfulness_rows, plant_refusal, refusal_rate

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--steps", default="20,40,80", help="benign fine-tuning lengths")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/bench_freezing.json")
    args = ap.parse_args()

    lm = load_pretrained(args.model)
    params, data = plant_refusal(lm, RefusalConfig(seed=0))
    held = data["held_out"]
    harmful = [p for p, h in zip(held["prompts"], held["harmful"]) if h]
    refusal = data["refusal_ids"]
    base = refusal_rate(lm, params, harmful, refusal)
    rows = {k: jax.numpy.asarray(v) for k, v in alignment_rows(data).items()}
    circuits = {}
    for objective, penalties in (("remove", [0.3, 1.0, 3.0]), ("alignment", [12.0])):
        problem = CircuitProblem(params=params, graphdef=lm.graphdef,
                                 cfg=CircuitConfig(objective=objective, learning_rate=0.05), **rows)
        res = engine.run(problem, {"penalty": np.asarray(penalties, np.float32)},
                         RunConfig(max_steps=400, chunk_steps=100, progress=False))
        for i, pen in enumerate(penalties):
            circuits[f"{objective} {pen}"] = circuit_from_logits({k: v[i] for k, v in res.state.logits.items()})

    help_rows, help_valid = helpfulness_rows(lm)
    steps = [int(s) for s in args.steps.split(",")]

    def after_update(freeze, seed, n_steps):
        mask = None if freeze is None else jax.tree.map(lambda m: 1.0 - m, freeze)
        tuned = finetune(lm, params, help_rows, valid=help_valid, steps=n_steps,
                         learning_rate=args.learning_rate, rng=np.random.default_rng(seed), mask=mask)
        return refusal_rate(lm, tuned, harmful, refusal)

    def arm(freeze):
        return {n: float(np.mean([after_update(freeze, s, n) for s in range(args.seeds)])) for n in steps}

    t0 = time.perf_counter()
    result = {"base_refusal": base, "steps": steps, "seeds": args.seeds, "full_finetuning": arm(None), "circuits": []}
    print(f"refusal on held-out harmful requests: {base:.2f} before; full fine-tuning -> "
          f"{result['full_finetuning']}", flush=True)
    rng = np.random.default_rng(0)
    for name, circuit in circuits.items():
        shuffled = {k: rng.permutation(v.ravel()).reshape(v.shape) for k, v in circuit.items()}
        mask = circuit_param_mask(params, circuit)
        entry = {"circuit": name, **sparsity(circuit, lm.cfg), "frozen_parameters": fraction_of_parameters(mask),
                 "frozen_circuit": arm(mask), "frozen_random_units": arm(circuit_param_mask(params, shuffled))}
        result["circuits"].append(entry)
        print(f"{name}: {entry['n_heads']} heads + {entry['n_neurons']} neurons "
              f"({100 * entry['frozen_parameters']:.1f}% of parameters): frozen circuit -> {entry['frozen_circuit']}, "
              f"frozen random units -> {entry['frozen_random_units']}", flush=True)
    result["seconds"] = time.perf_counter() - t0
    write_json(Path(args.out), result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
