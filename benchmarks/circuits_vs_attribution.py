"""Learned circuit masks vs attribution patching, at equal sparsity, on a backdoor planted in stories260K.

Baseline: attribution patching (Nanda 2023; Syed et al. 2023) with zero ablation: the first-order change
in the backdoor metric when a unit is ablated is -d metric / d mask at mask = 1; the top-k units by
predicted decrease are ablated, k = the size of each learned circuit. Metric (both sides): mean
probability of the marker tokens after the trigger. Reported: attack success after ablation (greedy),
utility (clean-loss ratio), units, time.

    python benchmarks/circuits_vs_attribution.py --out runs/bench_circuits.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrisk.circuits import CircuitConfig, CircuitProblem, ablation_masks, circuit_from_logits, sparsity
from jaxrisk.evals import clean_loss, utility
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.models.lm import forward, token_logprobs
from jaxrisk.search import RunConfig, engine
from jaxrisk.zoo.lm_backdoor import BackdoorConfig, attack_success, held_out_prompts, plant_backdoor, suppression_rows

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--penalties", default="3,4.5,6")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", default="runs/bench_circuits.json")
    args = ap.parse_args()

    lm = load_pretrained(args.model)
    params, data = plant_backdoor(lm, BackdoorConfig(seed=0))
    held, with_trigger, _ = held_out_prompts(lm, data)
    valid = jnp.ones(held.shape, bool)
    base_loss = clean_loss(lm, params, held, valid)
    marker = data["marker_ids"]

    def evaluate(circuit):
        masks = ablation_masks(circuit, lm.cfg)
        return {"attack_success": attack_success(lm, params, with_trigger, marker, **masks),
                "utility": utility(base_loss, lm, params, held, valid, **masks),
                **sparsity(circuit, lm.cfg)}

    record = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0]),
              "base_attack_success": attack_success(lm, params, with_trigger, marker), "learned": [],
              "attribution": []}

    rows = {k: jnp.asarray(v) for k, v in suppression_rows(data).items()}
    problem = CircuitProblem(params=params, graphdef=lm.graphdef, cfg=CircuitConfig(learning_rate=0.05), **rows)
    penalties = np.asarray([float(p) for p in args.penalties.split(",")], np.float32)
    t = time.perf_counter()
    res = engine.run(problem, {"penalty": penalties}, RunConfig(max_steps=args.steps, chunk_steps=100))
    learned_seconds = time.perf_counter() - t
    record["learned_seconds_all_penalties"] = learned_seconds

    # attribution patching: one gradient of the metric w.r.t. all-ones masks
    x, w = problem.x_tokens, problem.x_weight
    ones = {"heads": jnp.ones((lm.cfg.n_layers, lm.cfg.n_heads)), "neurons": jnp.ones((lm.cfg.n_layers, lm.cfg.d_mlp))}

    def metric(m):
        logits, _, _ = forward(lm.graphdef, params, x[:, :-1], head_mask_lh=m["heads"], neuron_mask_lf=m["neurons"])
        return jnp.sum(jnp.exp(token_logprobs(logits, x[:, 1:])) * w) / w.sum()

    t = time.perf_counter()
    grads = jax.jit(jax.grad(metric))(ones)
    jax.block_until_ready(grads)
    attribution_seconds = time.perf_counter() - t
    predicted = {k: np.asarray(-v) for k, v in grads.items()}   # change in metric when the unit is zeroed
    flat = np.concatenate([predicted["heads"].ravel(), predicted["neurons"].ravel()])
    order = np.argsort(flat)                                    # most negative predicted change first
    n_h = predicted["heads"].size

    for i, pen in enumerate(penalties):
        circuit = circuit_from_logits({k: v[i] for k, v in res.state.logits.items()})
        learned = evaluate(circuit)
        learned["penalty"] = float(pen)
        record["learned"].append(learned)
        k = learned["n_heads"] + learned["n_neurons"]
        chosen = order[:k]
        heads = np.zeros(n_h, np.float32)
        neurons = np.zeros(flat.size - n_h, np.float32)
        heads[chosen[chosen < n_h]] = 1
        neurons[chosen[chosen >= n_h] - n_h] = 1
        attr = evaluate({"heads": heads.reshape(predicted["heads"].shape),
                         "neurons": neurons.reshape(predicted["neurons"].shape)})
        attr["k"] = int(k)
        record["attribution"].append(attr)
        print(f"penalty {pen}: learned {k} units ({100 * learned['units']:.2f}%): ASR "
              f"{learned['attack_success']:.2f}, utility {learned['utility']:.3f} | attribution top-{k}: ASR "
              f"{attr['attack_success']:.2f}, utility {attr['utility']:.3f}", flush=True)
    record["attribution_seconds"] = attribution_seconds
    print(f"time: learned masks {learned_seconds:.1f} s for {len(penalties)} penalties in one program; "
          f"attribution {attribution_seconds:.2f} s")
    print(f"-> {write_json(args.out, record)}")


if __name__ == "__main__":
    main()
