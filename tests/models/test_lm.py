"""Language-model ports against Hugging Face transformers (PyTorch, fp32, eager) on tiny random configs.

Each variant is built in PyTorch with random weights (biases and norms too),
saved with `save_pretrained`, and loaded back torch-free by `load_pretrained`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrisk.errors import InputError
from jaxrisk.models import load_pretrained
from jaxrisk.models.lm import forward, generate_ids, prefix_cache, target_logprobs
from jaxrisk.models.named import NAMED_CONFIGS

torch = pytest.importorskip("torch", reason="the parity tests need the PyTorch reference (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
LONG = 500

_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=300, max_position_embeddings=600)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "gpt2": ("GPT2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=600, vocab_size=300,
                          bos_token_id=0, eos_token_id=0)),
    "llama_mha_untied": ("Llama", dict(_BASE, num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa_tied_smollm": ("Llama", dict(_BASE, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)),
    "llama_mqa_bias": ("Llama", dict(_BASE, num_attention_heads=4, num_key_value_heads=1, attention_bias=True,
                                     mlp_bias=True, head_dim=24)),
    "llama31_rope_scaling": ("Llama", dict(_BASE, num_attention_heads=4, num_key_value_heads=2,
                                           rope_parameters=_LLAMA3_ROPE)),
    "llama2_linear_rope": ("Llama", dict(_BASE, num_attention_heads=4, num_key_value_heads=4,
                                         rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                          "factor": 4.0})),
    "mistral_sliding_window": ("Mistral", dict(_BASE, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=64)),
    "qwen2_bias_tied": ("Qwen2", dict(_BASE, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e6})),
}


def _reference(name: str, seed: int = 0):
    arch, kwargs = VARIANTS[name]
    config = getattr(transformers, f"{arch}Config")(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{arch}LMHeadModel" if arch == "GPT2" else f"{arch}ForCausalLM")(config).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():  # random everything, so biases and norm scales are exercised too
        for pname, p in model.named_parameters():
            base = 1.0 if ("norm" in pname or "ln_" in pname) and pname.endswith("weight") else 0.0
            p.copy_(base + 0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (reference torch model, directory)}; the GQA one is saved as a sharded index."""
    out = {}
    for name in VARIANTS:
        model = _reference(name)
        path = tmp_path_factory.mktemp(name)
        shard = "60KB" if name == "llama_gqa_tied_smollm" else "5GB"
        model.save_pretrained(path, max_shard_size=shard)
        out[name] = (model, path)
    return out


def _tokens(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, size=(batch, length)).astype(np.int32)


def _torch_logits(model, tokens: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64)), **kwargs).logits.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(saved, name):
    model, path = saved[name]
    lm = load_pretrained(path, dtype=jnp.float32)
    short = _tokens(3, 37)
    np.testing.assert_allclose(np.asarray(lm(short)), _torch_logits(model, short), atol=TOL, rtol=0)
    long = _tokens(1, LONG, seed=2)  # long enough for RoPE, scaling and sliding-window errors to show
    diff = np.abs(np.asarray(lm(long)) - _torch_logits(model, long)).max()
    assert diff <= TOL, f"{name}: max |logit diff| {diff:.2e} on a {LONG}-token input"


def test_sharded_index_was_used(saved):
    _, path = saved["llama_gqa_tied_smollm"]
    assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_tied_smollm", "mistral_sliding_window"])
