"""Flax NNX decoder-only transformers: GPT-2 and the Llama family in one module.

One forward pass serves everything later work needs:
- tokens or input embeddings (gradients w.r.t. one-hot tokens);
- a key/value cache of fixed size (generation, and a shared prompt prefix
  computed once and broadcast over a batch of candidate suffixes);
- multiplicative masks on attention heads (on each head's output, before the
  output projection) and on MLP hidden neurons, as arrays so they can be learned;
- activations recorded under TransformerLens' canonical hook names.

Layouts: kernels are [in, out] with heads split out (q: [D, H, Dh], o: [H, Dh, D]).
Norms and softmax run in float32 whatever the parameter dtype, as in Hugging Face.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.models.lm_config import LMConfig, inv_frequencies

Cache = dict[str, Any]   # {"k": (L x [B,S,K,Dh]), "v": same, "valid": [B,S] bool, "slot": [] int32, "pos": [B] int32}

_ACT = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


_MASKED = -1e30  # finite, so a fully masked row (a padding query) stays finite
_CAUSAL_CHUNK = 64  # query block of the no-cache attention


class Recorder:
    """Collects the activations whose TransformerLens names were asked for (names are static)."""

    def __init__(self, names=()):
        self.names = frozenset(names)
        self.acts: dict[str, jax.Array] = {}

    def wants(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, value: jax.Array) -> None:
        if name in self.names:
            self.acts[name] = value


def _param(shape, dtype, rngs: nnx.Rngs, std: float = 0.02, zeros=False, ones=False) -> nnx.Param:
    if ones:
        return nnx.Param(jnp.ones(shape, dtype))
    if zeros:
        return nnx.Param(jnp.zeros(shape, dtype))
    return nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(dtype))


class Norm(nnx.Module):
    """RMSNorm (Llama) or LayerNorm (GPT-2), computed in float32."""

    def __init__(self, d: int, *, layer_norm: bool, eps: float, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param((d,), dtype, rngs, ones=True)
        self.bias = _param((d,), dtype, rngs, zeros=True) if layer_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        if self.bias is None:
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            return self.scale[...] * y.astype(x.dtype)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attend(q_bthd, k_bskd, v_bskd, bias_bts):
    """Grouped-query softmax attention -> (z [B,T,H,Dh], scores, pattern [B,K,G,T,S] float32).

    Head-major layouts, q scaled before the dot and an additive mask: XLA's CPU
    backend runs this 3-4x faster than einsums over [B,T,K,G,Dh] with a `where`.
    """
    b, t, h, hd = q_bthd.shape
    k = k_bskd.shape[2]
    q5 = (q_bthd * (1 / np.sqrt(hd)).astype(q_bthd.dtype)).reshape(b, t, k, h // k, hd).transpose(0, 2, 3, 1, 4)
    kh, vh = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)            # [B, K, S, Dh]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q5, kh).astype(jnp.float32) + bias_bts[:, None, None]
    pattern = jax.nn.softmax(scores, axis=-1)
    z = jnp.einsum("bkgts,bksd->bkgtd", pattern.astype(vh.dtype), vh)
    return z.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd), scores, pattern


def _ablate(x, mask, mean):
    """x * mask, or with a mean (same trailing shape as x's unit axes) x * mask + mean * (1 - mask)."""
    mask = mask.astype(x.dtype)
    return x * mask if mean is None else x * mask + mean.astype(x.dtype) * (1 - mask)


class Attention(nnx.Module):
    def __init__(self, cfg: LMConfig, *, dtype, rngs: nnx.Rngs):
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, hd
        self.q_kernel = _param((d, h, hd), dtype, rngs)
        self.k_kernel = _param((d, k, hd), dtype, rngs)
        self.v_kernel = _param((d, k, hd), dtype, rngs)
        self.o_kernel = _param((h, hd, d), dtype, rngs)
        self.q_bias = _param((h, hd), dtype, rngs, zeros=True) if cfg.qkv_bias else None
        self.k_bias = _param((k, hd), dtype, rngs, zeros=True) if cfg.qkv_bias else None
        self.v_bias = _param((k, hd), dtype, rngs, zeros=True) if cfg.qkv_bias else None
        self.o_bias = _param((d,), dtype, rngs, zeros=True) if cfg.o_bias else None

    def __call__(self, x_btd, rope_btd, bias_bts, k_cache, v_cache, slot, head_mask_h, head_mean_hk, rec, prefix):
        def proj(kernel, bias):
            y = jnp.einsum("btd,dhk->bthk", x_btd, kernel[...])
            return y if bias is None else y + bias[...]

        q = proj(self.q_kernel, self.q_bias)          # [B, T, H, Dh]
        k = proj(self.k_kernel, self.k_bias)          # [B, T, K, Dh]
        v = proj(self.v_kernel, self.v_bias)
        if rope_btd is not None:
            cos, sin = (c[:, :, None, :].astype(q.dtype) for c in rope_btd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        rec(prefix + "hook_q", q)
        rec(prefix + "hook_k", k)
        rec(prefix + "hook_v", v)
        if k_cache is None:   # no cache: the T new positions are all there is
            k_all, v_all = k, v
        else:
            k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, slot, 0, 0))  # [B, S, K, Dh]
            v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, slot, 0, 0))
        b, t, h, hd = q.shape
        wants_pattern = rec.wants(prefix + "hook_attn_scores") or rec.wants(prefix + "hook_pattern")
        if k_cache is None and t > 2 * _CAUSAL_CHUNK and not wants_pattern:
            # Causal blocks: query block [s, e) only needs keys [0, e), which skips ~half the work.
            z = jnp.concatenate([
                _attend(q[:, s:s + _CAUSAL_CHUNK], k_all[:, :s + _CAUSAL_CHUNK], v_all[:, :s + _CAUSAL_CHUNK],
                        bias_bts[:, s:s + _CAUSAL_CHUNK, :s + _CAUSAL_CHUNK])[0]
                for s in range(0, t, _CAUSAL_CHUNK)], axis=1)
        else:
            z, scores, pattern = _attend(q, k_all, v_all, bias_bts)
            rec(prefix + "hook_attn_scores", scores.reshape(b, h, t, -1))
            rec(prefix + "hook_pattern", pattern.reshape(b, h, t, -1))
        rec(prefix + "hook_z", z)
        if head_mask_h is not None:
            z = _ablate(z, head_mask_h[:, None], head_mean_hk)
        out = jnp.einsum("bthk,hkd->btd", z, self.o_kernel[...])
        if self.o_bias is not None:
            out = out + self.o_bias[...]
        return out, k_all, v_all


