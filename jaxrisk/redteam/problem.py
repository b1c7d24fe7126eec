"""Greedy Coordinate Gradient (Zou et al. 2023) as an engine problem.

One lane = one behaviour x one restart; the engine vmaps lanes, so many
behaviours and restarts share one compiled program (and one batch of
lanes x B candidate evaluations per step). Per step and lane:

1. gradient of the loss w.r.t. the one-hot suffix (prompt prefix computed once
   into a KV cache, candidates and target after it);
2. the top-k tokens per position (disallowed tokens precomputed once);
3. B single-token swaps, positions spread evenly, tokens drawn from the top-k;
4. a host-side filter drops candidates whose decode/encode does not round-trip
   (2B are drawn, the first B that pass are kept; any shortfall is filled with
   masked duplicates), so shapes never change and little compute is wasted;
5. exact evaluation of all B candidates; the best becomes the current suffix,
   the best ever is kept, and the lane stops once the greedy continuation
   equals the target (teacher-forced argmax at every target position).

Loss = -log p(target) (mean over tokens, or mellowmax) - sum_i w_i * extra_i,
where the extras are scorers of the request (goal + suffix), e.g. plausibility
or a danger probe; they enter the gradient too.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrisk.mesh import host_callback
from jaxrisk.models.lm import broadcast_cache, embed, token_logprobs
from jaxrisk.redteam.config import GCGConfig
from jaxrisk.scorers.lm import target_logprob


class RoundTrip:
    """Host-side check that decode -> encode gives the same ids back (a candidate a user could type)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        flat = np.asarray(ids).reshape(-1, ids.shape[-1]).tolist()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:   # the Rust tokenizer directly: ~3x faster than the Python wrapper
            texts = backend.decode_batch(flat, skip_special_tokens=False)
            again = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            texts = self.tokenizer.batch_decode(flat)
            again = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ok = np.array([list(a) == b for a, b in zip(again, flat)], bool)
        return ok.reshape(np.shape(ids)[:-1])

    def fingerprint(self) -> str:
        """The wrapped tokenizer by content (its full JSON where it has one), for the engine's run identity."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else self.name
        return hashlib.sha256(text.encode()).hexdigest()

    # identity for the jit cache: the tokenizer it wraps
    def __repr__(self) -> str:
        return f"RoundTrip({self.name})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RoundTrip) and other.tokenizer is self.tokenizer

    def __hash__(self) -> int:
        return hash(self.name)


def allowed_tokens(tokenizer, vocab_size: int, allow_non_ascii: bool = False) -> np.ndarray:
    """[V] bool: tokens GCG may place (printable ASCII unless allowed otherwise; never special tokens)."""
    ok = np.ones(vocab_size, bool)
    if not allow_non_ascii:
        for i in range(vocab_size):
            text = tokenizer.decode([i])
            ok[i] = bool(text) and text.isascii() and text.isprintable()
    for i in tokenizer.all_special_ids:
        if 0 <= i < vocab_size:
            ok[i] = False
    return ok


def prompt_cache(model, before_p, valid_p, room: int):
    """KV cache (batch 1) of a left-padded prompt [P] with mask [P], and `room` free positions after it."""
    cache = model.init_cache(1, before_p.shape[0] + room)
    _, cache, _ = model(before_p[None], valid_bt=valid_p[None], cache=cache, logits=False)
    return cache


class GCGState(NamedTuple):
    """One lane's state: its inputs (see GCGProblem) and the search's progress."""
    before: jax.Array        # [P] template + goal tokens before the suffix (left-padded)
    before_valid: jax.Array  # [P] bool
    goal: jax.Array          # [G] the request text, for the extra scorers (right-padded)
    goal_valid: jax.Array    # [G] bool
    target: jax.Array        # [T] what the model should say (right-padded)
    target_valid: jax.Array  # [T] bool
    current: jax.Array       # [Ls] int32 the suffix the next step starts from
    best: jax.Array          # [Ls] int32 the best suffix so far (the succeeding one once successful)
    best_loss: jax.Array     # [] its loss
    success: jax.Array       # [] bool the greedy continuation of some evaluated suffix was the target
    n_evals: jax.Array       # [] int32 candidates evaluated exactly


@struct.dataclass
class GCGProblem:
    """Engine problem. Lane inputs: before [P] (left-padded), before_valid [P], goal [G] / goal_valid [G]
    (the request text, right-padded, for the extra scorers), target [T] / target_valid [T] (right-padded)."""

    params: nnx.State
    after: jax.Array                 # [A] template tokens between the suffix and the target (may be empty)
    allowed: jax.Array               # [V] bool
    init_suffix: jax.Array           # [Ls]
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    cfg: GCGConfig = struct.field(pytree_node=False, default=GCGConfig())
    roundtrip: Any = struct.field(pytree_node=False, default=None)
    extras: tuple = ()               # ((weight, scorer), ...): scorers of (goal + suffix), pytrees

    def init(self, key, lane):
        del key
        return GCGState(**lane, current=self.init_suffix, best=self.init_suffix,
                        best_loss=jnp.asarray(jnp.inf, jnp.float32), success=jnp.asarray(False),
                        n_evals=jnp.asarray(0, jnp.int32))

    def _losses(self, model, cache, lane: GCGState, suffix):
        """Loss [B] and greedy-match [B] for suffixes given as ids [B, Ls] or one-hot [B, Ls, V]."""
        b = suffix.shape[0]
        t = lane.target.shape[0]
        target_b = jnp.broadcast_to(lane.target, (b, t))
        tvalid_b = jnp.broadcast_to(lane.target_valid, (b, t))
        middle = jnp.concatenate([embed(model, suffix),
                                  jnp.broadcast_to(model.embed_tokens(self.after)[None],
                                                   (b, self.after.shape[0], model.cfg.d_model)),
                                  model.embed_tokens(target_b[:, :-1])], axis=1)
        m = suffix.shape[1] + self.after.shape[0]
        logits, _, _ = model(embeds_btd=middle, cache=broadcast_cache(cache, b), logits_from=m - 1)
        loss = -target_logprob(token_logprobs(logits, target_b), tvalid_b, self.cfg.mellowmax_alpha)
        match = jnp.all((jnp.argmax(logits, -1) == target_b) | ~tvalid_b, axis=-1)
        if self.extras:
            g = lane.goal.shape[0]
            goal = lane.goal
            if not jnp.issubdtype(suffix.dtype, jnp.integer):
                goal = jax.nn.one_hot(goal, suffix.shape[-1], dtype=suffix.dtype)
            request = jnp.concatenate([jnp.broadcast_to(goal[None], (b,) + goal.shape), suffix], axis=1)
            rvalid = jnp.concatenate([jnp.broadcast_to(lane.goal_valid, (b, g)), jnp.ones((b, suffix.shape[1]), bool)],
                                     1)
            for weight, scorer in self.extras:
                loss = loss - weight * scorer(request, rvalid)
        return loss, match

    def step(self, state, key):
        cfg = self.cfg
        model = nnx.merge(self.graphdef, self.params)
        ls, t, a = self.init_suffix.shape[0], state.target.shape[0], self.after.shape[0]
        cache = prompt_cache(model, state.before, state.before_valid, room=ls + a + t - 1)

        one_hot = jax.nn.one_hot(state.current, model.cfg.vocab_size, dtype=jnp.float32)[None]
        grad = jax.grad(lambda oh: self._losses(model, cache, state, oh)[0].sum())(one_hot)[0]  # [Ls, V]
        grad = jnp.where(self.allowed, grad, jnp.inf)
        top = jax.lax.top_k(-grad, cfg.topk)[1]                                        # [Ls, k]

        b = cfg.search_width
        filtering = cfg.filter_retokenization and self.roundtrip is not None
        n = b * cfg.oversample if filtering else b        # draw more, keep the first B that round-trip
        pos = jnp.arange(n) % ls                        # cyclic: any prefix of the draws covers all positions
        pick = jax.random.randint(key, (n,), 0, cfg.topk)
        drawn = jnp.broadcast_to(state.current, (n, ls)).at[jnp.arange(n), pos].set(top[pos, pick])
        if filtering:
            ok = host_callback(self.roundtrip, jax.ShapeDtypeStruct((n,), jnp.bool_), drawn)
            keep = jnp.argsort(~ok, stable=True)[:b]     # round-tripping candidates first, in draw order
            cands, ok = drawn[keep], ok[keep]
        else:
            cands, ok = drawn, jnp.ones((b,), bool)
        cands = jnp.where(ok[:, None], cands, state.current[None])                  # masked duplicates

        loss, match = self._losses(model, cache, state, cands)
        loss = jnp.where(ok, loss, jnp.inf)
        i = jnp.argmin(loss)
        moved = jnp.isfinite(loss[i])
        current = jnp.where(moved, cands[i], state.current)
        better = loss[i] < state.best_loss
        best = jnp.where(better, cands[i], state.best)
        # a success is always the best: report the suffix that succeeded
        best = jnp.where(moved & match[i] & ~state.success, cands[i], best)
        new = state._replace(current=current, best=best, best_loss=jnp.where(better, loss[i], state.best_loss),
                             success=state.success | (moved & match[i]), n_evals=state.n_evals + ok.sum())
        metrics = {"loss": loss[i], "best_loss": new.best_loss, "kept": ok.mean()}
        return new, metrics

    def done(self, state):
        return state.success & self.cfg.early_stop
