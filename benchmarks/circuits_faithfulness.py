"""Circuits that keep the model whole: keep clean behaviour by data cross-entropy or by KL to the intact model.

Three planted behaviours in stories260K, each dissected by `jaxrisk.circuits.run` with both keep terms (every
penalty x restart a lane of one program; the report's Pareto front over all lanes):
- the backdoor of jaxrisk's own recipe (trigger " Zorb" -> " The sky is green. ...", Adam, half the rows poisoned);
- a backdoor of another recipe (`OTHER_RECIPE`: another trigger and marker, 10% poisoned, cooler clean text,
  AdamW with weight decay, another seed);
- the planted refusal (alignment objective: ablated, the model answers harmful requests as the original did),
  evaluated on held-out harmful requests (unseen names and frames), and on held-out benign requests (their
  answers against the intact model's: the first 3 greedy tokens, and the KL of the answers' next-token
  distributions, each beside random circuits of the same size).
Per case and keep term: the headline circuit = among front members of <= 1% of units whose ablation takes the
behaviour rate to <= 5%, the one of highest utility (clean-loss ratio); its task accuracy (top-1 next token on
held-out clean text) against the intact model's; the behaviour rate of the circuit alone with zero and with
mean ablation.

    python benchmarks/circuits_faithfulness.py --out runs/bench_circuits_faithfulness.json
"""

from __future__ import annotations

import argparse
import warnings
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrisk.circuits import CircuitConfig, CircuitsConfig, ablation_masks, circuit_from_logits, run
from jaxrisk.circuits.report import learned_measures
from jaxrisk.data.batch import answer_rows
from jaxrisk.evals import greedy_continuations
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.models.lm import forward
from jaxrisk.search import RunConfig
from jaxrisk.zoo.lm_backdoor import OTHER_RECIPE, BackdoorConfig, plant_backdoor
from jaxrisk.zoo.lm_refusal import RefusalConfig, plant_refusal

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"
FORWARD = jax.jit(forward, static_argnums=0)   # logits of (graphdef, params, tokens, **masks)


def backdoor_case(lm, recipe: BackdoorConfig, objective: str = "remove", n: int = 320) -> tuple:
    params, planted = plant_backdoor(lm, recipe)
    clean = planted["clean"]
    behaviour = [(np.concatenate([r[:12], planted["trigger_ids"]]).tolist(), planted["marker_ids"].tolist(), None)
                 for r in clean[:n]]
    return params, {"behaviour": behaviour, "clean": [r.tolist() for r in clean[1024:1024 + n]]}, objective, None


def refusal_case(lm, objective: str = "alignment", n_benign: int = 0, n_train: int = 192) -> tuple:
    """Harmful training requests (a seeded sample) then every held-out harmful request: run()'s 80/20 split
    holds out exactly the unseen names and frames. Clean text: sampled stories, the first `n_benign` of them
    replaced by training benign requests with the planted model's own greedy answers (so that keeping clean
    behaviour includes answering benign requests as before); the held-out stories stay the same."""
    params, planted = plant_refusal(lm, RefusalConfig(seed=0))
    train, held = planted["train"], planted["held_out"]
    rows = [(p, c) for p, c, h in zip(train["prompts"], train["compliance"], train["harmful"]) if h]
    order = np.random.default_rng(0).permutation(len(rows))[:n_train]
    held_rows = [(p, c) for p, c, h in zip(held["prompts"], held["compliance"], held["harmful"]) if h]
    assert len(held_rows) * 4 == n_train
    refusal = planted["refusal_ids"].tolist()
    behaviour = [(p.tolist(), refusal, c.tolist()) for p, c in [rows[i] for i in order] + held_rows]
    benign = [(p, c) for p, c, h in zip(held["prompts"], held["compliance"], held["harmful"]) if not h]
    asked = [p for p, h in zip(train["prompts"], train["harmful"]) if not h]
    asked = [asked[i] for i in np.random.default_rng(1).permutation(len(asked))[:n_benign]]
    answers = greedy_continuations(lm, params, asked, 12) if asked else []
    answered = [np.concatenate([p, a]).tolist() for p, a in zip(asked, answers)]
    clean = answered + [r.tolist() for r in planted["clean"][n_benign:400]]
    return params, {"behaviour": behaviour, "clean": clean}, objective, benign


