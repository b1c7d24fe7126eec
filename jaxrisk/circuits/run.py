"""`jaxrisk circuits`: learn circuits for a behaviour from a data file; report, figure and masks.

Data (JSONL): rows {"prompt": ..., "completion": ...} show the behaviour X (a backdoor's output, a
refusal); for the alignment objective they also carry "compliance" (what the model should say without
the circuit); rows {"text": ...} are clean text whose loss must be kept. 80% of each is used for
learning, 20% held out for the evaluation: the behaviour rate (greedy continuations of held-out prompts
that start with the completion) with the circuit ablated and with the circuit alone, and utility (held-out
clean-loss ratio, ablated / intact).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrisk.circuits.discover import (CircuitConfig, CircuitProblem, ablation_masks, circuit_from_logits,
                                       sparsity)
from jaxrisk.data.text import jsonl_rows, text_field
from jaxrisk.errors import InputError, require_int, require_number
from jaxrisk.io import atomic_write, write_json
from jaxrisk.models.lm_train import answer_rows, lm_loss
from jaxrisk.scorers.probe import pad_batch
from jaxrisk.search import engine
from jaxrisk.zoo.lm_backdoor import greedy_continuations


def load_circuit_data(path: str | Path, tokenizer) -> dict:
    path = Path(path)
    behaviour, clean = [], []
    for n, row in jsonl_rows(path, "{prompt, completion} (the behaviour) or {text} (clean text)"):
        if "prompt" in row and "completion" in row:
            p = tokenizer(text_field(path, n, row, "prompt"))["input_ids"]
            c = tokenizer(text_field(path, n, row, "completion"), add_special_tokens=False)["input_ids"]
            alt = (tokenizer(text_field(path, n, row, "compliance"), add_special_tokens=False)["input_ids"]
                   if "compliance" in row else None)
            if not c or alt == []:
                raise InputError(f"{path}:{n}: empty {'completion' if not c else 'compliance'}")
            behaviour.append((p, c, alt))
        elif "text" in row:
            clean.append(tokenizer(text_field(path, n, row, "text"))["input_ids"])
        else:
            raise InputError(f"{path}:{n}: expected {{prompt, completion}} (the behaviour) or {{text}} (clean text)")
    if len(behaviour) < 5 or len(clean) < 5:
        raise InputError(f"{path}: need at least 5 behaviour rows and 5 clean rows "
                         f"(found {len(behaviour)} and {len(clean)})")
    return {"behaviour": behaviour, "clean": clean}


def discover(lm, params, data: dict, penalties, *, steps: int = 400, cfg: CircuitConfig = CircuitConfig(),
             progress: bool = True, checkpoint_dir=None) -> dict:
    """Learn one circuit per penalty (one compiled run) and evaluate each on the held-out rows."""
    steps = require_int("steps", steps, 1)
    penalties = [require_number("penalty", p, 0.0) for p in penalties]
    if not penalties:
        raise InputError("discover: no penalties (one circuit is learned per sparsity weight)")
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
                             y_tokens=jnp.asarray(y), y_weight=jnp.asarray(y_valid[:, 1:], jnp.float32), graphdef=lm.graphdef, cfg=cfg,
                             **extra)
    res = engine.run(problem, {"penalty": np.asarray(penalties, np.float32)}, 0,
                     engine.EngineConfig(max_steps=steps, chunk_steps=min(100, steps), progress=progress,
                                         checkpoint_dir=checkpoint_dir, desc="circuits"))
    failed = np.flatnonzero(res.failed_at >= 0)
    if len(failed):
        where = ", ".join(f"penalty {penalties[i]:g} at step {int(res.failed_at[i])}" for i in failed)
        raise InputError(f"the circuit search turned NaN ({where}); its masks are not a result. A smaller "
                         "CircuitConfig.learning_rate or a model whose loss is finite on this data is needed")
    completion = np.asarray(test_b[0][1])
    same = all(b[1] == test_b[0][1] for b in test_b)   # rates need one fixed completion
    prompts = [np.asarray(b[0]) for b in test_b]
    held, held_valid = pad_batch(data["clean"][split_c:])
    base_loss = _finite_loss(lm, params, held, held_valid, "the intact model")

    alts = [b[2] for b in test_b]
    n_alt = min([3] + [len(a) for a in alts if a is not None])

    def evaluate(masks):
        """(behaviour rate, compliance rate: starts with the row's first compliance tokens, utility)."""
        outs = np.stack(greedy_continuations(lm, params, prompts, max(len(completion), n_alt), **masks))
        rate = float(np.mean(np.all(outs[:, :len(completion)] == completion, 1))) if same else None
        comply = (float(np.mean([np.array_equal(o[:n_alt], a[:n_alt]) for o, a in zip(outs, alts)]))
                  if all(a is not None for a in alts) else None)
        utility = base_loss / _finite_loss(lm, params, held, held_valid, "the masked model", **masks)
        return rate, comply, utility

    circuits = []
    for i, pen in enumerate(penalties):
        logits = {k: np.asarray(v[i]) for k, v in res.state["logits"].items()}
        circuit = circuit_from_logits(logits)
        rate, comply, utility = evaluate(ablation_masks(circuit, lm.cfg))
        entry = {"penalty": float(pen), **sparsity(circuit, lm.cfg),
                 "heads_in_circuit": np.argwhere(circuit.get("heads", np.zeros((0, 2))) > 0).tolist(),
                 "rate_ablated": rate, "compliance_ablated": comply, "utility": utility,
                 "rate_alone": evaluate(ablation_masks(circuit, lm.cfg, alone=True))[0], "logits": logits}
        if "main_logits" in res.state:              # backdoor objective: the clean (main) mask on its own
            main = circuit_from_logits({k: np.asarray(v[i]) for k, v in res.state["main_logits"].items()})
            dropped = {k: 1.0 - v for k, v in main.items()}
            entry["main"] = dict(zip(("rate", "compliance", "utility"), evaluate(ablation_masks(dropped, lm.cfg))),
                                 units_dropped=sparsity(dropped, lm.cfg)["units"],
                                 overlap_units=int(sum((circuit[k] * main[k]).sum() for k in circuit)))
        circuits.append(entry)
    base_rate, base_comply, _ = evaluate({})
    return {"objective": cfg.objective, "base_rate": base_rate, "base_compliance": base_comply,
            "base_clean_loss": base_loss, "circuits": circuits,
            "config": {"granularity": cfg.granularity, "kind": cfg.kind, "steps": steps}}


def _finite_loss(lm, params, tokens, valid, what: str, **masks) -> float:
    """Held-out clean loss; a loss that is not finite and positive makes every utility ratio meaningless."""
    loss = float(lm_loss(lm.graphdef, params, jnp.asarray(tokens), valid, **masks))
    if not (np.isfinite(loss) and loss > 0):
        raise InputError(f"the held-out clean loss of {what} is {loss}; utility (a loss ratio) cannot be measured")
    return loss


def write_circuit_report(result: dict, lm, out: str | Path) -> tuple[Path, Path]:
    """OUT/report.json, OUT/circuits.png (layer x head map of the sparsest faithful circuit; the front),
    OUT/circuits.safetensors (mask logits per penalty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.numpy import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"penalty{i}.{k}": v for i, c in enumerate(result["circuits"]) for k, v in c["logits"].items()}
    blob = save(tensors)
    atomic_write(out / "circuits.safetensors", lambda f: f.write(blob), mode="wb")
    report = dict(result, circuits=[{k: v for k, v in c.items() if k != "logits"} for c in result["circuits"]])
    json_path = write_json(out / "report.json", report)

    faithful = [c for c in result["circuits"] if c["rate_ablated"] is not None and c["rate_ablated"] <= 0.05]
    chosen = min(faithful, key=lambda c: c["units"]) if faithful else result["circuits"][0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    heads = (chosen["logits"]["heads"] > 0).astype(float) if "heads" in chosen["logits"] else np.zeros((1, 1))
    ax1.imshow(heads, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax1.set_xlabel("head")
    ax1.set_ylabel("layer")
    ax1.set_title(f"circuit heads (penalty {chosen['penalty']}; {chosen['n_heads']} heads, "
                  f"{chosen['n_neurons']} neurons)", fontsize=9)
    xs = [100 * c["units"] for c in result["circuits"]]
    ax2.plot(xs, [c["utility"] for c in result["circuits"]], "o-", label="utility")
    if all(c["rate_ablated"] is not None for c in result["circuits"]):
        ax2.plot(xs, [c["rate_ablated"] for c in result["circuits"]], "s-", label="behaviour rate, ablated")
    ax2.set_xlabel("% of heads + neurons ablated")
    ax2.legend()
    ax2.set_title("sparsity / faithfulness front", fontsize=9)
    fig.tight_layout()
    png = out / "circuits.png"
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return json_path, png
