"""Circuit discovery: learn circuits for a behaviour from a data file; report, figure and masks.

Data (JSONL): rows {"prompt": ..., "completion": ...} show the behaviour X (a backdoor's output, a
refusal); for the alignment objective they also carry "compliance" (what the model should say without
the circuit); rows {"text": ...} are clean text whose loss must be kept. 80% of each is used for
learning, 20% held out for the evaluation: the behaviour rate (greedy continuations of held-out prompts
that start with the completion) with the circuit ablated and with the circuit alone, and utility (held-out
clean-loss ratio, ablated / intact).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxrisk.circuits.config import CircuitsConfig
from jaxrisk.circuits.problem import CircuitProblem, ablation_masks, circuit_from_logits, sparsity
from jaxrisk.circuits.report import CircuitsResult
from jaxrisk.data.batch import answer_rows, pad_batch
from jaxrisk.errors import InputError
from jaxrisk.evals.behaviour import clean_loss, greedy_continuations, utility
from jaxrisk.search import engine
from jaxrisk.search.reduce import best_per_group, lane_groups


def run(lm, data: dict, config: CircuitsConfig = CircuitsConfig(), *, params=None) -> CircuitsResult:
    """Learn one circuit per penalty (restarts x penalties lanes, one compiled run) and evaluate each on the
    held-out rows. `data`: from `load_circuit_data`; `params`: the model's parameters to dissect (default
    `lm.params`, e.g. a planted copy)."""
    params = lm.params if params is None else params
    cfg, penalties, restarts = config.search, list(config.penalties), config.run.restarts
    for n, row in enumerate(data["clean"] + [ids for b in data["behaviour"] for ids in b if ids is not None]):
        lm.check_tokens(np.asarray(row, np.int64), f"circuit data row {n}: tokens", ndim=1, context=False)
    split_b, split_c = int(0.8 * len(data["behaviour"])), int(0.8 * len(data["clean"]))
    train_b, test_b = data["behaviour"][:split_b], data["behaviour"][split_b:]
    prompts = [b[0] for b in train_b]
    x, w = answer_rows(prompts, [b[1] for b in train_b])
    y, y_valid = pad_batch(data["clean"][:split_c])
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
                             graphdef=lm.graphdef, cfg=cfg,
                             **extra)
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
        """(behaviour rate, compliance rate: starts with the row's first compliance tokens, utility)."""
        outs = np.stack(greedy_continuations(lm, params, prompts, max(len(completion), n_alt), **masks))
        rate = float(np.mean(np.all(outs[:, :len(completion)] == completion, 1))) if same else None
        comply = (float(np.mean([np.array_equal(o[:n_alt], a[:n_alt]) for o, a in zip(outs, alts)]))
                  if all(a is not None for a in alts) else None)
        return rate, comply, utility(base_loss, lm, params, held, held_valid, "the masked model", **masks)

    final_loss = res.metrics["loss"][np.asarray(res.steps) - 1, np.arange(len(lane_penalty))]
    best = best_per_group(lane_groups(np.arange(len(lane_penalty)) // restarts).values(), lambda i: final_loss[i])
    circuits = []
    for pen, i in zip(penalties, best):
        logits = {k: np.asarray(v[i]) for k, v in res.state.logits.items()}
        circuit = circuit_from_logits(logits)
        rate, comply, kept = evaluate(ablation_masks(circuit, lm.cfg))
        entry = {"penalty": float(pen), **sparsity(circuit, lm.cfg),
                 "heads_in_circuit": np.argwhere(circuit.get("heads", np.zeros((0, 2))) > 0).tolist(),
                 "rate_ablated": rate, "compliance_ablated": comply, "utility": kept,
                 "rate_alone": evaluate(ablation_masks(circuit, lm.cfg, alone=True))[0], "logits": logits}
        if res.state.main_logits:                   # backdoor objective: the clean (main) mask on its own
            main = circuit_from_logits({k: np.asarray(v[i]) for k, v in res.state.main_logits.items()})
            dropped = {k: 1.0 - v for k, v in main.items()}
            entry["main"] = dict(zip(("rate", "compliance", "utility"), evaluate(ablation_masks(dropped, lm.cfg))),
                                 units_dropped=sparsity(dropped, lm.cfg)["units"],
                                 overlap_units=int(sum((circuit[k] * main[k]).sum() for k in circuit)))
        circuits.append(entry)
    base_rate, base_comply, _ = evaluate({})
    return CircuitsResult({"objective": cfg.objective, "base_rate": base_rate, "base_compliance": base_comply,
                           "base_clean_loss": base_loss, "circuits": circuits,
                           "config": {"granularity": cfg.granularity, "kind": cfg.kind, "steps": config.run.max_steps,
                                      "restarts": restarts, "seed": config.run.seed}})


