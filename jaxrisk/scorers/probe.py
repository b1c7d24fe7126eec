"""A linear probe on the model's own activations as a cheap, differentiable danger scorer.

The seed's "specialised subnetwork" approximation: instead of asking a judge
model, read the residual stream at one layer and apply logistic regression
trained on labelled harmful / harmless texts. log sigmoid(w.h + b) is the
log-score, with h the mean over the text's positions (pool="mean") or the
score taken at the text's highest-scoring position (pool="max": a text is as
dangerous as its most dangerous word, so a short harmless text cannot hide
behind the average, and a long one cannot dilute a harmful word); it is
differentiable w.r.t. one-hot input tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxrisk.data.batch import pad_batch
from jaxrisk.errors import InputError, require_choice
from jaxrisk.models.lm import embed
from jaxrisk.optim.update import train_scan


POOLS = ("mean", "max")


def residuals(graphdef, params, tokens, valid_bl, layer: int) -> jax.Array:
    """`blocks.{layer}.hook_resid_post` [B, L, D] (float32)."""
    model = nnx.merge(graphdef, params)
    name = f"blocks.{layer}.hook_resid_post"
    _, _, acts = model(embeds_btd=embed(model, tokens), valid_bt=valid_bl, capture=(name,), logits=False)
    return acts[name].astype(jnp.float32)


def mean_residual(graphdef, params, tokens, valid_bl, layer: int) -> jax.Array:
    """Mean over valid positions of `blocks.{layer}.hook_resid_post` [B, D] (float32)."""
    w = valid_bl.astype(jnp.float32)[..., None]
    return jnp.sum(residuals(graphdef, params, tokens, valid_bl, layer) * w, 1) / jnp.maximum(w.sum(1), 1.0)


def features(graphdef, params, tokens, valid_bl, layer: int, pool: str) -> jax.Array:
    """What the probe reads: the mean residual [B, D] (pool="mean") or every position's [B, L, D] (pool="max")."""
    if pool == "mean":
        return mean_residual(graphdef, params, tokens, valid_bl, layer)
    return residuals(graphdef, params, tokens, valid_bl, layer)


def _pooled_logits(h_bld, valid_bl, w, b, pool: str) -> jax.Array:
    """Probe logits [B] of standardised residuals [B, L, D] (pool="max") or their means [B, D] (pool="mean")."""
    if pool == "mean":
        return h_bld @ w + b
    return jnp.max(jnp.where(valid_bl, h_bld @ w, -jnp.inf), axis=-1) + b


@struct.dataclass
class ProbeScorer:
    """log P(dangerous | text) = log sigmoid(w . h + b), h the standardised residual at `layer`, pooled."""

    params: nnx.State
    w: jax.Array                  # [D]
    b: jax.Array                  # []
    mu: jax.Array                 # [D] feature standardisation, fitted on the training texts
    sigma: jax.Array              # [D]
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    layer: int = struct.field(pytree_node=False, default=0)
    pool: str = struct.field(pytree_node=False, default="mean")

    def logits(self, tokens, valid_bl) -> jax.Array:
        h = features(self.graphdef, self.params, tokens, valid_bl, self.layer, self.pool)
        return _pooled_logits((h - self.mu) / self.sigma, valid_bl, self.w, self.b, self.pool)

    def __call__(self, tokens, valid_bl) -> jax.Array:
        return jax.nn.log_sigmoid(self.logits(tokens, valid_bl))


def default_probe_layer(cfg) -> int:
    """The layer a probe reads unless told otherwise: the middle of the model."""
    return cfg.n_layers // 2


def train_probe(lm, texts: list[str], labels, *, layer: int | None = None, pool: str = "mean", steps: int = 300,
                l2: float = 1e-2, learning_rate: float = 0.05) -> ProbeScorer:
    """Fit the probe by logistic regression (optax adam, L2) on `lm`'s activations; labels: 1 = harmful."""
    labels = np.asarray(labels, np.float32)
    if len(texts) != len(labels) or len(texts) < 4 or len(set(labels.tolist())) != 2:
        raise InputError(f"train_probe: need >= 4 texts with both labels 0 and 1 (got {len(texts)} texts, "
                         f"labels {sorted(set(labels.tolist()))})")
    layer = default_probe_layer(lm.cfg) if layer is None else layer
    if not 0 <= layer < lm.cfg.n_layers:
        raise InputError(f"train_probe: layer {layer} is outside 0..{lm.cfg.n_layers - 1}")
    require_choice("train_probe: pool", pool, POOLS)
    tokens, valid = pad_batch([lm.encode(t) for t in texts])
    feats = jax.jit(features, static_argnames=("graphdef", "layer", "pool"))(lm.graphdef, lm.params, tokens, valid,
                                                                             layer=layer, pool=pool)
    at = feats if pool == "mean" else feats[np.asarray(valid)]   # max: standardised over every valid position
    mu, sigma = at.mean(0), at.std(0) + 1e-6
    x = (feats - mu) / sigma
    y = jnp.asarray(labels)

    def loss(wb, _):
        logit = _pooled_logits(x, valid, wb["w"], wb["b"], pool)
        return optax.sigmoid_binary_cross_entropy(logit, y).mean() + l2 * jnp.sum(wb["w"] ** 2)

    fit = jax.jit(lambda wb: train_scan(loss, optax.adam(learning_rate), wb, steps=steps)[0])
    wb = fit({"w": jnp.zeros(x.shape[-1]), "b": jnp.zeros(())})
    return ProbeScorer(params=lm.params, w=wb["w"], b=wb["b"], mu=mu, sigma=sigma, graphdef=lm.graphdef,
                       layer=layer, pool=pool)