def test_kv_cache_decoding_equals_full_forward(saved, name):
    lm = load_pretrained(saved[name][1])
    tokens = _tokens(2, 120, seed=3)
    full = np.asarray(lm(tokens))
    model_cache = nnx_cache(lm, batch=2, size=120)
    pieces = []
    logits, model_cache, _ = forward(lm.graphdef, lm.params, tokens[:, :90], cache=model_cache)
    pieces.append(np.asarray(logits))
    for t in range(90, 120):  # one token at a time, as generation does
        logits, model_cache, _ = forward(lm.graphdef, lm.params, tokens[:, t:t + 1], cache=model_cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def nnx_cache(lm, batch, size):
    from flax import nnx

    return nnx.merge(lm.graphdef, lm.params).init_cache(batch, size)


@pytest.mark.parametrize("name", ["gpt2", "llama_mqa_bias", "qwen2_bias_tied"])
def test_head_and_neuron_masks_match_zeroed_reference(saved, name):
    model, path = saved[name]
    lm = load_pretrained(path)
    cfg = lm.cfg
    tokens = _tokens(2, 40, seed=4)
    ones_h = jnp.ones((cfg.n_layers, cfg.n_heads))
    ones_f = jnp.ones((cfg.n_layers, cfg.d_mlp))
    plain = np.asarray(lm(tokens))
    np.testing.assert_array_equal(np.asarray(lm(tokens, head_mask_lh=ones_h, neuron_mask_lf=ones_f)), plain)

    layer, head, neurons = 1, 2, [3, 17, 50]
    head_mask = ones_h.at[layer, head].set(0.0)
    neuron_mask = ones_f.at[0, jnp.asarray(neurons)].set(0.0)
    ours = np.asarray(lm(tokens, head_mask_lh=head_mask, neuron_mask_lf=neuron_mask))
    ablated = _reference(name)
    hd = cfg.head_dim
    with torch.no_grad():  # the same ablation done by zeroing weights in the reference
        if cfg.is_gpt2:
            ablated.transformer.h[layer].attn.c_proj.weight[head * hd:(head + 1) * hd, :] = 0
            ablated.transformer.h[0].mlp.c_proj.weight[neurons, :] = 0
        else:
            ablated.model.layers[layer].self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] = 0
            ablated.model.layers[0].mlp.down_proj.weight[:, neurons] = 0
    np.testing.assert_allclose(ours, _torch_logits(ablated, tokens), atol=TOL, rtol=0)
    assert np.abs(ours - plain).max() > 1e-3  # the ablation really changed something


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_tied_smollm"])
def test_hooks_match_reference_hidden_states(saved, name):
    model, path = saved[name]
    lm = load_pretrained(path)
    tokens = _tokens(2, 30, seed=5)
    logits, acts = lm.run_with_cache(tokens)
    with torch.no_grad():
        hidden = model(torch.from_numpy(tokens.astype(np.int64)), output_hidden_states=True).hidden_states
    for i in range(lm.cfg.n_layers):
        np.testing.assert_allclose(np.asarray(acts[f"blocks.{i}.hook_resid_pre"]), hidden[i].numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(acts["ln_final.hook_normalized"]), hidden[-1].numpy(), atol=TOL)
    assert acts["blocks.0.attn.hook_z"].shape == (2, 30, lm.cfg.n_heads, lm.cfg.head_dim)
    assert acts["blocks.1.mlp.hook_post"].shape == (2, 30, lm.cfg.d_mlp)
    pattern = np.asarray(acts["blocks.0.attn.hook_pattern"])
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(pattern[0, 0], k=1) == 0)  # causal
    with pytest.raises(InputError, match="unknown hook"):
        lm.run_with_cache(tokens, names=["blocks.0.hook_nonsense"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "qwen2_bias_tied"])
def test_shared_prefix_scoring_equals_full_forward(saved, name):
    lm = load_pretrained(saved[name][1])
    prefix = _tokens(1, 25, seed=6)[0]
    middles = _tokens(6, 7, seed=7)
    target = _tokens(1, 5, seed=8)[0]
    scores = lm.score_targets(prefix, middles, target)
    full = np.concatenate([np.broadcast_to(prefix, (6, 25)), middles, np.broadcast_to(target, (6, 5))], axis=1)
    logp = jax.nn.log_softmax(lm(full), axis=-1)
    expected = np.take_along_axis(np.asarray(logp[:, 25 + 7 - 1:-1]), np.broadcast_to(target, (6, 5))[..., None],
                                  axis=-1)[..., 0].sum(-1)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
    assert np.ptp(scores) > 1e-3  # candidates really differ

    # From embeddings: the same scores, and a gradient w.r.t. one-hot tokens.
    cache = prefix_cache(lm.graphdef, lm.params, jnp.asarray(prefix), room=7 + 5 - 1)
    table = lm.params["embed"].get_value()
    targets = jnp.broadcast_to(jnp.asarray(target), (6, 5))

    def loss(one_hot):
        return -target_logprobs(lm.graphdef, lm.params, cache, one_hot @ table, targets).sum(-1)

    one_hot = jax.nn.one_hot(middles, lm.cfg.vocab_size)
    np.testing.assert_allclose(-np.asarray(loss(one_hot)), scores, atol=1e-4)
    grad = jax.grad(lambda x: loss(x).sum())(one_hot)
    assert grad.shape == one_hot.shape and np.isfinite(np.asarray(grad)).all() and np.abs(grad).max() > 0


@pytest.mark.slow
def test_left_padded_batch_generation_equals_one_by_one(saved):
    lm = load_pretrained(saved["llama_gqa_tied_smollm"][1])
    prompts = [list(_tokens(1, 9, seed=9)[0]), list(_tokens(1, 4, seed=10)[0])]
    together = lm.generate(prompts, max_new_tokens=12)
    alone = [lm.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone
    # Greedy generation with the cache equals re-running the full forward each step.
    seq = list(prompts[0])
    for _ in range(12):
        seq.append(int(np.argmax(np.asarray(lm(np.asarray([seq], np.int32)))[0, -1])))
    assert seq[9:] == alone[0][:12] or alone[0][-1] in lm.cfg.eos_token_ids


def test_sampling_is_seeded_and_respects_top_k(saved):
    lm = load_pretrained(saved["llama_mha_untied"][1])
    prompt = np.asarray([_tokens(1, 6, seed=11)[0]] * 4, np.int32)
    valid = np.ones_like(prompt, bool)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=3)
    a = generate_ids(lm.graphdef, lm.params, prompt, valid, jax.random.key(0), **kw)
    b = generate_ids(lm.graphdef, lm.params, prompt, valid, jax.random.key(0), **kw)
    c = generate_ids(lm.graphdef, lm.params, prompt, valid, jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and len({tuple(r) for r in np.asarray(a).tolist()}) > 1
    first = np.asarray(lm(prompt[:1]))[0, -1]
    assert set(np.asarray(a)[:, 0].tolist()) <= set(np.argsort(first)[-3:].tolist())


def test_sharded_load_matches_unsharded(saved):
    from jaxrisk.mesh import make_mesh

    _, path = saved["llama_gqa_tied_smollm"]
    mesh = make_mesh(8, fsdp=2, tensor=4)
    sharded = load_pretrained(path, mesh=mesh)
    attn = sharded.params["blocks"][0]["attn"]
    q, k = attn["q_kernel"].get_value(), attn["k_kernel"].get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)  # 4 heads over tensor=4
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)      # 2 kv heads: replicated
    assert len(q.sharding.device_set) == 8
    tokens = _tokens(2, 50, seed=12)
    np.testing.assert_allclose(np.asarray(sharded(tokens)), np.asarray(load_pretrained(path)(tokens)), atol=1e-5)


