"""Circuit discovery: learn circuits for a behaviour from a data file; report, figure and masks.

Data (JSONL): rows {"prompt": ..., "completion": ...} show the behaviour X (a backdoor's output, a
refusal); for the alignment objective they also carry "compliance" (what the model should say without
the circuit); rows {"text": ...} are clean text whose behaviour must be kept; 80% of each is used for
learning, 20% held out for the evaluation. Every lane (penalty x restart) is evaluated on the held-out rows,
with zero ablation and with mean ablation (an ablated unit set to its mean activation on the training clean
text): the behaviour rate (greedy continuations of held-out prompts that start with the completion) with the
circuit ablated and with the circuit alone, utility (held-out clean-loss ratio, intact / masked) and task
accuracy (top-1 next-token accuracy on the held-out clean text). The report lists one circuit per penalty
(its restart of lowest final loss) and the Pareto front over every lane: fewest units, lowest behaviour rate
once ablated, highest utility.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from jaxrisk.circuits.config import CircuitsConfig
from jaxrisk.circuits.masks import unit_means
from jaxrisk.circuits.problem import CircuitProblem, ablation_masks, circuit_from_logits, sparsity
from jaxrisk.circuits.report import CircuitsResult, learned_measures
from jaxrisk.data.batch import answer_rows, pad_batch
from jaxrisk.errors import InputError
from jaxrisk.evals.behaviour import clean_loss, greedy_continuations, next_token_accuracy, utility
from jaxrisk.search import engine
from jaxrisk.search.reduce import best_per_group, lane_groups, pareto_set

DENSE = 0.10      # a circuit with more than this share of units is not what a circuit search is for
FAITHFUL = 0.05   # behaviour rate once ablated at or below which a circuit counts as carrying the behaviour


def sweep_warnings(lanes: list[dict], ablation: str = "zero") -> list[str]:
    """What a user must hear when the penalty sweep missed the interesting range (rates under `ablation`)."""
    out = []
    if all(c["units"] == 0 for c in lanes):
        out.append("every circuit is empty: the penalties are too large for this behaviour (try smaller ones)")
    elif all(c["units"] > DENSE for c in lanes):
        out.append(f"every circuit holds more than {DENSE:.0%} of the units: the penalties are too small "
                   "(try larger ones)")
    rates = [learned_measures(c, ablation)["rate_ablated"] for c in lanes]
    rates = [r for r in rates if r is not None]
    if rates and min(rates) > FAITHFUL:
        out.append(f"no circuit's ablation takes the behaviour rate to {FAITHFUL:.0%} or below "
                   f"(lowest {min(rates):.0%}): smaller penalties or more steps")
    return out


def run(lm, data: dict, config: CircuitsConfig = CircuitsConfig(), *, params=None) -> CircuitsResult:
    """Learn circuits for every penalty x restart (one compiled run) and evaluate each on the held-out rows.
    `data`: from `load_circuit_data`; `params`: the model's parameters to dissect (default `lm.params`, e.g. a
    planted copy)."""
    params = lm.params if params is None else params
    cfg, penalties, restarts = config.search, list(config.penalties), config.run.restarts
    for n, row in enumerate(data["clean"] + [ids for b in data["behaviour"] for ids in b if ids is not None]):
        lm.check_tokens(np.asarray(row, np.int64), f"circuit data row {n}: tokens", ndim=1, context=False)
    split_b, split_c = int(0.8 * len(data["behaviour"])), int(0.8 * len(data["clean"]))
    train_b, test_b = data["behaviour"][:split_b], data["behaviour"][split_b:]
    prompts = [b[0] for b in train_b]
    x, w = answer_rows(prompts, [b[1] for b in train_b])
    y, y_valid = pad_batch(data["clean"][:split_c])
    means = unit_means(lm.graphdef, params, y, y_valid)
    extra = {}
    if cfg.objective == "alignment":
        missing = sum(b[2] is None for b in train_b)
        if missing:
            raise InputError(f"--objective alignment: {missing} of {len(train_b)} behaviour rows have no "
                             f"\"compliance\" (what the model should say once the circuit is ablated)")
        c, cw = answer_rows(prompts, [b[2] for b in train_b])
        extra = {"c_tokens": jnp.asarray(c), "c_weight": jnp.asarray(cw)}
    problem = CircuitProblem(params=params, x_tokens=jnp.asarray(x), x_weight=jnp.asarray(w),
                             y_tokens=jnp.asarray(y), y_weight=jnp.asarray(y_valid[:, 1:], jnp.float32),
                             x_keep_weight=jnp.asarray(np.cumsum(w, 1) == 0, jnp.float32), means=means,
                             graphdef=lm.graphdef, cfg=cfg, **extra)
    lane_penalty = np.repeat(np.asarray(penalties, np.float32), restarts)
    run_cfg = config.run.replace(chunk_steps=min(config.run.chunk_steps, config.run.max_steps))
    res = engine.run(problem, {"penalty": lane_penalty}, run_cfg, desc="circuits")
    failed = np.flatnonzero(res.failed_at >= 0)
    if len(failed):
        where = ", ".join(f"penalty {lane_penalty[i]:g} at step {int(res.failed_at[i])}" for i in failed)
        raise InputError(f"the circuit search turned NaN ({where}); its masks are not a result. A smaller "
                         "CircuitConfig.learning_rate or a model whose loss is finite on this data is needed")
    completion = np.asarray(test_b[0][1])
    same = all(b[1] == test_b[0][1] for b in test_b)   # rates need one fixed completion
    prompts = [np.asarray(b[0]) for b in test_b]
    held, held_valid = pad_batch(data["clean"][split_c:])
    base_loss = clean_loss(lm, params, held, held_valid, "the intact model")

    alts = [b[2] for b in test_b]
    n_alt = min([3] + [len(a) for a in alts if a is not None])

    def evaluate(masks):
        """Behaviour rate, compliance rate (starts with the row's first compliance tokens), utility and task
        accuracy of the model with these masks."""
        outs = np.stack(greedy_continuations(lm, params, prompts, max(len(completion), n_alt), **masks))
        return {"rate": float(np.mean(np.all(outs[:, :len(completion)] == completion, 1))) if same else None,
                "compliance": (float(np.mean([np.array_equal(o[:n_alt], a[:n_alt]) for o, a in zip(outs, alts)]))
                               if all(a is not None for a in alts) else None),
                "utility": utility(base_loss, lm, params, held, held_valid, "the masked model", **masks),
                "task_accuracy": next_token_accuracy(lm, params, held, held_valid, **masks)}

    def measures(circuit, lane_means):
        ablated = evaluate(ablation_masks(circuit, lm.cfg, means=lane_means))
        alone = evaluate(ablation_masks(circuit, lm.cfg, alone=True, means=lane_means))
        return {"rate_ablated": ablated["rate"], "compliance_ablated": ablated["compliance"],
                "utility": ablated["utility"], "task_accuracy": ablated["task_accuracy"],
                "rate_alone": alone["rate"], "utility_alone": alone["utility"]}

    def lane_entry(i):
        logits = {k: np.asarray(v[i]) for k, v in res.state.logits.items()}
        circuit = circuit_from_logits(logits)
        entry = {"penalty": float(lane_penalty[i]), "restart": int(i % restarts), **sparsity(circuit, lm.cfg),
                 "heads_in_circuit": np.argwhere(circuit.get("heads", np.zeros((0, 2))) > 0).tolist(),
                 **measures(circuit, None), "mean_ablation": measures(circuit, means), "logits": logits}
        if res.state.main_logits:                   # backdoor objective: the clean (main) mask on its own
            main = circuit_from_logits({k: np.asarray(v[i]) for k, v in res.state.main_logits.items()})
            dropped = {k: 1.0 - v for k, v in main.items()}
            scores = evaluate(ablation_masks(dropped, lm.cfg))
            entry["main"] = dict(rate=scores["rate"], compliance=scores["compliance"], utility=scores["utility"],
                                 units_dropped=sparsity(dropped, lm.cfg)["units"],
                                 overlap_units=int(sum((circuit[k] * main[k]).sum() for k in circuit)))
        return entry

    lanes = [lane_entry(i) for i in range(len(lane_penalty))]
    final_loss = res.metrics["loss"][np.asarray(res.steps) - 1, np.arange(len(lane_penalty))]
    best = best_per_group(lane_groups(np.arange(len(lane_penalty)) // restarts).values(), lambda i: final_loss[i])
    scores = [learned_measures(c, cfg.ablation) for c in lanes]
    front = pareto_set(list(range(len(lanes))),
                       lambda i: (lanes[i]["units"], scores[i]["rate_ablated"] or 0.0, -scores[i]["utility"]))
    notes = sweep_warnings(lanes, cfg.ablation)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    base = evaluate({})
    summary = ("penalty", "restart", "units", "n_heads", "n_neurons", "rate_ablated", "compliance_ablated", "utility",
               "task_accuracy", "rate_alone", "mean_ablation", "logits")
    return CircuitsResult({"objective": cfg.objective, "base_rate": base["rate"], "base_compliance": base["compliance"],
                           "base_clean_loss": base_loss, "base_task_accuracy": base["task_accuracy"],
                           "circuits": [lanes[i] for i in best],
                           "front": [{k: lanes[i][k] for k in summary} for i in front], "warnings": notes,
                           "config": {"granularity": cfg.granularity, "kind": cfg.kind, "keep": cfg.keep,
                                      "remove_loss": cfg.remove_loss, "ablation": cfg.ablation,
                                      "steps": config.run.max_steps,
                                      "restarts": restarts, "seed": config.run.seed}}, means=means)