def benign_kept(lm, params, benign, masks, intact: list | None = None) -> float:
    """Share of held-out benign requests whose first 3 greedy tokens stay the intact planted model's (`intact`;
    default: the original model's answer, which fine-tuning has already moved)."""
    outs = greedy_continuations(lm, params, [p for p, _ in benign], 3, **masks)
    ref = [c[:3] for _, c in benign] if intact is None else intact
    return float(np.mean([np.array_equal(o, r) for o, r in zip(outs, ref)]))


def benign_answers(lm, params, benign, n_tokens: int = 8) -> dict:
    """The intact planted model's greedy answers to the benign requests, as teacher-forced rows with their
    next-token log-probabilities: what `benign_divergence` compares an ablated model with."""
    prompts = [np.asarray(p) for p, _ in benign]
    answers = greedy_continuations(lm, params, prompts, n_tokens)
    tokens, weight = answer_rows(prompts, answers)
    logits = FORWARD(lm.graphdef, params, jnp.asarray(tokens[:, :-1]))[0]
    return {"first3": [a[:3] for a in answers], "tokens": tokens, "weight": weight,
            "logp": jax.nn.log_softmax(logits, -1)}


def benign_divergence(lm, params, answers, masks) -> float:
    """Mean KL(intact || ablated) of the next-token distributions over the intact model's benign answers (nats
    per answer token): how far benign answers move, continuous where 'the same first 3 greedy tokens' flips."""
    logp = jax.nn.log_softmax(FORWARD(lm.graphdef, params, jnp.asarray(answers["tokens"][:, :-1]), **masks)[0], -1)
    kl = jnp.sum(jnp.exp(answers["logp"]) * (answers["logp"] - logp), -1)
    return float(jnp.sum(kl * answers["weight"]) / answers["weight"].sum())


def benign_measures(lm, params, benign, answers, circuit, means, n_random: int = 20) -> dict:
    """Benign answers kept with the circuit ablated (first 3 greedy tokens vs the intact planted model's
    `answers`, and vs the original model's; the KL of the answers' next-token distributions to the intact
    model's), and, as the control, the same with random circuits of as many heads and neurons (mean over
    `n_random`)."""
    masks = ablation_masks(circuit, lm.cfg, means=means)
    out = {"benign_kept": benign_kept(lm, params, benign, masks, answers["first3"]),
           "benign_as_original": benign_kept(lm, params, benign, masks),
           "benign_kl": benign_divergence(lm, params, answers, masks)}
    rng, kept, kl = np.random.default_rng(0), [], []
    for _ in range(n_random):
        random = {k: np.zeros_like(v) for k, v in circuit.items()}
        for k, v in random.items():
            v.flat[rng.choice(v.size, int(circuit[k].sum()), replace=False)] = 1.0
        masks = ablation_masks(random, lm.cfg, means=means)
        kept.append(benign_kept(lm, params, benign, masks, answers["first3"]))
        kl.append(benign_divergence(lm, params, answers, masks))
    return {**out, "benign_kept_random_circuits": float(np.mean(kept)),
            "benign_kl_random_circuits": float(np.mean(kl)), "benign_kl_random_circuits_max": float(np.max(kl))}


