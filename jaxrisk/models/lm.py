"""`load_pretrained(path)`: a loaded language model, its tokenizer, and the pure functions searches call.

The pure functions take `(graphdef, params, ...)` so they can be jitted, vmapped
and differentiated by the engine; `LanguageModel` wraps them for notebooks.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.data.batch import pad_batch
from jaxrisk.data.text import regular_file
from jaxrisk.errors import InputError, require_int, require_number, require_seed
from jaxrisk.models.hf import load_weights, read_config, resolve_dtype
from jaxrisk.models.lm_config import LMConfig
from jaxrisk.models.sharding import param_shardings
from jaxrisk.models.transformer import Cache, CausalLM, hook_names


def embed(model: CausalLM, tokens) -> jax.Array:
    """Token ids [B, L] -> embeddings, or one-hot [B, L, V] @ table (differentiable w.r.t. the tokens)."""
    if jnp.issubdtype(tokens.dtype, jnp.integer):
        return model.embed_tokens(tokens)
    return tokens.astype(model.dtype) @ model.embed[...]


def pick_logprobs(logp_btv: jax.Array, tokens) -> jax.Array:
    """log p of each given token [B, T]: ids [B, T] gather; one-hot [B, T, V] dot (keeps the gradient)."""
    if jnp.issubdtype(tokens.dtype, jnp.integer):
        return jnp.take_along_axis(logp_btv, tokens[..., None], -1)[..., 0]
    return jnp.sum(logp_btv * tokens.astype(logp_btv.dtype), -1)


def token_logprobs(logits_btv: jax.Array, tokens) -> jax.Array:
    """The one token log-prob gather every loss and score uses: log_softmax(logits) at `tokens` [B, T]."""
    chex.assert_rank(logits_btv, 3)
    chex.assert_equal_shape_prefix([logits_btv, tokens], 2)   # one position per token (ids, or one-hot rows)
    return pick_logprobs(jax.nn.log_softmax(logits_btv, -1), tokens)


def weighted_mean(values, weight):
    """sum(values * weight) / sum(weight) (at least 1); unweighted entries never count, even if not finite."""
    return jnp.sum(jnp.where(weight > 0, values * weight, 0.0)) / jnp.maximum(jnp.sum(weight), 1.0)


def lm_loss(graphdef, params, tokens_bl, valid_bl, **masks):
    """Mean next-token cross-entropy over the positions whose target token is valid (masks: heads / neurons)."""
    logits, _, _ = forward(graphdef, params, tokens_bl[:, :-1], **masks)
    return -weighted_mean(token_logprobs(logits, tokens_bl[:, 1:]), jnp.asarray(valid_bl)[:, 1:])


@partial(jax.jit, static_argnames=("graphdef", "capture", "logits", "logits_from"))
def forward(graphdef, params, tokens_bt=None, *, embeds_btd=None, valid_bt=None, cache=None,
            head_mask_lh=None, neuron_mask_lf=None, head_mean_lhk=None, neuron_mean_lf=None, capture=(), logits=True,
            logits_from=0):
    """Pure forward pass: (logits [B,T,V] float32, cache, {hook name: activation})."""
    model = nnx.merge(graphdef, params)
    return model(tokens_bt, embeds_btd=embeds_btd, valid_bt=valid_bt, cache=cache, head_mask_lh=head_mask_lh,
                 neuron_mask_lf=neuron_mask_lf, head_mean_lhk=head_mean_lhk, neuron_mean_lf=neuron_mean_lf,
                 capture=capture, logits=logits, logits_from=logits_from)


@partial(jax.jit, static_argnames=("graphdef", "room"))
def prefix_cache(graphdef, params, prefix_p: jax.Array, room: int) -> Cache:
    """KV cache of one shared prefix [P] (batch 1), with `room` free positions after it."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(1, prefix_p.shape[0] + room)
    _, cache, _ = model(prefix_p[None], cache=cache, logits=False)
    return cache


def broadcast_cache(cache: Cache, batch: int) -> Cache:
    """A batch-1 cache seen by `batch` rows (broadcast; nothing is recomputed)."""
    grow = lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:])  # noqa: E731
    return {"k": tuple(map(grow, cache["k"])), "v": tuple(map(grow, cache["v"])),
            "valid": grow(cache["valid"]), "slot": cache["slot"], "pos": grow(cache["pos"])}


