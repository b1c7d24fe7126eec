"""Joint request / output search in the style of ARCA (Jones et al. 2023) as an engine problem.

The request x (Lx tokens after a fixed prefix) and the output o (Lo tokens)
are optimised together by coordinate ascent on

    f(x, o) = log p(o | prefix, x, after) + w_plaus * plausibility(x) + w_danger * danger(o)

where plausibility and danger are scorers (e.g. mean log p(x) under the model,
a linear danger probe on the output). The model reads prefix + x + after + o:
the prefix may be left-padded (lane input `prefix_valid`), and `after` is a
fixed token run between the request and the output (a chat template's tail;
may be empty). The prefix is computed once per step into a KV cache.

Step s updates position s mod (Lx + Lo): candidate tokens come from the
gradient of f w.r.t. that position's one-hot row; for an output position the
exact log p(o_j = v | prefix, x, after, o_<j) of every v (one forward pass) is
added, as ARCA does. The k best candidates and the current token are evaluated
exactly and the best is kept, so f never decreases. `consistent` reports
whether o is the model's greedy output for prefix + x + after.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrisk.models.lm import broadcast_cache, embed, pick_logprobs
from jaxrisk.redteam.config import ARCAConfig
from jaxrisk.redteam.problem import prompt_cache


class ARCAState(NamedTuple):
    """One lane's state: its inputs and the current (request, output) pair."""
    prefix: jax.Array       # [P] fixed context before the request (left-padded)
    prefix_valid: jax.Array  # [P] bool, False at padding (all True when the lane input omits it)
    x0: jax.Array           # [Lx] initial request tokens (-1: random)
    o0: jax.Array           # [Lo] initial output tokens (-1: random)
    x: jax.Array            # [Lx] int32 current request
    o: jax.Array            # [Lo] int32 current output
    objective: jax.Array    # [] f(x, o) of the current pair
    consistent: jax.Array   # [] bool o is the greedy continuation of prefix + x + after
    t: jax.Array            # [] int32 steps taken (position t mod (Lx + Lo) is updated next)


