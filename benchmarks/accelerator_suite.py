"""Every accelerator figure of the scale-out work, side by side with its reference, in one run (< 8 min on one GPU):

1. forward: tokens/s and model FLOP utilisation (MFU) of a [batch, length] forward pass at the Llama-3.2-1B and
   Llama-3-8B shapes (random weights, bfloat16), jaxrisk vs PyTorch transformers (sdpa attention);
2. gcg: GCG candidate evaluations/s and MFU at the 1B shape, fixed budget (early stop off), jaxrisk vs nanoGCG
   (run by `benchmarks/nanogcg_runner.py` in nanoGCG's own venv, given by --nanogcg-python; skipped without);
   both sides use the same random 1B model and a synthetic word-level tokenizer of the 1B vocabulary, with
   their round-trip filters on (every word-level candidate passes; each side pays for checking);
3. scan: the trigger scan vs the all-classes-at-once PyTorch Neural Cleanse (`benchmarks/scan_vs_torch.py`),
   on a trojaned and a clean model of a zoo (built here, 2 models, when --zoo is absent).

    python benchmarks/accelerator_suite.py --out runs/accel                 # on the GPU host
    python benchmarks/accelerator_suite.py --out runs/accel-smoke --smoke   # tiny shapes, any machine

Writes OUT/suite.json (every figure, the device, versions, date) and prints one line per figure. MFU counts the
matmul FLOPs (2 x parameters touched per token, lm_head included, embedding lookup not) plus causal attention
(2 x layers x length x heads x head_dim per token), over the device's dense bfloat16 peak (--peak-tflops, or
known for H100 / H200 / A100).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # PyTorch shares the device

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrisk.io import write_json  # noqa: E402
from jaxrisk.models.lm import LanguageModel, forward  # noqa: E402
from jaxrisk.models.lm_config import config_from_hf  # noqa: E402
from jaxrisk.models.named import NAMED_CONFIGS  # noqa: E402
from jaxrisk.redteam import PLAIN_GCG, GCGConfig  # noqa: E402
from jaxrisk.redteam.problem import GCGProblem, RoundTrip  # noqa: E402
from jaxrisk.search import RunConfig, run as engine_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lm_vs_torch import _median_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}   # dense bfloat16
TINY = dict(NAMED_CONFIGS["llama-3.2-1b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512, bos_token_id=1,
            eos_token_id=2)


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in kind), None)


def flops_per_token(cfg, context: int) -> float:
    """Forward FLOPs per token: matmuls (2 x parameters used per token) + causal attention at this context."""
    matmul = cfg.n_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    attention = 2 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim
    return 2 * matmul + attention


def torch_model(hf: dict, dtype: str, device: str):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, dtype))
    return model.eval()


def jax_forward_seconds(cfg, tokens, repeats: int) -> float:
    lm = LanguageModel.random(cfg, dtype=jnp.bfloat16)
    fwd = jax.jit(lambda p, t: forward(lm.graphdef, p, t)[0])
    return _median_seconds(lambda: fwd(lm.params, tokens).block_until_ready(), repeats)


def torch_forward_seconds(hf: dict, tokens, args) -> float:
    import torch

    model = torch_model(hf, "bfloat16", args.torch_device)
    tokens_t = torch.from_numpy(tokens.astype(np.int64)).to(args.torch_device)

    def run():
        with torch.inference_mode():
            model(tokens_t).logits
        if args.torch_device.startswith("cuda"):
            torch.cuda.synchronize()
    return _median_seconds(run, args.repeats)


def bench_forward(name: str, hf: dict, args, peak) -> dict:
    """Each side's model lives only while it is timed (an 8B model twice would crowd the device)."""
    cfg = config_from_hf(hf)
    batch, length = args.batch, args.length
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)
    t_jax = jax_forward_seconds(cfg, tokens, args.repeats)
    t_torch = torch_forward_seconds(hf, tokens, args)
    n_tok = batch * length
    per_tok = flops_per_token(cfg, length)
    row = {"shape": name, "batch": batch, "length": length, "jaxrisk_tok_s": n_tok / t_jax,
           "torch_tok_s": n_tok / t_torch, "ratio": t_torch / t_jax}
    if peak:
        row.update(jaxrisk_mfu=n_tok * per_tok / t_jax / peak, torch_mfu=n_tok * per_tok / t_torch / peak)
    return row