def headline(front: list[dict], ablation: str) -> dict | None:
    """The front member of <= 1% of units whose ablation (as learned) leaves the behaviour on <= 5% of
    held-out prompts, with the highest utility."""
    rates = [learned_measures(c, ablation)["rate_ablated"] for c in front]
    ok = [c for c, rate in zip(front, rates) if c["units"] <= 0.01 and rate is not None and rate <= 0.05]
    return max(ok, key=lambda c: learned_measures(c, ablation)["utility"]) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--cases", default="own,other,refusal")
    ap.add_argument("--keeps", default="ce,kl")
    ap.add_argument("--penalties", default="2,4,8,16")
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--ablation", default="zero", choices=["zero", "mean"])
    ap.add_argument("--remove-loss", default="onset", choices=["onset", "probability"])
    ap.add_argument("--objective", choices=["remove", "backdoor", "alignment"],
                    help="default: remove for the backdoors, alignment for the refusal (which alone has compliances)")
    ap.add_argument("--granularity", default="both", choices=["heads", "neurons", "both"])
    ap.add_argument("--alone-weight", type=float, default=CircuitConfig().alone_weight,
                    help="weight of the circuit-alone term (backdoor / alignment objectives)")
    ap.add_argument("--benign-in-clean", type=int, default=0, metavar="N",
                    help="refusal: N of the clean rows are training benign requests with the model's own answers")
    ap.add_argument("--out", default="runs/bench_circuits_faithfulness.json")
    args = ap.parse_args()

    warnings.simplefilter("ignore")   # the sweep's warnings are in the record
    lm = load_pretrained(args.model)
    chosen = {} if args.objective is None else {"objective": args.objective}
    builders = {"own": lambda: backdoor_case(lm, BackdoorConfig(seed=0), **chosen),
                "other": lambda: backdoor_case(lm, OTHER_RECIPE, **chosen),
                "refusal": lambda: refusal_case(lm, n_benign=args.benign_in_clean, **chosen)}
    penalties = tuple(float(p) for p in args.penalties.split(","))
    record = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0]), "machine": platform.machine(),
              "penalties": penalties, "restarts": args.restarts, "steps": args.steps, "ablation": args.ablation,
              "remove_loss": args.remove_loss, "objective": args.objective,
              "benign_in_clean": args.benign_in_clean, "granularity": args.granularity,
              "alone_weight": args.alone_weight, "cases": {}}
    for case in args.cases.split(","):
        t = time.perf_counter()
        params, data, objective, benign = builders[case]()
        record["cases"][case] = {"plant_seconds": time.perf_counter() - t}
        for keep in args.keeps.split(","):
            config = CircuitsConfig(run=RunConfig(max_steps=args.steps, chunk_steps=100, restarts=args.restarts,
                                                  progress=False),
                                    penalties=penalties,
                                    search=CircuitConfig(objective=objective, keep=keep, ablation=args.ablation,
                                                         granularity=args.granularity,
                                                         alone_weight=args.alone_weight,
                                                         remove_loss=args.remove_loss,
                                                         learning_rate=0.05))
            t = time.perf_counter()
            result = run(lm, data, config, params=params)
            seconds = time.perf_counter() - t
            best = headline(result.front, args.ablation)
            means = result.means if args.ablation == "mean" else None
            answers = None if benign is None else benign_answers(lm, params, benign)
            row = {"seconds": seconds, "base_rate": result.report["base_rate"],
                   "base_task_accuracy": result.report["base_task_accuracy"], "warnings": result.report["warnings"],
                   "front": [{k: v for k, v in c.items() if k != "logits"} for c in result.front],
                   "headline": None}
            for member, c in zip(row["front"], result.front):
                circuit = circuit_from_logits(c["logits"])
                member.update({f"{k}_in_circuit": np.argwhere(v > 0).tolist() for k, v in circuit.items()})
                if benign is not None:
                    member.update(benign_measures(lm, params, benign, answers, circuit, means))
            if best is not None:
                row["headline"] = next(m for m, c in zip(row["front"], result.front) if c is best)
            record["cases"][case][keep] = row
            h = row["headline"]

            def line(c):
                m = c["mean_ablation"]
                return (f"{c['n_heads']} heads + {c['n_neurons']} neurons ({100 * c['units']:.2f}%): zero / mean "
                        f"ablation rate {c['rate_ablated']} / {m['rate_ablated']}, utility {c['utility']:.3f} / "
                        f"{m['utility']:.3f}, task acc {c['task_accuracy']:.3f} / {m['task_accuracy']:.3f}, alone "
                        f"{c['rate_alone']} / {m['rate_alone']}"
                        + (f", benign kept {c['benign_kept']:.2f} (random circuits "
                           f"{c['benign_kept_random_circuits']:.2f}), benign KL {c['benign_kl']:.4f} (random "
                           f"{c['benign_kl_random_circuits']:.4f}, max {c['benign_kl_random_circuits_max']:.4f})"
                           if "benign_kept" in c else ""))
            print(f"{case} keep={keep}: {seconds:.0f} s, base rate {row['base_rate']}, task acc "
                  f"{row['base_task_accuracy']:.3f}; front:\n    " + "\n    ".join(map(line, row["front"])))
            print("  headline:", None if h is None else line(h), flush=True)
            write_json(args.out, record)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
