"""jaxrisk language-model ports vs Hugging Face transformers (PyTorch), same weights, one process.

Two measurements per model:
- forward throughput (tokens/s) on a [batch, length] block of token ids;
- batched target scoring in the shape a GCG step needs: one shared prompt
  prefix, 512 candidate suffixes, a fixed target; log p(target | prefix +
  suffix) for each candidate (candidates/s). PyTorch is run two ways: the
  plain full-sequence forward, and with the prefix KV cache expanded over the
  batch (what nanoGCG does).

Models: the real pretrained stories260K (when ../shared/assets is present) and
a randomly initialised model of the stories15M shape (dim 288, 6 layers, vocab
32000), built in PyTorch, saved with save_pretrained, loaded by jaxrisk.
Compilation is excluded (one warm-up call each side); the median of repeats is
reported.

    python benchmarks/lm_vs_torch.py --out runs/bench_lm.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxrisk.io import write_json
from jaxrisk.models import load_pretrained
from jaxrisk.models.lm import _score, forward, prefix_cache

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "assets" / "models" / "tinyllamas-stories260K"


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compilation (JAX) / allocator (PyTorch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_model_dir(tmp: Path) -> Path:
    """stories15M's shape, random weights, saved as a Hugging Face directory."""
    config = transformers.LlamaConfig(hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                                      num_attention_heads=6, num_key_value_heads=6, vocab_size=32000,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp)
    return tmp


def bench_model(name: str, path: Path, *, batch: int, length: int, prefix: int, suffix: int, target: int,
                candidates: int, repeats: int) -> dict:
    lm = load_pretrained(path, dtype=jnp.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = lm.cfg.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    tokens_t = torch.from_numpy(tokens.astype(np.int64))

    with torch.inference_mode():
        torch_fwd = _median_seconds(lambda: ref(tokens_t).logits, repeats)
    jax_fwd = _median_seconds(lambda: forward(lm.graphdef, lm.params, tokens)[0].block_until_ready(), repeats)
    with torch.inference_mode():  # same numbers, as a sanity check on the comparison itself
        diff = float(np.abs(np.asarray(lm(tokens)) - ref(tokens_t).logits.numpy()).max())

    pre = rng.integers(3, vocab, size=prefix).astype(np.int32)
    mids = rng.integers(3, vocab, size=(candidates, suffix)).astype(np.int32)
    tgt = rng.integers(3, vocab, size=target).astype(np.int32)
    tgt_b = np.broadcast_to(tgt, (candidates, target))

    def jax_score():
        cache = prefix_cache(lm.graphdef, lm.params, jnp.asarray(pre), room=suffix + target - 1)
        return _score(lm.graphdef, lm.params, cache, jnp.asarray(mids), jnp.asarray(tgt_b)).sum(-1).block_until_ready()

    full_t = torch.from_numpy(np.concatenate([np.broadcast_to(pre, (candidates, prefix)), mids, tgt_b[:, :-1]],
                                             axis=1).astype(np.int64))
    tail_t = torch.from_numpy(np.concatenate([mids, tgt_b[:, :-1]], axis=1).astype(np.int64))
    tgt_t = torch.from_numpy(tgt_b.astype(np.int64))

    def logprob(logits):
        return torch.log_softmax(logits.float(), -1).gather(-1, tgt_t[..., None])[..., 0].sum(-1)

    def torch_full():
        return logprob(ref(full_t, logits_to_keep=target).logits)

    def torch_prefix_cache():
        out = ref(torch.from_numpy(pre[None].astype(np.int64)), use_cache=True)
        cache = copy.deepcopy(out.past_key_values)
        cache.batch_repeat_interleave(candidates)
        return logprob(ref(tail_t, past_key_values=cache, logits_to_keep=target).logits)

    with torch.inference_mode():
        t_full = _median_seconds(torch_full, repeats)
        t_cache = _median_seconds(torch_prefix_cache, repeats)
        score_diff = float(np.abs(np.asarray(jax_score()) - torch_full().numpy()).max())
    t_jax = _median_seconds(jax_score, repeats)
    n_tok = batch * length
    return {
        "model": name, "parameters": lm.n_params(),
        "forward": {"shape": [batch, length], "torch_tok_s": n_tok / torch_fwd, "jaxrisk_tok_s": n_tok / jax_fwd,
                    "speedup": torch_fwd / jax_fwd, "max_logit_diff": diff},
        "scoring": {"prefix": prefix, "suffix": suffix, "target": target, "candidates": candidates,
                    "torch_full_cand_s": candidates / t_full, "torch_prefix_cache_cand_s": candidates / t_cache,
                    "jaxrisk_cand_s": candidates / t_jax, "speedup_vs_full": t_full / t_jax,
                    "speedup_vs_prefix_cache": t_cache / t_jax, "max_score_diff": score_diff},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_lm.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=512)
    args = ap.parse_args()
    results = []
    shape = dict(prefix=40, suffix=20, target=10, candidates=args.candidates, repeats=args.repeats)
    if STORIES.exists():
        results.append(bench_model("stories260K (pretrained)", STORIES, batch=8, length=256, **shape))
    with tempfile.TemporaryDirectory() as tmp:
        results.append(bench_model("stories15M shape (random)", random_model_dir(Path(tmp)), batch=8, length=256,
                                   **shape))
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "jax_device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads(),
              "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
              "results": results}
    for r in results:
        f, s = r["forward"], r["scoring"]
        print(f"{r['model']}: forward {f['shape']} torch {f['torch_tok_s']:,.0f} tok/s, jaxrisk "
              f"{f['jaxrisk_tok_s']:,.0f} tok/s ({f['speedup']:.2f}x, max diff {f['max_logit_diff']:.1e})")
        print(f"  scoring 1 prefix x {s['candidates']} suffixes: torch full {s['torch_full_cand_s']:,.0f} cand/s, "
              f"torch prefix-cache {s['torch_prefix_cache_cand_s']:,.0f}, jaxrisk {s['jaxrisk_cand_s']:,.0f} "
              f"({s['speedup_vs_full']:.2f}x vs full, {s['speedup_vs_prefix_cache']:.2f}x vs prefix cache; "
              f"max diff {s['max_score_diff']:.1e})")
    print(f"-> {write_json(args.out, record)}")


if __name__ == "__main__":
    main()
