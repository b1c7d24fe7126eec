"""Full-size model configurations by name (Hugging Face `config.json` contents), for planning and benchmarks
at realistic shapes without the weights: `jaxrisk plan --config NAME`, `benchmarks/accelerator_suite.py`."""

from __future__ import annotations

from jaxrisk.errors import InputError
from jaxrisk.models.lm_config import LMConfig, config_from_hf

_LLAMA3 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 128000, "eos_token_id": 128001, "initializer_range": 0.02, "mlp_bias": False,
           "pretraining_tp": 1, "torch_dtype": "bfloat16", "use_cache": True}

NAMED_CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         tie_word_embeddings=True,
                         rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       tie_word_embeddings=False, rope_scaling=None),
    "qwen2.5-7b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
                   "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 131072,
                   "tie_word_embeddings": False, "use_sliding_window": False, "hidden_act": "silu",
                   "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
                   "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True},
}


def named_config(name: str) -> LMConfig:
    if name not in NAMED_CONFIGS:
        raise InputError(f"--config {name!r}: expected one of {', '.join(NAMED_CONFIGS)}")
    return config_from_hf(NAMED_CONFIGS[name], f"the named configuration {name}")
