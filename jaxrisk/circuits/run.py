"""`jaxrisk circuits`: learn circuits for a behaviour from a data file; report, figure and masks.

Data (JSONL): rows {"prompt": ..., "completion": ...} show the behaviour X (the completion is what the
circuit's ablation must suppress); rows {"text": ...} are clean text whose loss must be kept. 80% of
each is used for learning, 20% held out for the evaluation (greedy attack success on held-out prompts,
utility = held-out clean-loss ratio).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrisk.circuits.discover import (CircuitConfig, CircuitProblem, ablation_masks, circuit_from_logits,
                                       sparsity)
from jaxrisk.errors import InputError
from jaxrisk.io import atomic_write, write_json
from jaxrisk.search import engine
from jaxrisk.models.lm_train import lm_loss
from jaxrisk.zoo.lm_backdoor import attack_success


def load_circuit_data(path: str | Path, tokenizer) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    behaviour, clean = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            assert isinstance(row, dict)
        except (ValueError, AssertionError):
            raise InputError(f"{path}:{n}: not a JSON object") from None
        if "prompt" in row and "completion" in row:
            p = tokenizer(row["prompt"])["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            if not c:
                raise InputError(f"{path}:{n}: empty completion")
            behaviour.append((p, c))
        elif "text" in row:
            clean.append(tokenizer(row["text"])["input_ids"])
        else:
            raise InputError(f"{path}:{n}: expected {{prompt, completion}} (the behaviour) or {{text}} (clean text)")
    if len(behaviour) < 5 or len(clean) < 5:
        raise InputError(f"{path}: need at least 5 behaviour rows and 5 clean rows "
                         f"(found {len(behaviour)} and {len(clean)})")
    return {"behaviour": behaviour, "clean": clean}


def _pack(rows, spans=None):
    """Right-padded tokens [N, L], and per next-token weights [N, L-1]: the `spans` (start, end) of each
    row when given (the completion), else every real token."""
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    weight = np.zeros((len(rows), width - 1), np.float32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        lo, hi = spans[i] if spans is not None else (1, len(r))
        weight[i, lo - 1:hi - 1] = 1.0
    return tokens, weight


def discover(lm, params, data: dict, penalties, *, steps: int = 400, cfg: CircuitConfig = CircuitConfig(),
             progress: bool = True, checkpoint_dir=None) -> dict:
    """Learn one circuit per penalty (one compiled run) and evaluate each on the held-out rows."""
    split_b, split_c = int(0.8 * len(data["behaviour"])), int(0.8 * len(data["clean"]))
    train_b, test_b = data["behaviour"][:split_b], data["behaviour"][split_b:]
    rows = [p + c for p, c in train_b]
    x, w = _pack(rows, [(len(p), len(p) + len(c)) for p, c in train_b])
    y, yw = _pack(data["clean"][:split_c])
    problem = CircuitProblem(params=params, x_tokens=jnp.asarray(x), x_weight=jnp.asarray(w),
                             y_tokens=jnp.asarray(y), y_weight=jnp.asarray(yw), graphdef=lm.graphdef, cfg=cfg)
    res = engine.run(problem, {"penalty": np.asarray(penalties, np.float32)}, 0,
                     engine.EngineConfig(max_steps=steps, chunk_steps=min(100, steps), progress=progress,
                                         checkpoint_dir=checkpoint_dir, desc="circuits"))
    completion = test_b[0][1]
    same = all(c == completion for _, c in test_b)
    prompts = [np.asarray(p) for p, _ in test_b]
    held, held_w = _pack(data["clean"][split_c:])
    held_valid = jnp.asarray(np.pad(held_w, ((0, 0), (1, 0)), constant_values=1) > 0)
    base_loss = float(lm_loss(lm.graphdef, params, jnp.asarray(held), held_valid))
    base_asr = attack_success(lm, params, prompts, np.asarray(completion)) if same else None
    circuits = []
    for i, pen in enumerate(penalties):
        logits = {k: np.asarray(v[i]) for k, v in res.state["logits"].items()}
        circuit = circuit_from_logits(logits)
        masks = ablation_masks(circuit, lm.cfg)
        entry = {"penalty": float(pen), **sparsity(circuit, lm.cfg),
                 "heads_in_circuit": np.argwhere(circuit.get("heads", np.zeros((0, 2))) > 0).tolist(),
                 "utility": base_loss / float(lm_loss(lm.graphdef, params, jnp.asarray(held), held_valid, **masks)),
                 "attack_success": attack_success(lm, params, prompts, np.asarray(completion), **masks)
                 if same else None, "logits": logits}
        circuits.append(entry)
    return {"base_attack_success": base_asr, "base_clean_loss": base_loss, "circuits": circuits,
            "config": {"granularity": cfg.granularity, "kind": cfg.kind, "steps": steps}}


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

    faithful = [c for c in result["circuits"] if c["attack_success"] is not None and c["attack_success"] <= 0.05]
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
    if all(c["attack_success"] is not None for c in result["circuits"]):
        ax2.plot(xs, [c["attack_success"] for c in result["circuits"]], "s-", label="attack success")
    ax2.set_xlabel("% of heads + neurons ablated")
    ax2.legend()
    ax2.set_title("sparsity / faithfulness front", fontsize=9)
    fig.tight_layout()
    png = out / "circuits.png"
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return json_path, png