@struct.dataclass
class ARCAProblem:
    """Lane inputs: prefix [P] (fixed, e.g. BOS + a context; left-padded), optional prefix_valid [P] bool
    (default all True), x0 [Lx], o0 [Lo] (initial tokens; -1 = random)."""

    params: nnx.State
    allowed: jax.Array                      # [V] bool
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    cfg: ARCAConfig = struct.field(pytree_node=False, default=ARCAConfig())
    plausibility: object = None             # scorer(tokens_or_onehot [B, Lx], valid) -> [B]
    danger: object = None                   # scorer(tokens_or_onehot [B, Lo], valid) -> [B]
    after: jax.Array | None = None          # [A] fixed tokens between the request and the output (None: none)

    def init(self, key, lane):
        """Entries of x0 / o0 that are -1 start as random allowed tokens (independent restarts)."""
        lx, lo = self.cfg.request_len, self.cfg.output_len
        lane = {"prefix_valid": jnp.ones(jnp.shape(lane["prefix"]), bool), **lane}
        logits = jnp.where(self.allowed, 0.0, -jnp.inf)
        draw = jax.random.categorical(key, logits, shape=(lx + lo,)).astype(jnp.int32)
        z0 = jnp.concatenate([lane["x0"], lane["o0"]])
        z = jnp.where(z0 < 0, draw, z0)
        return ARCAState(**lane, x=z[:lx], o=z[lx:], objective=jnp.asarray(-jnp.inf, jnp.float32),
                         consistent=jnp.asarray(False), t=jnp.asarray(0, jnp.int32))

    def _after(self):
        return jnp.zeros((0,), jnp.int32) if self.after is None else self.after

    def _cache(self, model, prefix, prefix_valid):
        """KV cache of the (left-padded) prefix, batch 1, with room for x + after + o[:-1]."""
        room = self.cfg.request_len + self._after().shape[0] + self.cfg.output_len - 1
        return prompt_cache(model, prefix, prefix_valid.astype(bool), room)

    def _terms(self, model, cache, z):
        """The parts of f for z = [x; o] (ids [B, Lx+Lo] or one-hot [B, Lx+Lo, V]) after the cached prefix:
        ({"output_logprob", "plausibility", "danger"} [B] each, unweighted, present where the problem has
        that term; per-position output log-probs [B, Lo, V]; greedy-consistency [B])."""
        lx, b = self.cfg.request_len, z.shape[0]
        after = self._after()
        z_emb = embed(model, z)
        after_emb = jnp.broadcast_to(model.embed_tokens(after)[None], (b, after.shape[0], z_emb.shape[-1]))
        middle = jnp.concatenate([z_emb[:, :lx], after_emb.astype(z_emb.dtype), z_emb[:, lx:-1]], 1)
        logits, _, _ = model(embeds_btd=middle, cache=broadcast_cache(cache, b), logits_from=lx + after.shape[0] - 1)
        logp_blv = jax.nn.log_softmax(logits, -1)                                  # predicts o: [B, Lo, V]
        o = z[:, lx:]
        o_ids = o if jnp.issubdtype(z.dtype, jnp.integer) else jnp.argmax(o, -1)
        consistent = jnp.all(jnp.argmax(logp_blv, -1) == o_ids, -1)
        terms = {"output_logprob": pick_logprobs(logp_blv, o).sum(-1)}
        if self.plausibility is not None:
            terms["plausibility"] = self.plausibility(z[:, :lx], jnp.ones((b, lx), bool))
        if self.danger is not None:
            terms["danger"] = self.danger(o, jnp.ones((b, o.shape[1]), bool))
        return terms, logp_blv, consistent

    def _objective(self, model, cache, z):
        terms, logp_blv, consistent = self._terms(model, cache, z)
        f = terms["output_logprob"]
        if "plausibility" in terms:
            f = f + self.cfg.plausibility_weight * terms["plausibility"]
        if "danger" in terms:
            f = f + self.cfg.danger_weight * terms["danger"]
        return f, logp_blv, consistent

    def objective(self, prefix, z, prefix_valid=None):
        """f for sequences z = [x; o] as ids [B, Lx+Lo] or one-hot [B, Lx+Lo, V] after one prefix [P]
        (left-padded: prefix_valid [P]); also (per-position output log-probs [B, Lo, V], greedy-consistency [B])."""
        model = nnx.merge(self.graphdef, self.params)
        valid = jnp.ones(prefix.shape, bool) if prefix_valid is None else prefix_valid
        return self._objective(model, self._cache(model, prefix, valid), z)

    def scores(self, prefix, z, prefix_valid=None):
        """f's unweighted parts for z [B, Lx+Lo] after one prefix [P] (see `_terms`), plus "consistent" [B]."""
        model = nnx.merge(self.graphdef, self.params)
        valid = jnp.ones(prefix.shape, bool) if prefix_valid is None else prefix_valid
        terms, _, consistent = self._terms(model, self._cache(model, prefix, valid), z)
        return dict(terms, consistent=consistent)

    def step(self, state, key):
        del key
        cfg = self.cfg
        lx, lo = cfg.request_len, cfg.output_len
        model = nnx.merge(self.graphdef, self.params)
        cache = self._cache(model, state.prefix, state.prefix_valid)
        z = jnp.concatenate([state.x, state.o])
        j = state.t % (lx + lo)
        vocab = self.allowed.shape[0]
        one_hot = jax.nn.one_hot(z, vocab, dtype=jnp.float32)[None]

        def total(oh):
            f, logp_blv, _ = self._objective(model, cache, oh)
            return f.sum(), logp_blv

        grad, logp_blv = jax.grad(total, has_aux=True)(one_hot)
        first_order = grad[0, j] - jnp.sum(grad[0, j] * one_hot[0, j])            # [V]
        exact_next = jnp.where(j >= lx, logp_blv[0, jnp.maximum(j - lx, 0)], 0.0)  # ARCA's exact unigram term
        score = jnp.where(self.allowed, first_order + exact_next, -jnp.inf)
        top = jax.lax.top_k(score, cfg.candidates)[1]
        cands = jnp.concatenate([z[None], jnp.broadcast_to(z, (cfg.candidates, lx + lo)).at[:, j].set(top)])
        f, _, consistent = self._objective(model, cache, cands)
        i = jnp.argmax(f)
        best = cands[i]
        new = state._replace(x=best[:lx], o=best[lx:], objective=f[i], consistent=consistent[i], t=state.t + 1)
        return new, {"objective": f[i], "consistent": consistent[i].astype(jnp.float32)}

    def done(self, state):
        return jnp.asarray(False)