class MLP(nnx.Module):
    """SwiGLU (Llama family) or a plain two-layer MLP (GPT-2)."""

    def __init__(self, cfg: LMConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_mlp
        self.act = cfg.act
        self.gate_kernel = None if cfg.is_gpt2 else _param((d, f), dtype, rngs)
        self.gate_bias = _param((f,), dtype, rngs, zeros=True) if cfg.mlp_bias and not cfg.is_gpt2 else None
        self.up_kernel = _param((d, f), dtype, rngs)
        self.up_bias = _param((f,), dtype, rngs, zeros=True) if cfg.mlp_bias else None
        self.down_kernel = _param((f, d), dtype, rngs)
        self.down_bias = _param((d,), dtype, rngs, zeros=True) if cfg.mlp_bias else None

    def __call__(self, x_btd, neuron_mask_f, neuron_mean_f, rec, prefix):
        def dense(kernel, bias, x):
            y = x @ kernel[...]
            return y if bias is None else y + bias[...]

        act = _ACT[self.act]
        if self.gate_kernel is None:
            pre = dense(self.up_kernel, self.up_bias, x_btd)
            rec(prefix + "hook_pre", pre)
            post = act(pre)
        else:
            pre = dense(self.gate_kernel, self.gate_bias, x_btd)
            rec(prefix + "hook_pre", pre)
            pre_linear = dense(self.up_kernel, self.up_bias, x_btd)
            rec(prefix + "hook_pre_linear", pre_linear)
            post = act(pre) * pre_linear
        rec(prefix + "hook_post", post)
        if neuron_mask_f is not None:
            post = _ablate(post, neuron_mask_f, neuron_mean_f)
        return dense(self.down_kernel, self.down_bias, post)


class Block(nnx.Module):
    def __init__(self, cfg: LMConfig, *, dtype, rngs: nnx.Rngs):
        norm = dict(layer_norm=cfg.is_gpt2, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.ln1 = Norm(cfg.d_model, **norm)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.ln2 = Norm(cfg.d_model, **norm)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)


class CausalLM(nnx.Module):
    """Decoder-only LM. `__call__` returns (logits [B,T,V] float32, updated cache, recorded activations)."""

    def __init__(self, cfg: LMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.embed = _param((cfg.vocab_size, cfg.d_model), dtype, rngs)
        self.pos_embed = _param((cfg.max_position, cfg.d_model), dtype, rngs) if cfg.is_gpt2 else None
        self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_final = Norm(cfg.d_model, layer_norm=cfg.is_gpt2, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else _param((cfg.d_model, cfg.vocab_size), dtype, rngs)

    def init_cache(self, batch: int, size: int) -> Cache:
        """An empty cache with room for `size` positions."""
        shape = (batch, size, self.cfg.n_kv_heads, self.cfg.head_dim)
        empty = tuple(jnp.zeros(shape, self.dtype) for _ in range(self.cfg.n_layers))
        return {"k": empty, "v": empty, "valid": jnp.zeros((batch, size), bool),
                "slot": jnp.zeros((), jnp.int32), "pos": jnp.zeros((batch,), jnp.int32)}

    def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens_bt, axis=0)

    def __call__(self, tokens_bt=None, *, embeds_btd=None, valid_bt=None, cache: Cache | None = None,
                 head_mask_lh=None, neuron_mask_lf=None, head_mean_lhk=None, neuron_mean_lf=None, capture=(),
                 logits=True, logits_from: int = 0, n_layers: int | None = None):
        """Run T new positions. `valid_bt` marks real tokens (False = padding, e.g. left padding).

        Head / neuron masks scale each head's output z and each MLP neuron's activation (0 = zero ablation);
        with `head_mean_lhk` / `neuron_mean_lf` a masked-out unit is replaced by that value instead (mean
        ablation: z * m + mean * (1 - m)).

        Without `cache` the T positions attend to each other causally; with it they
        are written at `cache["slot"]` and also attend to everything valid before.
        Logits are computed for positions `logits_from:` only (all by default), none
        with `logits=False`: scoring a short target needs a small slice of [B, T, V].
        `n_layers`: only the first n blocks run, then the final norm and head (a cheaper draft of the model;
        the returned cache then holds those n layers).
        """
        cfg = self.cfg
        rec = Recorder(capture)
        x = self.embed_tokens(tokens_bt) if embeds_btd is None else embeds_btd.astype(self.dtype)
        b, t, _ = x.shape
        valid = jnp.ones((b, t), bool) if valid_bt is None else valid_bt.astype(bool)
        fresh = cache is None
        if fresh:
            cache = {"k": (None,) * cfg.n_layers, "v": (None,) * cfg.n_layers, "valid": valid,
                     "slot": jnp.zeros((), jnp.int32), "pos": jnp.zeros((b,), jnp.int32)}
        slot = cache["slot"]
        positions = cache["pos"][:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(positions, 0)                                     # [B, T]
        key_valid = valid if fresh else jax.lax.dynamic_update_slice(cache["valid"], valid, (0, slot))  # [B, S]
        q_slot = slot + jnp.arange(t)
        k_slot = jnp.arange(key_valid.shape[1])
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]   # [B, T, S]
        if cfg.sliding_window is not None:
            mask &= (q_slot[:, None] - k_slot[None, :] < cfg.sliding_window)[None]
        bias = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)   # additive: 0 attend, -1e30 masked
        rec("hook_embed", x)
        rope = None
        if cfg.is_gpt2:
            pos_emb = jnp.take(self.pos_embed[...], positions, axis=0)
            rec("hook_pos_embed", pos_emb)
            x = x + pos_emb
        else:
            angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_frequencies(cfg))
            angles = jnp.concatenate([angles, angles], axis=-1)                   # [B, T, Dh]
            rope = (jnp.cos(angles), jnp.sin(angles))
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            if n_layers is not None and i >= n_layers:
                break
            p = f"blocks.{i}."
            rec(p + "hook_resid_pre", x)
            h = block.ln1(x)
            rec(p + "ln1.hook_normalized", h)
            attn_out, k_i, v_i = block.attn(
                h, rope, bias, cache["k"][i], cache["v"][i], slot,
                None if head_mask_lh is None else head_mask_lh[i],
                None if head_mean_lhk is None else head_mean_lhk[i], rec, p + "attn.")
            new_k.append(k_i)
            new_v.append(v_i)
            rec(p + "hook_attn_out", attn_out)
            x = x + attn_out
            rec(p + "hook_resid_mid", x)
            h = block.ln2(x)
            rec(p + "ln2.hook_normalized", h)
            mlp_out = block.mlp(h, None if neuron_mask_lf is None else neuron_mask_lf[i],
                                None if neuron_mean_lf is None else neuron_mean_lf[i], rec, p + "mlp.")
            rec(p + "hook_mlp_out", mlp_out)
            x = x + mlp_out
            rec(p + "hook_resid_post", x)
        x = self.ln_final(x)
        rec("ln_final.hook_normalized", x)
        new_cache = {"k": tuple(new_k), "v": tuple(new_v), "valid": key_valid, "slot": slot + t,
                     "pos": cache["pos"] + jnp.sum(valid, axis=1, dtype=jnp.int32)}
        if not logits:
            return None, new_cache, rec.acts
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return (x[:, logits_from:] @ head).astype(jnp.float32), new_cache, rec.acts


def hook_names(cfg: LMConfig) -> list[str]:
    """Every activation name the forward pass can record (TransformerLens canonical)."""
    names = ["hook_embed"] + (["hook_pos_embed"] if cfg.is_gpt2 else [])
    per_block = ["hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                 "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
                 "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    if not cfg.is_gpt2:
        per_block.insert(per_block.index("mlp.hook_post"), "mlp.hook_pre_linear")
    for i in range(cfg.n_layers):
        names += [f"blocks.{i}.{n}" for n in per_block]
    return names + ["ln_final.hook_normalized"]
