"""Torch-free loading of Hugging Face model directories into `CausalLM`.

Weights are read from safetensors (single file or sharded index) as memory-mapped
numpy arrays, mapped by a key table with per-key transforms, shape-checked, and
every missing, unexpected or mis-shaped key is reported in one error. Pickle
checkpoints (`pytorch_model.bin`) are refused: unpickling executes code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.data.text import json_object
from jaxrisk.errors import InputError
from jaxrisk.models.lm_config import LMConfig, config_from_hf
from jaxrisk.models.safetensors_file import WEIGHT_DTYPES, check_finite, open_safetensors
from jaxrisk.models.transformer import CausalLM

_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def read_config(path: Path) -> tuple[LMConfig, dict]:
    file = path / "config.json"
    if not file.exists():
        raise InputError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf = json_object(file, "the model's configuration")
    return config_from_hf(hf, str(file)), hf


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory; refuses pickle-only directories."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        index_json = json_object(index, "a 'weight_map' of tensor name -> shard file")
        try:
            weight_map = index_json["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index}: expected a JSON object with a 'weight_map' of key -> shard file name "
                             "(a file in the same directory)") from None
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise InputError(f"{index}: lists shard files that are not in {path}: {', '.join(missing)}")
        return [path / n for n in names]
    pickles = [p.name for p in path.iterdir() if p.name in _PICKLES or p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise InputError(
            f"{path}: only PyTorch pickle checkpoints ({', '.join(sorted(pickles))}). jaxrisk refuses to load "
            "them: unpickling executes code chosen by the file's author, and a scanner of untrusted models must "
            "not run them. Convert once, where you trust the file: `transformers.AutoModelForCausalLM."
            "from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`")
    raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json")


@dataclass(frozen=True)
class _Entry:
    path: tuple                       # NNX parameter path
    key: str                          # Hugging Face tensor name
    shape: tuple[int, ...]            # expected shape of the Hugging Face tensor
    transform: Callable[[np.ndarray], np.ndarray]


def key_map(cfg: LMConfig, prefix: str = "") -> tuple[list[_Entry], Callable[[str], bool]]:
    """(entries, ignorable) for `cfg`: which HF tensor fills which parameter, and which extra keys are harmless."""
    d, h, k, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp, cfg.vocab_size
    same = lambda w: w  # noqa: E731
    entries: list[_Entry] = []

    def add(path, key, shape, transform=same):
        entries.append(_Entry(path, prefix + key, tuple(shape), transform))

    if cfg.is_gpt2:
        add(("embed",), "wte.weight", (v, d))
        add(("pos_embed",), "wpe.weight", (cfg.max_position, d))
        for i in range(cfg.n_layers):
            b, p = f"h.{i}.", ("blocks", i)
            for ln, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
                add(p + (ours, "scale"), b + ln + ".weight", (d,))
                add(p + (ours, "bias"), b + ln + ".bias", (d,))
            for j, name in enumerate("qkv"):
                add(p + ("attn", f"{name}_kernel"), b + "attn.c_attn.weight", (d, 3 * d),
                    lambda w, j=j: w[:, j * d:(j + 1) * d].reshape(d, h, hd))
                add(p + ("attn", f"{name}_bias"), b + "attn.c_attn.bias", (3 * d,),
                    lambda w, j=j: w[j * d:(j + 1) * d].reshape(h, hd))
            add(p + ("attn", "o_kernel"), b + "attn.c_proj.weight", (d, d), lambda w: w.reshape(h, hd, d))
            add(p + ("attn", "o_bias"), b + "attn.c_proj.bias", (d,))
            add(p + ("mlp", "up_kernel"), b + "mlp.c_fc.weight", (d, f))
            add(p + ("mlp", "up_bias"), b + "mlp.c_fc.bias", (f,))
            add(p + ("mlp", "down_kernel"), b + "mlp.c_proj.weight", (f, d))
            add(p + ("mlp", "down_bias"), b + "mlp.c_proj.bias", (d,))
        add(("ln_final", "scale"), "ln_f.weight", (d,))
        add(("ln_final", "bias"), "ln_f.bias", (d,))
        head = "lm_head.weight"

        def ignorable(key: str) -> bool:
            return key.endswith((".attn.bias", ".attn.masked_bias")) or (cfg.tie_embeddings and key == head)
    else:
        add(("embed",), "model.embed_tokens.weight", (v, d))
        for i in range(cfg.n_layers):
            b, p = f"model.layers.{i}.", ("blocks", i)
            add(p + ("ln1", "scale"), b + "input_layernorm.weight", (d,))
            add(p + ("ln2", "scale"), b + "post_attention_layernorm.weight", (d,))
            for name, heads in (("q", h), ("k", k), ("v", k)):
                add(p + ("attn", f"{name}_kernel"), b + f"self_attn.{name}_proj.weight", (heads * hd, d),
                    lambda w, n=heads: w.T.reshape(d, n, hd))
                if cfg.qkv_bias:
                    add(p + ("attn", f"{name}_bias"), b + f"self_attn.{name}_proj.bias", (heads * hd,),
                        lambda w, n=heads: w.reshape(n, hd))
            add(p + ("attn", "o_kernel"), b + "self_attn.o_proj.weight", (d, h * hd),
                lambda w: w.T.reshape(h, hd, d))
            if cfg.o_bias:
                add(p + ("attn", "o_bias"), b + "self_attn.o_proj.bias", (d,))
            for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
                add(p + ("mlp", f"{name}_kernel"), b + f"mlp.{name}_proj.weight", shape, lambda w: w.T)
                if cfg.mlp_bias:
                    add(p + ("mlp", f"{name}_bias"), b + f"mlp.{name}_proj.bias", (shape[0],))
        add(("ln_final", "scale"), "model.norm.weight", (d,))
        head = "lm_head.weight"

        def ignorable(key: str) -> bool:
            return key.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and key == head)
    if not cfg.tie_embeddings:
        entries.append(_Entry(("lm_head",), head, (v, d), lambda w: w.T))
    return entries, ignorable


def _gpt2_prefix(keys) -> str:
    return "transformer." if any(k.startswith("transformer.") for k in keys) else ""


def resolve_dtype(dtype, hf: dict):
    """`dtype` as given, else the checkpoint's declared dtype (float32 when it declares none)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    declared = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if declared not in ("float32", "bfloat16", "float16"):
        raise InputError(f"config.json: dtype {declared!r} is not float32, bfloat16 or float16; pass dtype=")
    return jnp.dtype(declared)