def save_word_tokenizer(vocab_size: int, directory: Path) -> None:
    """A word-level tokenizer of `vocab_size` tokens ("w3", "w4", ...) with a plain chat template, written as
    tokenizer.json + tokenizer_config.json (readable by old and new transformers): GCG on a random model of a
    real vocabulary size, with a round-trip filter both sides can apply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))


def jaxrisk_gcg_seconds(cfg, items, gcg: GCGConfig, steps: int, tokenizer) -> float:
    """One fixed-budget engine run of GCG lanes, round-trip filter on (timed after a first, compiling run)."""
    lm = LanguageModel.random(cfg, dtype=jnp.bfloat16)
    problem = GCGProblem(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.ones(cfg.vocab_size, bool),
                         init_suffix=jnp.full((gcg.suffix_len,), 3, jnp.int32), graphdef=lm.graphdef, cfg=gcg,
                         roundtrip=RoundTrip(tokenizer))
    run_cfg = RunConfig(max_steps=steps, chunk_steps=steps, progress=False, devices=1)
    return _median_seconds(lambda: engine_run(problem, items, run_cfg), 1)


def nanogcg_rate(hf: dict, args, workdir: Path, goal: str, target: str, steps: int, width: int, suffix: int) -> dict:
    """nanoGCG on the same random model (saved with a word-level tokenizer of its vocabulary), in its own venv."""
    nanogcg = Path(args.nanogcg_python) if args.nanogcg_python else None
    if nanogcg is None or not nanogcg.exists():
        return {"nanogcg": "skipped: no --nanogcg-python"}
    model_dir = workdir / "random-model"   # the tokenizer is there already
    torch_model(hf, "bfloat16", "cpu").save_pretrained(model_dir)
    behaviors = workdir / "behaviors.json"
    behaviors.write_text(json.dumps([{"goal": goal, "target": target}]))
    proc = subprocess.run([str(nanogcg), str(ROOT / "benchmarks" / "nanogcg_runner.py"), str(model_dir),
                           str(behaviors), str(steps), str(width), "256", str(suffix), "0", "0",
                           args.torch_device, "bfloat16"], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return {"nanogcg": f"failed: {proc.stderr[-500:]}"}
    row = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][0]
    return {"nanogcg_cand_s": row["candidates"] / row["seconds"]}


def bench_gcg(name: str, hf: dict, args, peak, workdir: Path) -> dict:
    cfg = config_from_hf(hf)
    width, steps, suffix, prompt, target, lanes = args.search_width, args.gcg_steps, 20, 16, 8, args.gcg_lanes
    gcg = GCGConfig(search_width=width, topk=min(256, cfg.vocab_size), suffix_len=suffix, early_stop=False,
                    **PLAIN_GCG)
    (workdir / "random-model").mkdir()
    save_word_tokenizer(cfg.vocab_size, workdir / "random-model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "random-model")
    rng = np.random.default_rng(0)
    ids = lambda *shape: rng.integers(3, cfg.vocab_size, shape).astype(np.int32)  # noqa: E731
    items = {"before": ids(lanes, prompt), "before_valid": np.ones((lanes, prompt), bool),
             "goal": ids(lanes, prompt), "goal_valid": np.ones((lanes, prompt), bool),
             "target": ids(lanes, target), "target_valid": np.ones((lanes, target), bool)}
    t = jaxrisk_gcg_seconds(cfg, items, gcg, steps, tokenizer)
    candidates = lanes * width * steps
    # per step and lane: B candidates forward over suffix + target tokens, and one gradient pass (~3 forwards)
    tokens = lanes * steps * (width + 3) * (suffix + target)
    row = {"shape": name, "lanes": lanes, "search_width": width, "steps": steps,
           "jaxrisk_cand_s": candidates / t}
    if peak:
        row["jaxrisk_mfu"] = tokens * flops_per_token(cfg, prompt + suffix + target) / t / peak
    words = lambda a: " ".join(f"w{i}" for i in a)  # noqa: E731
    row.update(nanogcg_rate(hf, args, workdir, words(items["goal"][0]), words(items["target"][0]), steps, width,
                            suffix))
    if "nanogcg_cand_s" in row:
        row["ratio_per_lane"] = row["jaxrisk_cand_s"] / lanes / row["nanogcg_cand_s"]
    return row


def bench_scan(args, workdir: Path) -> dict:
    zoo = Path(args.zoo) if args.zoo else workdir / "zoo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not args.zoo:
        subprocess.run([sys.executable, "-m", "jaxrisk", "zoo", "--mnist", args.mnist, "--out", str(zoo),
                        "--trojaned", "1", "--clean", "1", "--kinds", "patch", "--archs", "mnist_cnn",
                        "--max-epochs", "2" if args.smoke else "6", "--no-progress"], check=True, env=env)
    names = sorted(p.stem for p in zoo.glob("*.json"))
    out = workdir / "bench_scan.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scan_vs_torch.py"), "--mnist", args.mnist,
                    "--zoo", str(zoo), "--models", *names, "--torch-device", args.torch_device, "--skip-reference",
                    "--skip-same", "--out", str(out)], check=True, env=env, timeout=900)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/accel")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and budgets: checks the script, not the device")
    ap.add_argument("--sections", default="forward,gcg,scan")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--search-width", type=int, default=512)
    ap.add_argument("--gcg-steps", type=int, default=10)
    ap.add_argument("--gcg-lanes", type=int, default=8)
    ap.add_argument("--nanogcg-python", default=None, help="python of a venv with nanogcg (see gcg_vs_nanogcg.py)")
    ap.add_argument("--mnist", default=str(ROOT.parent / "shared" / "assets" / "data" / "mnist"))
    ap.add_argument("--zoo", default=None, help="a `jaxrisk zoo` directory (default: build 2 models here)")
    ap.add_argument("--torch-device", default="cuda" if jax.default_backend() == "gpu" else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.length, args.repeats, args.search_width, args.gcg_steps, args.gcg_lanes = 2, 32, 1, 16, 2, 2
    shapes = {"tiny": TINY} if args.smoke else {k: NAMED_CONFIGS[k] for k in ("llama-3.2-1b", "llama-3-8b")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = peak_flops(args)
    import torch

    record = {"date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind,
              "host": platform.processor() or platform.machine(), "jax": jax.__version__, "torch": torch.__version__,
              "peak_flops": peak, "smoke": args.smoke}
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "forward" in sections:
            record["forward"] = []
            for name, hf in shapes.items():
                record["forward"].append(bench_forward(name, hf, args, peak))
                print("forward", record["forward"][-1], flush=True)
        if "gcg" in sections:
            name = "tiny" if args.smoke else "llama-3.2-1b"
            record["gcg"] = bench_gcg(name, TINY if args.smoke else NAMED_CONFIGS[name], args, peak, Path(tmp))
            print("gcg", record["gcg"], flush=True)
        if "scan" in sections:
            record["scan"] = bench_scan(args, Path(tmp))
            print("scan", json.dumps(record["scan"])[:2000], flush=True)
    print(f"-> {write_json(out / 'suite.json', record)}")


if __name__ == "__main__":
    main()
