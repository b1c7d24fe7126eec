"""Joint request / output search in the style of ARCA (Jones et al. 2023) as an engine problem.

The request x (Lx tokens after a fixed prefix) and the output o (Lo tokens)
are optimised together by coordinate ascent on

    f(x, o) = log p(o | prefix, x) + w_plaus * plausibility(x) + w_danger * danger(o)

where plausibility and danger are scorers (e.g. mean log p(x) under the model,
a linear danger probe on the output). Step s updates position s mod (Lx + Lo):
candidate tokens come from the gradient of f w.r.t. that position's one-hot
row; for an output position the exact log p(o_j = v | prefix, x, o_<j) of
every v (one forward pass) is added, as ARCA does. The k best candidates and
the current token are evaluated exactly and the best is kept, so f never
decreases. `consistent` reports whether o is the model's greedy output for x.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrisk.scorers.lm import embed


@dataclasses.dataclass(frozen=True, kw_only=True)
class ARCAConfig:
    request_len: int = 6
    output_len: int = 4
    candidates: int = 64            # exact evaluations per step (the top-k of the first-order scores)
    plausibility_weight: float = 1.0
    danger_weight: float = 1.0


@struct.dataclass
class ARCAProblem:
    """Lane inputs: prefix [P] (fixed, e.g. BOS + a context), x0 [Lx], o0 [Lo] (initial tokens; -1 = random)."""

    params: nnx.State
    allowed: jax.Array                      # [V] bool
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    cfg: ARCAConfig = struct.field(pytree_node=False, default=ARCAConfig())
    plausibility: object = None             # scorer(tokens_or_onehot [B, Lx], valid) -> [B]
    danger: object = None                   # scorer(tokens_or_onehot [B, Lo], valid) -> [B]

    def init(self, key, lane):
        """Entries of x0 / o0 that are -1 start as random allowed tokens (independent restarts)."""
        lx, lo = self.cfg.request_len, self.cfg.output_len
        logits = jnp.where(self.allowed, 0.0, -jnp.inf)
        draw = jax.random.categorical(key, logits, shape=(lx + lo,)).astype(jnp.int32)
        z0 = jnp.concatenate([lane["x0"], lane["o0"]])
        z = jnp.where(z0 < 0, draw, z0)
        return dict(lane, x=z[:lx], o=z[lx:], objective=jnp.asarray(-jnp.inf, jnp.float32),
                    consistent=jnp.asarray(False), t=jnp.asarray(0, jnp.int32))

    def objective(self, prefix, z):
        """f for sequences z = [x; o] as ids [B, Lx+Lo] or one-hot [B, Lx+Lo, V]; also (per-position
        output log-probs [B, Lo, V], greedy-consistency [B])."""
        model = nnx.merge(self.graphdef, self.params)
        lx, b, p = self.cfg.request_len, z.shape[0], prefix.shape[0]
        x_emb = embed(model, z)
        prefix_emb = jnp.broadcast_to(model.embed_tokens(prefix)[None], (b, p, x_emb.shape[-1]))
        logits, _, _ = model(embeds_btd=jnp.concatenate([prefix_emb, x_emb[:, :-1]], 1), logits_from=p + lx - 1)
        logp_blv = jax.nn.log_softmax(logits, -1)                                  # predicts o: [B, Lo, V]
        o = z[:, lx:]
        if jnp.issubdtype(z.dtype, jnp.integer):
            logp_o = jnp.take_along_axis(logp_blv, o[..., None], -1)[..., 0]
            consistent = jnp.all(jnp.argmax(logp_blv, -1) == o, -1)
        else:
            logp_o = jnp.sum(logp_blv * o, -1)
            consistent = jnp.all(jnp.argmax(logp_blv, -1) == jnp.argmax(o, -1), -1)
        f = logp_o.sum(-1)
        if self.plausibility is not None:
            f = f + self.cfg.plausibility_weight * self.plausibility(z[:, :lx], jnp.ones((b, lx), bool))
        if self.danger is not None:
            lo = o.shape[1]
            f = f + self.cfg.danger_weight * self.danger(o, jnp.ones((b, lo), bool))
        return f, logp_blv, consistent

    def step(self, state, key):
        del key
        cfg = self.cfg
        lx, lo = cfg.request_len, cfg.output_len
        z = jnp.concatenate([state["x"], state["o"]])
        j = state["t"] % (lx + lo)
        vocab = self.allowed.shape[0]
        one_hot = jax.nn.one_hot(z, vocab, dtype=jnp.float32)[None]

        def total(oh):
            f, logp_blv, _ = self.objective(state["prefix"], oh)
            return f.sum(), logp_blv

        grad, logp_blv = jax.grad(total, has_aux=True)(one_hot)
        first_order = grad[0, j] - jnp.sum(grad[0, j] * one_hot[0, j])            # [V]
        exact_next = jnp.where(j >= lx, logp_blv[0, jnp.maximum(j - lx, 0)], 0.0)  # ARCA's exact unigram term
        score = jnp.where(self.allowed, first_order + exact_next, -jnp.inf)
        top = jax.lax.top_k(score, cfg.candidates)[1]
        cands = jnp.concatenate([z[None], jnp.broadcast_to(z, (cfg.candidates, lx + lo)).at[:, j].set(top)])
        f, _, consistent = self.objective(state["prefix"], cands)
        i = jnp.argmax(f)
        best = cands[i]
        new = dict(state, x=best[:lx], o=best[lx:], objective=f[i], consistent=consistent[i], t=state["t"] + 1)
        return new, {"objective": f[i], "consistent": consistent[i].astype(jnp.float32)}

    def done(self, state):
        return jnp.asarray(False)
