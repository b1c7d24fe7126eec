"""Language-model configs: one frozen dataclass, mapped from Hugging Face `config.json`.

Every field of a Hugging Face config is either mapped, known not to change the
forward pass (dropout, initialisation, token ids, bookkeeping), or an error:
a port that silently ignored, say, a YaRN RoPE scaling would score the wrong
model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from jaxrisk.errors import InputError, require_int, require_number

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")

# Fields of any Hugging Face config that do not change an inference forward pass.
_HARMLESS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "task_specific_params", "id2label", "label2id", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "use_return_dict", "tokenizer_class",
    "prefix", "problem_type", "finetuning_task", "pretraining_tp", "max_window_layers",
    "reorder_and_upcast_attn", "tie_encoder_decoder", "is_decoder", "is_encoder_decoder",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "pruned_heads", "bad_words_ids",
    "num_beams", "do_sample", "temperature", "top_k", "top_p", "max_length", "min_length",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "early_stopping", "n_ctx",
}

_ACTS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu", "relu")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Everything the forward pass depends on. Shapes: D=d_model, H=n_heads, K=n_kv_heads, F=d_mlp."""

    family: Literal["gpt2", "llama", "mistral", "qwen2"]   # Hugging Face model_type
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    max_position: int
    norm_eps: float
    act: str = "silu"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()   # sorted items of the HF rope parameters, minus theta
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "max_position"):
            require_int(name, getattr(self, name), 1)
        require_number("norm_eps", self.norm_eps, 0.0, above=True)
        require_number("rope_theta", self.rope_theta, 0.0, above=True)
        if self.sliding_window is not None:
            require_int("sliding_window", self.sliding_window, 1)
        for token in self.eos_token_ids:
            require_int("eos_token_id", token, 0)
        if self.family not in FAMILIES:
            raise InputError(f"family {self.family!r}: expected one of {', '.join(FAMILIES)}")
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.act not in _ACTS:
            raise InputError(f"act {self.act!r}: expected one of {', '.join(_ACTS)}")

    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def n_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, h, k, hd, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_mlp
        attn = d * hd * (h + 2 * k) + h * hd * d
        attn += hd * (h + 2 * k) * self.qkv_bias + d * self.o_bias
        mlp = d * f * (2 if self.is_gpt2 else 3) + (f + d) * self.mlp_bias
        norms = (2 if self.is_gpt2 else 1) * d * 2
        per_layer = attn + mlp + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.max_position * d if self.is_gpt2 else 0
        final = d * (2 if self.is_gpt2 else 1)
        return self.n_layers * per_layer + embed + pos + final