def target_logprobs(graphdef, params, cache: Cache, middle, target_bt: jax.Array, *,
                    head_mask_lh=None, neuron_mask_lf=None) -> jax.Array:
    """Teacher-forced log p(target_t | prefix, middle, target_<t) per token: [B, T].

    `cache` holds the shared prefix (batch 1, from `prefix_cache` with room >=
    M + T - 1). `middle` is the per-candidate part after it: token ids [B, M], or
    input embeddings [B, M, D] so the score can be differentiated w.r.t. one-hot
    tokens. The prefix is computed once for the whole batch.
    """
    model = nnx.merge(graphdef, params)
    b, t = target_bt.shape
    target_emb = model.embed_tokens(target_bt[:, :-1])
    middle_emb = model.embed_tokens(middle) if middle.ndim == 2 else middle.astype(target_emb.dtype)
    m = middle_emb.shape[1]
    embeds = jnp.concatenate([middle_emb, target_emb], axis=1)
    logits, _, _ = model(embeds_btd=embeds, cache=broadcast_cache(cache, b), logits_from=m - 1,
                         head_mask_lh=head_mask_lh, neuron_mask_lf=neuron_mask_lf)
    return token_logprobs(logits, target_bt)


def _pick(logits_bv, key, temperature: float, top_k: int):
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / temperature
    if top_k:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    return jax.random.categorical(key, logits_bv).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "eos_ids"))
def generate_ids(graphdef, params, prompt_bp, valid_bp, key, *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, eos_ids: tuple[int, ...] = (), head_mask_lh=None, neuron_mask_lf=None,
                 head_mean_lhk=None, neuron_mean_lf=None) -> jax.Array:
    """Greedy (temperature 0) or sampled continuation [B, N] with a KV cache; after an EOS a row repeats it.
    Head / neuron masks (e.g. an ablated circuit; with means: mean ablation) apply at every position. A row
    whose logits stop being finite (broken weights, overflow) holds -1 from that step on: never a token id."""
    model = nnx.merge(graphdef, params)
    masks = dict(head_mask_lh=head_mask_lh, neuron_mask_lf=neuron_mask_lf, head_mean_lhk=head_mean_lhk,
                 neuron_mean_lf=neuron_mean_lf)
    b, p = prompt_bp.shape
    cache = model.init_cache(b, p + max_new_tokens)
    logits, cache, _ = model(prompt_bp, valid_bt=valid_bp, cache=cache, **masks)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def step(carry, step_key):
        cache, last_bv, done_b, prev_b = carry
        token = jnp.where(done_b, prev_b, _pick(last_bv, step_key, temperature, top_k))
        token = jnp.where(jnp.all(jnp.isfinite(last_bv), -1) & (prev_b >= 0), token, -1)
        done_b = done_b | jnp.isin(token, eos)
        logits, cache, _ = model(jnp.maximum(token, 0)[:, None], cache=cache, **masks)
        return (cache, logits[:, 0], done_b, token), token

    init = (cache, logits[:, -1], jnp.zeros(b, bool), jnp.zeros(b, jnp.int32))
    _, tokens_nb = jax.lax.scan(step, init, jax.random.split(key, max_new_tokens))
    return tokens_nb.T