def test_bfloat16_load_tracks_float32(saved):
    _, path = saved["llama_gqa_tied_smollm"]
    half = load_pretrained(path, dtype="bfloat16")
    assert half.params["blocks"][0]["mlp"]["up_kernel"].get_value().dtype == jnp.bfloat16
    tokens = _tokens(2, 40, seed=13)
    full = np.asarray(load_pretrained(path)(tokens))
    ours = np.asarray(half(tokens))
    assert ours.dtype == np.float32 and np.abs(ours - full).max() < 0.1 * np.abs(full).max()


# ---- bad input: one clear error each -------------------------------------------------------------

def _copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pickle_only_directory_is_refused(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved["gpt2"][1] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InputError, match="refuses to load them: unpickling executes code.*save_pretrained"):
        load_pretrained(tmp_path)


def test_key_problems_are_listed_together(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy_dir(saved["llama_mha_untied"][1], tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    state["model.norm.weight"] = np.zeros(65, np.float32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(InputError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1): model.layers.0.extra.weight" in msg
    assert "model.norm.weight (in model.safetensors) has shape [65], expected [64]" in msg


@pytest.mark.parametrize("edit, expected", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
    ({"some_new_knob": 3}, "fields the port does not handle: some_new_knob=3"),
    ({"model_type": "falcon"}, "model_type 'falcon' is not ported"),
    ({"hidden_act": "tanh"}, "hidden_act='tanh'"),
    ({"num_key_value_heads": 3}, "not a multiple of n_kv_heads=3"),
])
def test_unhandled_config_is_an_error(saved, tmp_path, edit, expected):
    path = _copy_dir(saved["llama_mha_untied"][1], tmp_path / "m")
    hf = json.loads((path / "config.json").read_text())
    hf.update(edit)
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(InputError, match="config.json") as err:
        load_pretrained(path)
    assert expected in str(err.value)


def test_other_bad_directories(saved, tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(InputError, match="no config.json"):
        load_pretrained(tmp_path)
    path = _copy_dir(saved["gpt2"][1], tmp_path / "m")
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_pretrained(path)
    from jaxrisk.cli import main

    assert main(["inspect", "--model", str(tmp_path)]) == 2  # the CLI prints the same error, no traceback
    lm = load_pretrained(saved["gpt2"][1])
    with pytest.raises(InputError, match="integer token ids"):
        lm(np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match="exceeds the context"):
        lm(np.zeros((1, 601), np.int32))


# ---- full-size configs, shapes only ---------------------------------------------------------------

LLAMA3_8B, QWEN25_7B = NAMED_CONFIGS["llama-3-8b"], NAMED_CONFIGS["qwen2.5-7b"]
LLAMA31_8B = dict(LLAMA3_8B, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"})


@pytest.mark.parametrize("hf, n_params", [(LLAMA3_8B, 8_030_261_248), (LLAMA31_8B, 8_030_261_248),
                                          (QWEN25_7B, 7_615_616_512),
                                          (NAMED_CONFIGS["llama-3.2-1b"], 1_235_814_400)])
def test_full_size_configs_by_eval_shape(hf, n_params):
    from flax import nnx

    from jaxrisk.models.lm_config import config_from_hf
    from jaxrisk.models.sharding import sharded_fraction
    from jaxrisk.models.transformer import CausalLM

    cfg = config_from_hf(hf)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    assert sum(int(np.prod(s)) for s in shapes.values()) == n_params == cfg.n_params()
    mesh = jax.sharding.AbstractMesh((2, 8, 4), ("restarts", "fsdp", "tensor"))  # 28 heads: tensor 4
    assert sharded_fraction(shapes, mesh) < 1.01 / 32  # everything but the norms splits over fsdp x tensor
    logits = jax.eval_shape(lambda m: m(jnp.zeros((1, 16), jnp.int32))[0], abstract)
    assert logits.shape == (1, 16, hf["vocab_size"]) and logits.dtype == jnp.float32