def inv_frequencies(cfg: LMConfig):
    """RoPE inverse frequencies [head_dim/2] in float32, with linear or Llama-3.1 scaling, as Hugging Face."""
    import numpy as np

    dim = cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    rope = cfg.rope
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(rope["factor"])
    elif kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_ctx = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def _eos(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _rope_from_hf(hf: dict, source: str, problems: list[str]) -> tuple[float, tuple]:
    params, legacy = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        problems.append("rope_parameters / rope_scaling must be JSON objects")
        return 10000.0, ()
    params = dict(params)
    for key, value in legacy.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    top = hf.get("rope_theta")
    theta = params.pop("rope_theta", 10000.0 if top is None else top)
    if top is not None and top != theta:
        problems.append(f"rope_theta={top!r} disagrees with rope_parameters.rope_theta={theta!r}")
    if not _positive(theta):
        problems.append(f"field rope_theta={theta!r}: expected a positive number")
        return 10000.0, ()
    theta = float(theta)
    kind = params.get("rope_type", "default")
    params["rope_type"] = kind
    if kind not in _ROPE_TYPES:
        problems.append(f"rope type {kind!r} (supported: {', '.join(_ROPE_TYPES)})")
        return theta, ()
    needed = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    for key in needed:
        if key not in params:
            problems.append(f"rope type {kind!r} needs field {key!r}")
    for key in needed:
        if key in params and not _positive(params[key]):
            problems.append(f"rope field {key}={params[key]!r}: expected a positive number")
    if kind == "llama3" and all(_positive(params.get(k)) for k in ("low_freq_factor", "high_freq_factor")) \
            and params["high_freq_factor"] <= params["low_freq_factor"]:
        problems.append("rope fields: llama3 needs high_freq_factor > low_freq_factor")
    extra = set(params) - set(needed) - {"rope_type"}
    if extra:
        problems.append(f"rope parameters not handled for {kind!r}: {', '.join(sorted(extra))}")
    if kind == "default":
        return theta, ()
    return theta, tuple(sorted(params.items()))


def config_from_hf(hf: dict, source: str = "config.json") -> LMConfig:
    """Map a Hugging Face config dict; every unhandled field or value is listed in one InputError."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise InputError(f"{source}: model_type {family!r} is not ported; supported: {', '.join(FAMILIES)} "
                         "(SmolLM, TinyLlama and Llama 2/3/3.1 are model_type 'llama')")
    problems: list[str] = []
    used: set[str] = set()

    def get(key, default=None, *alts):
        for k in (key, *alts):
            if k in hf:
                used.add(k)
                return hf[k]
        return default

    def need(key, *alts):
        value = get(key, None, *alts)
        if value is None:
            problems.append(f"missing field {key!r}")
            return 1
        return value

    def count(key, value):
        """`value` if it is a positive integer, else 1 with the problem recorded (so no division fails)."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"field {key}={value!r}: expected a positive integer")
            return 1
        return value

    def expect(key, ok, what):
        if key in hf:
            used.add(key)
            try:
                fine = ok(hf[key])
            except TypeError:   # e.g. a number where a list was expected
                fine = False
            if not fine:
                problems.append(f"field {key}={hf[key]!r}: only {what} is supported")

    if family == "gpt2":
        d = count("n_embd", need("n_embd"))
        heads = count("n_head", need("n_head"))
        act = get("activation_function", "gelu_new")
        kw = dict(vocab_size=count("vocab_size", need("vocab_size")), d_model=d,
                  n_layers=count("n_layer", need("n_layer")), n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
                  d_mlp=count("n_inner", get("n_inner") or 4 * d),
                  max_position=count("n_positions", need("n_positions")),
                  norm_eps=get("layer_norm_epsilon", 1e-5),
                  act=act, tie_embeddings=get("tie_word_embeddings", True), qkv_bias=True, o_bias=True,
                  mlp_bias=True)
        expect("scale_attn_weights", lambda v: v is True, "true")
        expect("scale_attn_by_inverse_layer_idx", lambda v: v is False, "false")
        expect("add_cross_attention", lambda v: v is False, "false")
        theta, scaling = 10000.0, ()
    else:
        d = count("hidden_size", need("hidden_size"))
        heads = count("num_attention_heads", need("num_attention_heads"))
        kv = count("num_key_value_heads", get("num_key_value_heads") or heads)
        head_dim = count("head_dim", get("head_dim") or d // heads)
        theta, scaling = _rope_from_hf(hf, source, problems)
        used.update({"rope_parameters", "rope_scaling", "rope_theta"})
        bias = bool(get("attention_bias", False))
        window = None
        if family == "mistral":
            window = get("sliding_window")
            window = None if window is None else count("sliding_window", window)
        if family == "qwen2":
            expect("use_sliding_window", lambda v: v is False, "false")
            get("sliding_window")
            expect("layer_types", lambda v: all(t == "full_attention" for t in v), "all 'full_attention'")
            bias = True
        kw = dict(vocab_size=count("vocab_size", need("vocab_size")), d_model=d,
                  n_layers=count("num_hidden_layers", need("num_hidden_layers")), n_heads=heads, n_kv_heads=kv,
                  head_dim=head_dim, d_mlp=count("intermediate_size", need("intermediate_size")),
                  max_position=count("max_position_embeddings", get("max_position_embeddings", 2048)),
                  norm_eps=get("rms_norm_eps", 1e-6),
                  act=get("hidden_act", "silu"), tie_embeddings=bool(get("tie_word_embeddings", False)),
                  qkv_bias=bias, o_bias=bias and family == "llama", mlp_bias=bool(get("mlp_bias", False)),
                  rope_theta=theta, rope_scaling=scaling, sliding_window=window)
        expect("hidden_act", lambda v: v in ("silu", "gelu", "gelu_pytorch_tanh", "relu"), "silu/gelu/relu")
        if family == "llama" and "layer_types" in hf:
            expect("layer_types", lambda v: all(t == "full_attention" for t in v), "all 'full_attention'")
    expect("activation_function", lambda v: v in _ACTS, "/".join(_ACTS))
    unknown = sorted(set(hf) - used - _HARMLESS)
    if unknown:
        problems.append("fields the port does not handle: "
                        + ", ".join(f"{k}={hf[k]!r}" for k in unknown)[:2000])
    if problems:
        raise InputError(f"{source}: cannot build a {family} model:\n  " + "\n  ".join(problems))
    try:
        return LMConfig(family=family, eos_token_ids=_eos(hf), **kw)
    except InputError as e:
        raise InputError(f"{source}: {e}") from None
    except TypeError as e:
        raise InputError(f"{source}: a field has the wrong type ({e})") from None