class LanguageModel:
    """A loaded causal LM: `lm(tokens)` -> logits, plus tokenizer, generation, scoring and hooks."""

    def __init__(self, cfg: LMConfig, graphdef: nnx.GraphDef, params: nnx.State, path: Path | None = None,
                 dtype=jnp.float32, tokenizer=None):
        self.cfg, self.graphdef, self.params, self.path, self.dtype = cfg, graphdef, params, path, dtype
        self._tokenizer = tokenizer

    @classmethod
    def random(cls, cfg: LMConfig, *, seed: int = 0, dtype=jnp.float32, tokenizer=None) -> "LanguageModel":
        """Randomly initialised model (tests, models trained from scratch), optionally with a tokenizer."""
        graphdef, params = nnx.split(CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
        return cls(cfg, graphdef, params, None, dtype, tokenizer)

    def with_params(self, params: nnx.State) -> "LanguageModel":
        """The same model (config, tokenizer) with other parameters: a fine-tuned or planted copy."""
        return LanguageModel(self.cfg, self.graphdef, params, self.path, self.dtype, self._tokenizer)

    @property
    def tokenizer(self):
        """The directory's tokenizer (transformers `AutoTokenizer`, no torch needed)."""
        if self._tokenizer is None:
            if self.path is None:
                raise InputError("this model was not loaded from a directory, so it has no tokenizer")
            from transformers import AutoTokenizer

            for file in sorted(Path(self.path).iterdir()):   # a FIFO there would block transformers' reader
                if file.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges")):
                    regular_file(file)
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            except Exception as e:  # transformers raises many types for a missing/broken tokenizer
                raise InputError(f"{self.path}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
        return self._tokenizer

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, checked against the model's vocabulary (a tokenizer with added tokens may not fit)."""
        return self.check_tokens(self.tokenizer(text)["input_ids"], f"tokenizer output for {text[:40]!r}", ndim=1,
                                 context=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def n_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def hook_names(self) -> list[str]:
        return hook_names(self.cfg)

    def check_tokens(self, ids, name: str = "tokens", ndim: int = 2, context: bool = True) -> np.ndarray:
        """`ids` as int32 numpy if they are integer token ids of the given rank inside the vocabulary (and, with
        `context`, no longer than the model's context)."""
        ids = np.asarray(ids)
        if ids.ndim != ndim or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            shape = "[batch, length]" if ndim == 2 else "[length]"
            raise InputError(f"{name}: expected integer token ids of shape {shape}, got {ids.dtype} {list(ids.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise InputError(f"{name}: token ids span {ids.min()}..{ids.max()}; this model's vocabulary is "
                             f"0..{self.cfg.vocab_size - 1}")
        if context and ids.shape[-1] > self.cfg.max_position:
            raise InputError(f"{name}: length {ids.shape[-1]} exceeds the context of {self.cfg.max_position} positions")
        return ids.astype(np.int32)

    def check_masks(self, head_mask_lh=None, neuron_mask_lf=None, head_mean_lhk=None, neuron_mean_lf=None,
                    **rest) -> dict:
        """The forward keyword arguments, with head / neuron masks checked against [layers, heads] / [layers, d_mlp]
        and mean-ablation values against [layers, heads, head_dim] / [layers, d_mlp]."""
        cfg = self.cfg
        for name, mask, shape, what in (
                ("head_mask_lh", head_mask_lh, (cfg.n_layers, cfg.n_heads), "layers x heads"),
                ("neuron_mask_lf", neuron_mask_lf, (cfg.n_layers, cfg.d_mlp), "layers x d_mlp"),
                ("head_mean_lhk", head_mean_lhk, (cfg.n_layers, cfg.n_heads, cfg.head_dim),
                 "layers x heads x head_dim"),
                ("neuron_mean_lf", neuron_mean_lf, (cfg.n_layers, cfg.d_mlp), "layers x d_mlp")):
            if mask is not None and tuple(np.shape(mask)) != shape:
                raise InputError(f"{name}: expected shape {list(shape)} ({what}), got {list(np.shape(mask))}")
        return dict(rest, head_mask_lh=head_mask_lh, neuron_mask_lf=neuron_mask_lf, head_mean_lhk=head_mean_lhk,
                    neuron_mean_lf=neuron_mean_lf)

    def __call__(self, tokens_bt, **kwargs) -> jax.Array:
        """Logits [B, L, V] (float32) for int token ids [B, L]."""
        tokens_bt = self.check_tokens(tokens_bt)
        return forward(self.graphdef, self.params, tokens_bt, **self.check_masks(**kwargs))[0]

    def run_with_cache(self, tokens_bt, names=None, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits, activations) by TransformerLens name; `names=None` records every hook."""
        names = tuple(self.hook_names() if names is None else names)
        unknown = sorted(set(names) - set(self.hook_names()))
        if unknown:
            raise InputError(f"unknown hook names: {', '.join(unknown[:5])}; see LanguageModel.hook_names()")
        logits, _, acts = forward(self.graphdef, self.params, self.check_tokens(tokens_bt), capture=names,
                                  **self.check_masks(**kwargs))
        return logits, acts

    def generate(self, prompts, max_new_tokens: int = 40, *, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0) -> list[list[int]]:
        """Continue each prompt (text or ids); batches are left-padded. Returns new ids, cut after EOS."""
        max_new_tokens = require_int("max_new_tokens", max_new_tokens, 1)
        temperature = require_number("temperature", temperature, 0.0)
        top_k = require_int("top_k", top_k, 0, self.cfg.vocab_size)
        seed = require_seed("seed", seed)
        if isinstance(prompts, (str, np.ndarray)) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not len(prompts):
            raise InputError("generate: no prompts")
        ids = [self.encode(p) if isinstance(p, str) else self.check_tokens(p, f"prompt {n}", ndim=1)
               for n, p in enumerate(prompts)]
        if min(len(i) for i in ids) == 0:
            raise InputError("generate: an empty prompt (no tokens to continue)")
        width = max(len(i) for i in ids)
        if width + max_new_tokens > self.cfg.max_position:
            raise InputError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context of {self.cfg.max_position}")
        tokens, valid = pad_batch(ids, left=True)
        out = generate_ids(self.graphdef, self.params, tokens, valid, jax.random.key(seed),
                           max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                           eos_ids=self.cfg.eos_token_ids)
        out = np.asarray(out)
        broken = np.argwhere(out < 0)
        if len(broken):
            row, step = broken[0]
            raise InputError(f"the model's logits are not finite (NaN / inf) at generation step {step} of prompt "
                             f"{row}; its weights or activations are broken")
        result = []
        for row in out.tolist():
            cut = next((n + 1 for n, t in enumerate(row) if t in self.cfg.eos_token_ids), len(row))
            result.append(row[:cut])
        return result

    def score_targets(self, prefix_ids, middles_bm, target_ids) -> np.ndarray:
        """log p(target | prefix + middle) for each candidate middle [B, M]; the prefix is computed once."""
        prefix = jnp.asarray(self.check_tokens(prefix_ids, "prefix_ids", ndim=1))
        middles = jnp.asarray(self.check_tokens(middles_bm, "middles_bm"))
        target_ids = self.check_tokens(target_ids, "target_ids", ndim=1)
        if len(prefix) == 0 or len(target_ids) == 0:
            raise InputError("score_targets: the prefix and the target need at least one token each")
        if len(prefix) + middles.shape[1] + len(target_ids) > self.cfg.max_position:
            raise InputError(f"score_targets: prefix + middle + target is longer than the context of "
                             f"{self.cfg.max_position}")
        target = jnp.broadcast_to(jnp.asarray(target_ids), (middles.shape[0], len(target_ids)))
        cache = prefix_cache(self.graphdef, self.params, prefix, room=middles.shape[1] + target.shape[1] - 1)
        return np.asarray(_score(self.graphdef, self.params, cache, middles, target).sum(-1))

    def summary(self) -> dict:
        cfg = self.cfg
        kind = "MHA" if cfg.n_kv_heads == cfg.n_heads else ("MQA" if cfg.n_kv_heads == 1 else "GQA")
        return {"path": str(self.path) if self.path else None, "family": cfg.family,
                "layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
                "attention": kind, "head_dim": cfg.head_dim, "d_mlp": cfg.d_mlp, "vocab": cfg.vocab_size,
                "context": cfg.max_position, "tied_embeddings": cfg.tie_embeddings,
                "rope": None if cfg.is_gpt2 else {"theta": cfg.rope_theta, **cfg.rope},
                "sliding_window": cfg.sliding_window, "parameters": self.n_params(),
                "dtype": jnp.dtype(self.dtype).name}


_score = jax.jit(target_logprobs, static_argnames=("graphdef",))


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype):
    """A parameter dtype jaxrisk computes in (float32, bfloat16, float16), else an InputError.

    float64 is refused rather than silently computed in float32 (JAX's default without x64)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise InputError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return jnp.dtype(name)


def load_pretrained(path: str | Path, dtype=None, *, mesh=None) -> LanguageModel:
    """Load a local Hugging Face model directory without torch.

    `dtype` defaults to the checkpoint's declared dtype; `mesh` (the one mesh, `jaxrisk.mesh.make_mesh`, or
    `RunConfig.mesh()`) places each parameter on its fsdp / tensor axes by the partition table.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if dtype is not None:
        dtype = check_dtype(dtype)
    cfg, hf = read_config(path)
    dtype = resolve_dtype(dtype, hf)
    shardings = None
    if mesh is not None:
        abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
        shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
        shardings = param_shardings(shapes, mesh)
    graphdef, params = load_weights(path, cfg, dtype, shardings)
    return LanguageModel(cfg, graphdef, params, path, dtype)