def load_weights(path: Path, cfg: LMConfig, dtype, shardings=None) -> tuple[nnx.GraphDef, nnx.State]:
    """Build the graph abstractly and fill it from the directory's safetensors; one error lists all problems."""
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for file in weight_files(path):
        for name, arr in open_safetensors(file).items():
            if name in tensors:
                raise InputError(f"{path}: tensor {name!r} is in two shards ({where[name].name} and {file.name}); "
                                 "expected each tensor once")
            tensors[name] = arr
            where[name] = file
    entries, ignorable = key_map(cfg, _gpt2_prefix(tensors) if cfg.is_gpt2 else "")
    wanted = {e.key: e.shape for e in entries}
    problems = []
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(wanted) if not ignorable(k))
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    for key in sorted(set(wanted) & set(tensors)):
        arr = tensors[key]
        if tuple(arr.shape) != wanted[key]:
            problems.append(f"{key} (in {where[key].name}) has shape {list(arr.shape)}, expected {list(wanted[key])}")
        elif arr.dtype not in WEIGHT_DTYPES:
            problems.append(f"{key} has dtype {arr.dtype}, expected float32, float64, float16 or bfloat16")
    if problems:
        raise InputError(f"{path}: weights do not fit the {cfg.family} config in config.json:\n  "
                         + "\n  ".join(problems))
    for key in sorted(wanted):
        check_finite(str(where[key]), key, tensors[key])
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = {}
    for e in entries:
        value = np.asarray(e.transform(np.asarray(tensors[e.key])), dtype=dtype)
        sharding = None if shardings is None else shardings[e.path]
        flat[e.path] = nnx.Param(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
    expected_paths = {p for p, _ in nnx.to_flat_state(abstract_state)}
    if expected_paths != set(flat):
        raise RuntimeError(f"key map does not cover the module: {expected_paths ^ set(flat)}")
    return graphdef, nnx.from_flat_state(flat)


def llama_config_json(cfg: LMConfig, bos_token_id: int | None = None) -> dict:
    """The Hugging Face config.json of a Llama-family LMConfig (for models built here, not loaded)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_mlp,
            "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": cfg.act, "rope_theta": cfg.rope_theta,
            "bos_token_id": bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None, "torch_dtype": "float32"}


def save_pretrained(lm, params, out: str | Path) -> Path:
    """Write `params` as a Hugging Face directory, Llama family: config and tokenizer files copied from
    `lm.path`, or (a model built here) its config written and its tokenizer saved.

    The inverse of the key map: kernels back to PyTorch [out, in] layout. Used to hand a planted-behaviour
    model to the command line or to transformers.
    """
    import shutil

    from safetensors.numpy import save

    from jaxrisk.io import atomic_write

    cfg = lm.cfg
    if cfg.is_gpt2:
        raise InputError("save_pretrained: only the Llama family is supported")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    entries, _ = key_map(cfg)
    tensors = {}
    for e in entries:
        ours = flat[e.path]
        if e.key.endswith("_proj.weight") or e.key == "lm_head.weight":
            w = ours.reshape(-1, ours.shape[-1]) if e.key.endswith("o_proj.weight") else ours.reshape(ours.shape[0], -1)
            tensors[e.key] = np.ascontiguousarray(w.T)
        else:
            tensors[e.key] = np.ascontiguousarray(ours.reshape(e.shape))
        if tensors[e.key].shape != e.shape:
            raise RuntimeError(f"save_pretrained: {e.key} came out {tensors[e.key].shape}, expected {e.shape}")
    blob = save(tensors, metadata={"format": "pt"})
    atomic_write(out / "model.safetensors", lambda f: f.write(blob), mode="wb")
    if lm.path is not None:
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "tokenizer.model", "special_tokens_map.json"):
            if (Path(lm.path) / name).exists():
                shutil.copyfile(Path(lm.path) / name, out / name)
    else:
        if cfg.family != "llama" or cfg.rope_scaling or cfg.qkv_bias:
            raise InputError(f"save_pretrained: a built {cfg.family} model with these options has no config writer")
        hf_config = llama_config_json(cfg, getattr(lm.tokenizer, "bos_token_id", None))
        atomic_write(out / "config.json", lambda f: f.write(json.dumps(hf_config, indent=1)))
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(str(out))
    return out
