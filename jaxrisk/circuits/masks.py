"""Differentiable binary masks over attention heads and MLP neurons.

Two parametrisations of a mask from real-valued logits:
- `ste_sigmoid`: binary in the forward pass (logit > 0), sigmoid gradient in the
  backward pass (straight-through estimator);
- hard-concrete (Louizos, Welling & Kingma 2018): a stretched (-0.1, 1.1),
  clipped binary-concrete sample at temperature 2/3, whose expected L0 norm
  has a closed form; deterministic at evaluation time.

Masks live in a dict {"heads": [layers, heads], "neurons": [layers, d_mlp]}
(either may be absent: heads only, neurons only, or both), the shapes
`forward(..., head_mask_lh=, neuron_mask_lf=)` takes. A unit outside the mask
is zeroed (zero ablation) or, given `unit_means`, set to its mean activation on
clean text (mean ablation: the rest of the model still sees a typical value).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrisk.errors import InputError
from jaxrisk.models.lm import forward

BETA, LEFT, RIGHT = 2.0 / 3.0, -0.1, 1.1
GRANULARITIES = ("heads", "neurons", "both")


def mask_shapes(cfg, granularity: str) -> dict[str, tuple[int, int]]:
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    shapes = {}
    if granularity in ("heads", "both"):
        shapes["heads"] = (cfg.n_layers, cfg.n_heads)
    if granularity in ("neurons", "both"):
        shapes["neurons"] = (cfg.n_layers, cfg.d_mlp)
    return shapes


def init_logits(cfg, granularity: str, value: float = 3.0) -> dict[str, jax.Array]:
    """Mask logits starting at `value` (3.0: every unit on with probability ~0.95)."""
    return {k: jnp.full(s, value, jnp.float32) for k, s in mask_shapes(cfg, granularity).items()}


def ste_sigmoid(logits: jax.Array) -> jax.Array:
    """{0, 1} forward, d sigmoid backward."""
    soft = jax.nn.sigmoid(logits)
    hard = (logits > 0).astype(soft.dtype)
    return soft + jax.lax.stop_gradient(hard - soft)


def hard_concrete_sample(key: jax.Array, log_alpha: jax.Array, beta: float = BETA) -> jax.Array:
    u = jax.random.uniform(key, log_alpha.shape, minval=1e-6, maxval=1.0 - 1e-6)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
    return jnp.clip(s * (RIGHT - LEFT) + LEFT, 0.0, 1.0)


def hard_concrete_mean(log_alpha: jax.Array) -> jax.Array:
    """Deterministic mask at evaluation time (Louizos et al.'s test-time estimator)."""
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT, 0.0, 1.0)


def expected_l0(log_alpha: jax.Array, beta: float = BETA) -> jax.Array:
    """P(mask != 0) per unit, the differentiable L0 penalty."""
    return jax.nn.sigmoid(log_alpha - beta * np.log(-LEFT / RIGHT))


def apply_masks(logits: dict[str, jax.Array], kind: str, key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Mask values from logits: kind 'ste', 'hard_concrete' (sampled with `key`) or 'binary' (evaluation)."""
    out = {}
    for i, (name, lg) in enumerate(sorted(logits.items())):
        if kind == "ste":
            out[name] = ste_sigmoid(lg)
        elif kind == "hard_concrete":
            out[name] = hard_concrete_sample(jax.random.fold_in(key, i), lg) if key is not None \
                else hard_concrete_mean(lg)
        elif kind == "binary":
            out[name] = (lg > 0).astype(jnp.float32)
        else:
            raise InputError(f"mask kind {kind!r}: expected ste, hard_concrete or binary")
    return out


def density(logits: dict[str, jax.Array], kind: str) -> jax.Array:
    """Differentiable fraction of units kept: mean sigmoid (ste) or mean expected L0 (hard-concrete)."""
    values = [expected_l0(v) if kind == "hard_concrete" else jax.nn.sigmoid(v) for v in logits.values()]
    return sum(v.sum() for v in values) / sum(v.size for v in values)


def forward_masks(masks: dict[str, jax.Array], means: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Keyword arguments for the LM forward pass; with `means` (from `unit_means`) masked units are mean-ablated."""
    kw = {}
    for name, mask_arg, mean_arg in (("heads", "head_mask_lh", "head_mean_lhk"),
                                     ("neurons", "neuron_mask_lf", "neuron_mean_lf")):
        if name in masks:
            kw[mask_arg] = masks[name]
            if means is not None:
                kw[mean_arg] = means[name]
    return kw


@partial(jax.jit, static_argnames=("graphdef", "names"))
def _unit_sums(graphdef, params, tokens_bl, valid_bl, names):
    _, _, acts = forward(graphdef, params, tokens_bl, valid_bt=valid_bl, capture=names, logits=False)
    w = valid_bl.astype(jnp.float32)
    return {n: jnp.einsum("bt,bt...->...", w, a.astype(jnp.float32)) for n, a in acts.items()}


def unit_means(graphdef, params, tokens_bl, valid_bl, batch: int = 32) -> dict[str, jax.Array]:
    """Mean activation of every unit over the valid positions of clean rows: {"heads": [L, H, Dh] (each head's
    output z before the output projection), "neurons": [L, F] (the MLP activation before the down projection)},
    the values mean ablation puts in place of an ablated unit."""
    cfg = nnx.merge(graphdef, params).cfg
    names = tuple(f"blocks.{i}.{h}" for h in ("attn.hook_z", "mlp.hook_post") for i in range(cfg.n_layers))
    tokens_bl, valid_bl = np.asarray(tokens_bl), np.asarray(valid_bl, bool)
    total = None
    for s in range(0, len(tokens_bl), batch):
        part = _unit_sums(graphdef, params, jnp.asarray(tokens_bl[s:s + batch]), jnp.asarray(valid_bl[s:s + batch]),
                          names)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    count = max(float(valid_bl.sum()), 1.0)
    stack = lambda hook: jnp.stack([total[f"blocks.{i}.{hook}"] for i in range(cfg.n_layers)]) / count  # noqa: E731
    return {"heads": stack("attn.hook_z"), "neurons": stack("mlp.hook_post")}
