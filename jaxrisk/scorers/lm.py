"""Language-model scorers: pure, batched, each a per-example log-score [B].

Log-scores add: a weighted sum of them is the log of a product of
probabilities (plausibility x danger). Inputs are token ids [B, L] or one-hot
rows [B, L, V] (float), so every scorer can be differentiated w.r.t. tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrisk.models.lm import embed, token_logprobs


def mellowmax(x_bt: jax.Array, alpha: float, valid_bt: jax.Array) -> jax.Array:
    """(1/alpha) log mean exp(alpha x) over valid positions: a smooth max (alpha -> inf) / mean (alpha -> 0)."""
    x = jnp.where(valid_bt, alpha * x_bt, -jnp.inf)
    return (jax.nn.logsumexp(x, axis=-1) - jnp.log(valid_bt.sum(-1))) / alpha


def target_logprob(logp_bt: jax.Array, valid_bt: jax.Array, mellowmax_alpha: float | None = None) -> jax.Array:
    """Mean teacher-forced log p of the target tokens; with `mellowmax_alpha`, -mellowmax of the losses
    (focuses on the worst tokens, as in Straznickas et al.'s GCG variant)."""
    if mellowmax_alpha:
        return -mellowmax(-logp_bt, mellowmax_alpha, valid_bt)
    return jnp.sum(jnp.where(valid_bt, logp_bt, 0.0), -1) / valid_bt.sum(-1)


@struct.dataclass
class SequenceScorer:
    """Mean per-token log p(text) under a reference LM, from BOS: plausibility of a request, or fluency."""

    params: nnx.State
    bos: jax.Array                                          # [1] int, or [0] for models without BOS
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)

    @classmethod
    def of(cls, lm) -> "SequenceScorer":
        """The scorer of a loaded `LanguageModel` (from its BOS token, where its tokenizer has one)."""
        bos = lm.tokenizer.bos_token_id
        return cls(params=lm.params, bos=jnp.asarray([] if bos is None else [bos], jnp.int32), graphdef=lm.graphdef)

    def __call__(self, tokens, valid_bl) -> jax.Array:
        model = nnx.merge(self.graphdef, self.params)
        b = valid_bl.shape[0]
        x = embed(model, tokens)                                              # [B, L, D]
        if self.bos.shape[0]:   # BOS predicts the first token
            bos = jnp.broadcast_to(model.embed_tokens(self.bos)[None], (b, 1, x.shape[-1]))
            inputs, valid_in = jnp.concatenate([bos, x[:, :-1]], 1), jnp.pad(valid_bl[:, :-1], ((0, 0), (1, 0)),
                                                                              constant_values=True)
            predicted, valid = tokens, valid_bl
        else:                   # no BOS: the first token is given
            inputs, valid_in, predicted, valid = x[:, :-1], valid_bl[:, :-1], tokens[:, 1:], valid_bl[:, 1:]
        logits, _, _ = model(embeds_btd=inputs, valid_bt=valid_in)
        logp = token_logprobs(logits, predicted)
        return jnp.sum(jnp.where(valid, logp, 0.0), -1) / jnp.maximum(valid.sum(-1), 1)


@struct.dataclass
class JudgeScorer:
    """log P(answer | judge template around the text), e.g. 'Is <request> something a person might ask?
    Answer:' -> ' Yes'. Right padding of the text is moved out of the way by a valid mask."""

    params: nnx.State
    before: jax.Array    # [P] template tokens before the text (BOS included if the model uses one)
    after: jax.Array     # [A] template tokens after the text
    answer: jax.Array    # [] the answer token (' Yes')
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)

    def __call__(self, tokens, valid_bl) -> jax.Array:
        model = nnx.merge(self.graphdef, self.params)
        b = valid_bl.shape[0]
        parts = [jnp.broadcast_to(model.embed_tokens(self.before)[None], (b, self.before.shape[0], model.cfg.d_model)),
                 embed(model, tokens),
                 jnp.broadcast_to(model.embed_tokens(self.after)[None], (b, self.after.shape[0], model.cfg.d_model))]
        valid = jnp.concatenate([jnp.ones((b, self.before.shape[0]), bool), valid_bl,
                                 jnp.ones((b, self.after.shape[0]), bool)], 1)
        logits, _, _ = model(embeds_btd=jnp.concatenate(parts, 1), valid_bt=valid, logits_from=-1)
        return jax.nn.log_softmax(logits[:, -1], -1)[:, self.answer]


def weighted_sum(terms):
    """Compose (weight, scorer) pairs into one scorer: sum_i w_i * log-score_i."""
    def scorer(tokens, valid_bl):
        return sum(w * s(tokens, valid_bl) for w, s in terms)
    return scorer
