"""Audit cost: jaxrisk's simulated updates vs a PyTorch loop doing the same steps with torch.func.

The same work on both sides, on the real stories260K: R lanes (SGD at two learning rates, Adam at two,
`--draws` batch draws each), each taking k steps on its own batches of 32 update rows (48 tokens), and
after every step measuring the behaviour (target log-prob and greedy success of 32 prompt + target rows)
and the drift (KL on 16 clean rows). jaxrisk: the fragility `Lookahead` problem on the engine (all lanes
in one compiled program). PyTorch: Hugging Face's LlamaForCausalLM, `torch.func.functional_call` +
`torch.func.grad`, SGD / Adam written out, lane after lane. Both start from the same weights and batches;
the final target log-probs are compared lane by lane (parity). jaxrisk's time is given with compilation
(one audit as a user runs it) and without (steady state: the difference between a 3k-step and a k-step
run of the same compiled chunk, per step).

    python benchmarks/fragility_vs_torch.py --out runs/bench_fragility.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxrisk.data.batch import answer_rows
from jaxrisk.fragility.problem import Lookahead, clean_logprobs
from jaxrisk.fragility.run import direction_keys
from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.search import engine
from jaxrisk.search.config import RunConfig
from jaxrisk.zoo.lm_backdoor import sample_clean
from jaxrisk.zoo.lm_refusal import RefusalConfig, requests

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"


def workload(lm, draws: int, k: int, batch: int = 32):
    rows = sample_clean(lm, 256, 48, seed=7)
    prompts = [np.asarray(lm.tokenizer(t)["input_ids"], np.int32) for t, _ in requests(RefusalConfig(), True)[:32]]
    target = np.asarray(lm.tokenizer(" I will hurt you.", add_special_tokens=False)["input_ids"], np.int32)
    b_tokens, b_weight = answer_rows(prompts, [target] * len(prompts))
    lrs, adam = [1e-2, 1e-1, 1e-4, 1e-3], [False, False, True, True]
    lanes = {"learning_rate": [], "adam": [], "batches": []}
    for lr, a in zip(lrs, adam):
        for d in range(draws):
            rng = np.random.default_rng([0, d])
            lanes["learning_rate"].append(lr)
            lanes["adam"].append(a)
            lanes["batches"].append(np.stack([rng.choice(len(rows), batch, replace=False) for _ in range(3 * k)]))
    lanes = {"learning_rate": np.asarray(lanes["learning_rate"], np.float32), "adam": np.asarray(lanes["adam"]),
             "batches": np.asarray(lanes["batches"], np.int32),
             "direction_key": direction_keys(0, len(lanes["learning_rate"]))}
    loss_mask = np.ones(rows.shape, np.float32)
    loss_mask[:, 0] = 0
    return rows.astype(np.int32), loss_mask, b_tokens, b_weight.astype(np.float32), lanes


def run_jax(lm, rows, loss_mask, b_tokens, b_weight, lanes, k):
    clean = jnp.asarray(rows[:16])
    problem = Lookahead(params=lm.params, update_tokens=jnp.asarray(rows), update_loss_mask=jnp.asarray(loss_mask),
                        behaviour_tokens=jnp.asarray(b_tokens), behaviour_weight=jnp.asarray(b_weight),
                        clean_tokens=clean, clean_valid=jnp.ones(clean.shape, bool),
                        base_clean_logp=clean_logprobs(lm.graphdef, lm.params, clean), graphdef=lm.graphdef,
                        random_directions=0)
    times = {}
    # the first run of each length compiles (the history buffer is sized by the steps); the timed ones reuse it
    for name, steps in (("first", k), ("first_3k", 3 * k), (k, k), (3 * k, 3 * k)):
        t0 = time.perf_counter()
        res = engine.run(problem, lanes, RunConfig(max_steps=steps, chunk_steps=k, devices=1, progress=False))
        times[name] = time.perf_counter() - t0
    return res.metrics["target_logprob"], times


def run_torch(path, rows, loss_mask, b_tokens, b_weight, lanes, k, device):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval().to(device)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows_t, mask_t = torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(loss_mask, device=device)
    b_t = torch.as_tensor(b_tokens, dtype=torch.long, device=device)
    bw_t = torch.as_tensor(b_weight, device=device)
    clean = rows_t[:16]

    def logits(params, tokens):
        return torch.func.functional_call(model, params, (tokens,)).logits

    def loss_fn(params, tokens, mask):
        logp = torch.log_softmax(logits(params, tokens[:, :-1]), -1)
        picked = logp.gather(-1, tokens[:, 1:, None])[..., 0]
        return -(picked * mask[:, 1:]).sum() / mask[:, 1:].sum().clamp(min=1)

    grad_fn = torch.func.grad(loss_fn)
    with torch.no_grad():
        base_clean = torch.log_softmax(logits(base, clean[:, :-1]), -1)
    grad_fn(base, rows_t[:32], mask_t[:32])     # warm-up (CUDA context, kernels' first load), as jax's compile
    out = np.zeros((k, len(lanes["learning_rate"])), np.float32)
    t0 = time.perf_counter()
    for lane in range(len(lanes["learning_rate"])):
        lr, adam = float(lanes["learning_rate"][lane]), bool(lanes["adam"][lane])
        params = {n: p.clone() for n, p in base.items()}
        mu = {n: torch.zeros_like(p) for n, p in params.items()}
        nu = {n: torch.zeros_like(p) for n, p in params.items()}
        for t in range(k):
            idx = torch.as_tensor(lanes["batches"][lane, t], dtype=torch.long, device=device)
            grads = grad_fn(params, rows_t[idx], mask_t[idx])
            with torch.no_grad():
                for n in params:
                    g = grads[n]
                    if adam:
                        mu[n] = 0.9 * mu[n] + 0.1 * g
                        nu[n] = 0.999 * nu[n] + 0.001 * g * g
                        step = (mu[n] / (1 - 0.9 ** (t + 1))) / ((nu[n] / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
                    else:
                        step = g
                    params[n] = params[n] - lr * step
                b_logits = logits(params, b_t[:, :-1])
                lp = torch.log_softmax(b_logits, -1).gather(-1, b_t[:, 1:, None])[..., 0]
                target_lp = (lp * bw_t).sum(-1)
                success = ((b_logits.argmax(-1) == b_t[:, 1:]) | (bw_t == 0)).all(-1).float().mean()
                c_logp = torch.log_softmax(logits(params, clean[:, :-1]), -1)
                kl = (base_clean.exp() * (base_clean - c_logp)).sum(-1).mean()
                del success, kl   # measured as jaxrisk measures them; only the log-prob is compared
                out[t, lane] = float(target_lp.mean())
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_fragility.json"))
    ap.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the PyTorch loop runs (default: the GPU when there is one)")
    ap.add_argument("--jax-matmul-precision", default="highest", choices=["default", "high", "highest"],
                    help="highest: full float32 products, as PyTorch's default (default: TF32 on recent GPUs)")
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", args.jax_matmul_precision)
    lm = load_pretrained(args.model)
    rows, loss_mask, b_tokens, b_weight, lanes = workload(lm, args.draws, args.k)
    lanes_k = dict(lanes, batches=lanes["batches"][:, : args.k])
    n_lanes = len(lanes["learning_rate"])
    jax_logp, jax_times = run_jax(lm, rows, loss_mask, b_tokens, b_weight, lanes, args.k)
    torch_logp, torch_seconds = run_torch(args.model, rows, loss_mask, b_tokens, b_weight, lanes_k, args.k,
                                             args.torch_device)
    lane_steps = n_lanes * args.k
    steady = (jax_times[3 * args.k] - jax_times[args.k]) / (2 * lane_steps)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, jax {jax.devices()[0].device_kind}, "
                   f"torch {args.torch_device} (threads {torch.get_num_threads()})",
        "jax_matmul_precision": args.jax_matmul_precision, "lanes": n_lanes, "steps": args.k, "batch": 32,
        "update_rows_tokens": 48, "behaviours": 32, "clean_rows": 16,
        "torch_seconds_per_lane_step": torch_seconds / lane_steps,
        "jaxrisk_seconds_per_lane_step_with_compile": jax_times["first"] / lane_steps,
        "jaxrisk_seconds_per_lane_step_steady": steady,
        "speedup_with_compile": torch_seconds / jax_times["first"],
        "speedup_steady": (torch_seconds / lane_steps) / steady,
        "parity_max_abs_target_logprob": float(np.max(np.abs(jax_logp[: args.k] - torch_logp))),
    }
    write_json(args.out, result)
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
