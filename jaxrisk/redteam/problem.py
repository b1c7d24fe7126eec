"""Greedy Coordinate Gradient (Zou et al. 2023) as an engine problem.

One lane = one behaviour x one restart; the engine vmaps lanes, so many
behaviours and restarts share one compiled program (and one batch of
lanes x B candidate evaluations per step). Per step and lane:

1. gradient of the loss w.r.t. the one-hot suffix (prompt prefix computed once
   into a KV cache, candidates and target after it);
2. the top-k tokens per position (disallowed tokens precomputed once);
3. B candidates, each swapping `n_replace` positions (1: positions spread
   evenly, or drawn at random with positions="random"; more: random distinct
   positions, falling linearly to `n_replace_final` over the budget), tokens
   drawn from the top-k;
4. filters: a host-side one drops candidates whose decode/encode does not
   round-trip, and with `no_revisit` a per-lane Bloom filter drops suffixes
   already evaluated (and repeats within the draw); oversample x B are drawn,
   the first B that pass are kept, any shortfall is masked duplicates, so
   shapes never change and little compute is wasted; with `max_perplexity`
   a candidate whose request (goal + suffix) is more perplexing than that to
   a reference LM is evaluated but never taken (AutoDAN / FLRT style);
5. exact evaluation of all B candidates (with probe sampling, of a random
   B/16 and the B/R that a draft, the model's first layers, ranks best), ranked by loss (or, with
   select="matches", first by the target tokens the argmax gets right); the
   best (a candidate whose greedy continuation is the target, if any is)
   becomes the current suffix (or, with a buffer, enters the K best kept and
   the search goes on from the best of them), the best ever is kept, and the
   lane stops once the greedy continuation equals the target (teacher-forced
   argmax at every target position); with `restart_patience`, a lane whose best
   since its last restart has not improved for that many steps goes back to
   its start suffix (with `restart_noise`, a share of its tokens redrawn).

A lane may start from a suffix of its own (lane input `start`: a warm start
from a suffix that solved another behaviour, see gcg_run); its first step then
evaluates the start itself as well.

Loss = -log p(target) (mean over tokens, or mellowmax; or the margin loss) - sum_i w_i * extra_i,
where the extras are scorers of the request (goal + suffix), e.g. plausibility
or a danger probe; they enter the gradient too. The weights w_i are per lane,
so one program can sweep them.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrisk.mesh import host_callback
from jaxrisk.models.lm import broadcast_cache, embed, pick_logprobs, token_logprobs
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


def word_start_tokens(tokenizer, allowed: np.ndarray) -> np.ndarray:
    """[V] bool: the allowed tokens that begin a word (SentencePiece's '▁', byte-level BPE's 'Ġ'), which keep a
    suffix's decode / encode round trip far more often than word pieces do (a noisy restart draws from them);
    every allowed token where the tokenizer marks no word starts."""
    def starts_a_word(i: int) -> bool:
        try:
            piece = tokenizer.convert_ids_to_tokens(i)
        except (IndexError, KeyError, OverflowError, TypeError):
            return False
        return isinstance(piece, str) and len(piece) > 1 and piece[0] in "▁Ġ"

    words = allowed & np.array([starts_a_word(i) for i in range(len(allowed))], bool)
    return words if words.any() else allowed


def prompt_cache(model, before_p, valid_p, room: int):
    """KV cache (batch 1) of a left-padded prompt [P] with mask [P], and `room` free positions after it."""
    cache = model.init_cache(1, before_p.shape[0] + room)
    _, cache, _ = model(before_p[None], valid_bt=valid_p[None], cache=cache, logits=False)
    return cache


def target_margin_loss(logits_btv, target_bt, valid_bt, margin: float):
    """Mean over target tokens of max(0, margin - (logit of the target - the largest other logit)): zero exactly
    when every target token is the argmax by at least `margin` (greedy success), and only the tokens that are not
    yet carry gradient (a Carlini-Wagner loss; mean cross-entropy can be low while one token is still wrong)."""
    is_target = jax.nn.one_hot(target_bt, logits_btv.shape[-1], dtype=bool)
    mine = pick_logprobs(logits_btv, target_bt)      # the target's logit, by the one gather every loss uses
    other = jnp.max(jnp.where(is_target, -jnp.inf, logits_btv), -1)
    hinge = jnp.maximum(margin - (mine - other), 0.0)
    return jnp.sum(jnp.where(valid_bt, hinge, 0.0), -1) / valid_bt.sum(-1)


def _spearman(a, b, valid):
    """Spearman rank correlation of a [n] and b [n] over the valid entries (0 with fewer than two)."""
    n = valid.sum()
    rank = lambda x: jnp.argsort(jnp.argsort(jnp.where(valid, x, jnp.inf))).astype(jnp.float32)  # noqa: E731
    ra, rb = rank(a), rank(b)          # invalid entries rank last in both, and are left out below
    w = valid.astype(jnp.float32)
    mean = (n - 1) / 2
    cov = jnp.sum(w * (ra - mean) * (rb - mean))
    var = jnp.sum(w * (ra - mean) ** 2)
    return jnp.where(n > 1, cov / jnp.maximum(var, 1e-9), 0.0)


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
    step: jax.Array          # [] int32 steps taken
    best_matched: jax.Array  # [] int32 target tokens the best suffix gets right (teacher-forced argmax)
    buffer: jax.Array        # [K, Ls] int32 the K best suffixes (buffer_size > 0; else one unused row)
    buffer_loss: jax.Array   # [K] their losses (inf: empty slot)
    buffer_matched: jax.Array  # [K] int32 their matched target tokens
    seen: jax.Array          # [S] bool Bloom filter of evaluated suffixes (no_revisit; else one unused bit)
    extra_weights: jax.Array  # [E] float32 this lane's weight of each extra scorer (a sweep: one per lane; one
    #                           unused weight without extras: a checkpoint cannot hold an empty array)
    start: jax.Array         # [Ls] int32 the suffix the lane started from (a restart goes back to it)
    run_best_loss: jax.Array  # [] the best loss since the last restart (restart_patience)
    run_best_matched: jax.Array  # [] int32 its matched target tokens
    stale: jax.Array         # [] int32 steps since the best since the last restart improved
    restarts: jax.Array      # [] int32 restarts taken


@struct.dataclass
class GCGProblem:
    """Engine problem. Lane inputs: before [P] (left-padded), before_valid [P], goal [G] / goal_valid [G]
    (the request text, right-padded, for the extra scorers), target [T] / target_valid [T] (right-padded)."""

    CARRIED = ("buffer", "buffer_loss", "buffer_matched", "seen")   # state a second round may take from a first

    params: nnx.State
    after: jax.Array                 # [A] template tokens between the suffix and the target (may be empty)
    allowed: jax.Array               # [V] bool
    init_suffix: jax.Array           # [Ls]
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    cfg: GCGConfig = struct.field(pytree_node=False, default=GCGConfig())
    roundtrip: Any = struct.field(pytree_node=False, default=None)
    extras: tuple = ()               # ((weight, scorer), ...): scorers of (goal + suffix), pytrees
    restart_allowed: jax.Array | None = None   # [V] bool the tokens a noisy restart draws (None: `allowed`)
    plausibility: Any = None         # mean log p(request) scorer for cfg.max_perplexity (a SequenceScorer)
    plausibility_extra: int | None = struct.field(pytree_node=False, default=None)   # the extra that is that
    #                                  same scorer: the filter reuses its scores instead of computing them again
    max_steps: int = struct.field(pytree_node=False, default=250)   # for the n_replace schedule
    filter_steps: int | None = struct.field(pytree_node=False, default=None)   # steps the no-revisit filter is
    #                                  sized for (None: max_steps; a warm start: both rounds, which share one filter)

    @property
    def seen_bits(self) -> int:
        """Bloom filter size: a power of two >= 16 bits per suffix the lane can evaluate (2 hashes: < 1.5% false
        'seen' at the end of the budget; a false 'seen' only skips a candidate, never re-evaluates one)."""
        if not self.cfg.no_revisit:
            return 1
        steps = self.filter_steps or self.max_steps
        return 1 << max(10, (16 * steps * self.cfg.search_width - 1).bit_length())

    def init(self, key, lane):
        """A lane's first state. Optional lane inputs: `start` [Ls] replaces the initial suffix (a warm start);
        `extra_weights` [E] replaces the extras' own weights (a sweep of them as lanes); `buffer`, `buffer_loss`,
        `buffer_matched` and `seen` carry a first round's buffer and filter of evaluated suffixes into a second."""
        del key
        lane = dict(lane)
        start = lane.pop("start", self.init_suffix)
        weights = lane.pop("extra_weights", jnp.asarray([w for w, _ in self.extras] or [0.0], jnp.float32))
        k, ls = max(self.cfg.buffer_size, 1), self.init_suffix.shape[0]
        fresh = dict(buffer=jnp.broadcast_to(start, (k, ls)), buffer_loss=jnp.full((k,), jnp.inf, jnp.float32),
                     buffer_matched=jnp.full((k,), -1, jnp.int32), seen=jnp.zeros((self.seen_bits,), bool))
        carried = {name: lane.pop(name, fresh[name]) for name in self.CARRIED}
        if carried["seen"].shape != (self.seen_bits,):   # a carried filter must be the size this problem hashes into
            raise ValueError(f"GCGProblem.init: a carried filter of {carried['seen'].shape} bits, expected "
                             f"{self.seen_bits} (set filter_steps to the budget of both rounds)")
        return GCGState(**lane, **carried, current=start, best=start,
                        best_loss=jnp.asarray(jnp.inf, jnp.float32), success=jnp.asarray(False),
                        n_evals=jnp.asarray(0, jnp.int32), step=jnp.asarray(0, jnp.int32),
                        best_matched=jnp.asarray(-1, jnp.int32), extra_weights=jnp.asarray(weights, jnp.float32),
                        start=start, run_best_loss=jnp.asarray(jnp.inf, jnp.float32),
                        run_best_matched=jnp.asarray(-1, jnp.int32), stale=jnp.asarray(0, jnp.int32),
                        restarts=jnp.asarray(0, jnp.int32))

    def _order(self, loss, matched):
        """Indices best first: by loss, or with select='matches' by more target tokens right, then loss."""
        return jnp.lexsort((loss, -matched)) if self.cfg.select == "matches" else jnp.argsort(loss, stable=True)

    def _ranked_before(self, loss_a, matched_a, loss_b, matched_b):
        """a ranks before b: lower loss, or with select='matches' more target tokens right first."""
        if self.cfg.select == "loss":
            return loss_a < loss_b
        return (matched_a > matched_b) | ((matched_a == matched_b) & (loss_a < loss_b))

    def _n_replace(self, step):
        """Positions swapped per candidate at this step: n_replace falling linearly to n_replace_final."""
        cfg = self.cfg
        frac = jnp.minimum(step / max(self.max_steps - 1, 1), 1.0)
        return jnp.round(cfg.n_replace + (cfg.n_replace_final - cfg.n_replace) * frac).astype(jnp.int32)

    def _seen_bits(self, suffixes):
        """The two Bloom-filter bit indices [n, 2] of each suffix [n, Ls] (multiply-xor hashes)."""
        x = suffixes.astype(jnp.uint32)
        idx = []
        for seed, mult in ((0x9E3779B9, 0x85EBCA6B), (0x7F4A7C15, 0xC2B2AE35)):
            h = jnp.full(x.shape[:1], seed, jnp.uint32)
            for j in range(x.shape[1]):
                h = (h ^ x[:, j]) * jnp.uint32(mult)
                h = h ^ (h >> 15)
            idx.append(h % jnp.uint32(self.seen_bits))
        return jnp.stack(idx, -1).astype(jnp.int32)

    def _losses(self, model, cache, lane: GCGState, suffix, draft: bool = False):
        """Loss [B], the target tokens the argmax gets right [B] and each extra scorer's scores ([E] of [B]), for
        suffixes given as ids [B, Ls] or one-hot [B, Ls, V]. `draft`: the target loss alone, under the model's
        first `probe_layers` layers (probe sampling's cheap ranking)."""
        b = suffix.shape[0]
        t = lane.target.shape[0]
        target_b = jnp.broadcast_to(lane.target, (b, t))
        tvalid_b = jnp.broadcast_to(lane.target_valid, (b, t))
        middle = jnp.concatenate([embed(model, suffix),
                                  jnp.broadcast_to(model.embed_tokens(self.after)[None],
                                                   (b, self.after.shape[0], model.cfg.d_model)),
                                  model.embed_tokens(target_b[:, :-1])], axis=1)
        m = suffix.shape[1] + self.after.shape[0]
        logits, _, _ = model(embeds_btd=middle, cache=broadcast_cache(cache, b), logits_from=m - 1,
                             n_layers=self.cfg.probe_layers if draft else None)
        if self.cfg.margin is None:
            loss = -target_logprob(token_logprobs(logits, target_b), tvalid_b, self.cfg.mellowmax_alpha)
        else:
            loss = target_margin_loss(logits, target_b, tvalid_b, self.cfg.margin)
        matched = jnp.sum((jnp.argmax(logits, -1) == target_b) & tvalid_b, axis=-1)
        scores = []
        if self.extras and not draft:
            request, rvalid = self._request(lane, suffix)
            scores = [scorer(request, rvalid) for _, scorer in self.extras]
            for n, score in enumerate(scores):
                loss = loss - lane.extra_weights[n] * score
        return loss, matched, scores

    @staticmethod
    def _request(lane: GCGState, suffix):
        """The request (goal + suffix) [B, G + Ls] and its mask, for suffixes as ids [B, Ls] or one-hot [B, Ls, V]."""
        b, g = suffix.shape[0], lane.goal.shape[0]
        goal = lane.goal
        if not jnp.issubdtype(suffix.dtype, jnp.integer):
            goal = jax.nn.one_hot(goal, suffix.shape[-1], dtype=suffix.dtype)
        request = jnp.concatenate([jnp.broadcast_to(goal[None], (b,) + goal.shape), suffix], axis=1)
        return request, jnp.concatenate([jnp.broadcast_to(lane.goal_valid, (b, g)),
                                         jnp.ones((b, suffix.shape[1]), bool)], 1)

    def _candidates(self, state: GCGState, top, key):
        """B candidates [B, Ls] drawn from the top-k tokens per position [Ls, k], and which may be evaluated [B]:
        oversample x B are drawn and the first B that pass the filters (round-trip; with no_revisit, never
        evaluated before and not a repeat within the draw) are kept; a shortfall is masked copies of current."""
        cfg, ls = self.cfg, self.init_suffix.shape[0]
        b = cfg.search_width
        filtering = cfg.filter_retokenization and self.roundtrip is not None
        n = b * cfg.oversample if filtering or cfg.no_revisit else b   # draw more, keep the first B that pass
        most = max(cfg.n_replace, cfg.n_replace_final)
        if most == 1 and cfg.positions == "cyclic":
            pos = (jnp.arange(n) % ls)[:, None]        # cyclic: any prefix of the draws covers all positions
        elif most == 1:
            key, k_pos = jax.random.split(key)
            pos = jax.random.randint(k_pos, (n, 1), 0, ls)
        else:                                           # distinct random positions, the first r of them swapped
            key, k_pos = jax.random.split(key)
            pos = jnp.argsort(jax.random.uniform(k_pos, (n, ls)), axis=1)[:, :most]
        pick = jax.random.randint(key, pos.shape, 0, cfg.topk)   # single swaps: the same draws as before the parts
        swap = jnp.arange(pos.shape[1])[None] < self._n_replace(state.step)
        rows = jnp.broadcast_to(jnp.arange(n)[:, None], pos.shape)
        drawn = jnp.broadcast_to(state.current, (n, ls))
        drawn = drawn.at[rows, pos].set(jnp.where(swap, top[pos, pick], drawn[rows, pos]))
        ok = jnp.ones((n,), bool)
        if filtering:
            ok = host_callback(self.roundtrip, jax.ShapeDtypeStruct((n,), jnp.bool_), drawn)
        if cfg.no_revisit:
            bits = self._seen_bits(drawn)
            fresh = ~(state.seen[bits[:, 0]] & state.seen[bits[:, 1]])
            order = jnp.lexsort((jnp.arange(n), bits[:, 1], bits[:, 0]))   # equal suffixes: equal bits, adjacent
            first = jnp.ones((n,), bool).at[order[1:]].set(jnp.any(bits[order[1:]] != bits[order[:-1]], axis=-1))
            ok = ok & fresh & first
        keep = jnp.argsort(~ok, stable=True)[:b]         # passing candidates first, in draw order
        cands, ok = drawn[keep], ok[keep]
        cands = jnp.where(ok[:, None], cands, state.current[None])                  # masked duplicates
        return cands, ok

    def _probe_sampled(self, model, cache, state: GCGState, cands, ok, must, key):
        """Probe sampling (Zhao et al. 2024): the draft (the model's first layers) ranks all B candidates; the
        model scores a random probe set of B/16 and the draft's best B/probe_ratio of the rest (and `must`).
        Returns _losses' outputs over all B (inf / -1 where not scored), which were scored [B], and the draft's
        rank agreement with the model on the probe set (Spearman)."""
        b = cands.shape[0]
        n_probe, n_top = max(b // 16, 2), max(b // self.cfg.probe_ratio, 1)
        draft = jnp.where(ok, self._losses(model, cache, state, cands, draft=True)[0], jnp.inf)
        probe = jax.random.permutation(key, b)[:n_probe]
        rest = jnp.where(must, -jnp.inf, draft).at[probe].set(jnp.inf)
        chosen = jnp.concatenate([probe, jnp.argsort(rest)[:n_top]])     # distinct: the probe set ranks last
        loss, matched, scores = self._losses(model, cache, state, cands[chosen])
        exact = jnp.zeros((b,), bool).at[chosen].set(ok[chosen])
        spread = lambda x, fill: jnp.full((b,), fill, x.dtype).at[chosen].set(x)  # noqa: E731
        agreement = _spearman(draft[probe], loss[:n_probe], ok[probe])
        return (spread(loss, jnp.inf), spread(matched, -1), [spread(x, -jnp.inf) for x in scores], exact,
                agreement)

    def _restart_suffix(self, start, key, draws: int = 8):
        """Where a restart goes: the start suffix with a `restart_noise` share of its positions (drawn at random)
        replaced by random tokens of `restart_allowed` (else `allowed`); of `draws` such suffixes the first that
        survives decode / encode (with the round-trip filter on; else the first), or the start if none does: a
        suffix that does not round-trip would leave every single swap of it to the filter."""
        noise = self.cfg.restart_noise
        if not noise:
            return start
        k_pos, k_tok = jax.random.split(key)
        pool = self.allowed if self.restart_allowed is None else self.restart_allowed
        swap = jax.random.uniform(k_pos, (draws,) + start.shape) < noise
        tokens = jax.random.categorical(k_tok, jnp.where(pool, 0.0, -jnp.inf), shape=(draws,) + start.shape)
        drawn = jnp.where(swap, tokens.astype(start.dtype), start)
        if not (self.cfg.filter_retokenization and self.roundtrip is not None):
            return drawn[0]
        ok = host_callback(self.roundtrip, jax.ShapeDtypeStruct((draws,), jnp.bool_), drawn)
        return jnp.where(ok.any(), drawn[jnp.argmax(ok)], start)

    def step(self, state, key):
        cfg = self.cfg
        model = nnx.merge(self.graphdef, self.params)
        ls, t, a = self.init_suffix.shape[0], state.target.shape[0], self.after.shape[0]
        cache = prompt_cache(model, state.before, state.before_valid, room=ls + a + t - 1)

        one_hot = jax.nn.one_hot(state.current, model.cfg.vocab_size, dtype=jnp.float32)[None]
        grad = jax.grad(lambda oh: self._losses(model, cache, state, oh)[0].sum())(one_hot)[0]  # [Ls, V]
        grad = jnp.where(self.allowed, grad, jnp.inf)
        top = jax.lax.top_k(-grad, cfg.topk)[1]                                        # [Ls, k]

        cands, ok = self._candidates(state, top, key)
        must = jnp.zeros(ok.shape, bool)
        if cfg.warm_start_step:   # a warm start may already succeed: its first step evaluates the start itself too
            first = state.step == 0   # (with no_revisit, unless the first round evaluated it: its own best)
            if cfg.no_revisit:
                bits = self._seen_bits(state.current[None])[0]
                first = first & ~(state.seen[bits[0]] & state.seen[bits[1]])
            cands, ok = cands.at[0].set(jnp.where(first, state.current, cands[0])), ok.at[0].set(ok[0] | first)
            must = must.at[0].set(first)
        extra_metrics = {}
        if cfg.probe_layers:   # the model scores only a probe set and the draft's best: `ok` becomes those
            loss, matched, scores, ok, extra_metrics["probe_agreement"] = self._probe_sampled(
                model, cache, state, cands, ok, must, jax.random.fold_in(key, 1))   # the same candidates as without
        else:
            loss, matched, scores = self._losses(model, cache, state, cands)
        takeable = ok
        if cfg.max_perplexity is not None:   # a request the reference LM finds too unlikely is never taken
            if self.plausibility_extra is not None:
                plausible = scores[self.plausibility_extra]
            else:
                plausible = self.plausibility(*self._request(state, cands))
            takeable = ok & (plausible >= -np.log(cfg.max_perplexity))
        loss = jnp.where(takeable, loss, jnp.inf)
        matched = jnp.where(takeable, matched, -1)
        match = matched == state.target_valid.sum()
        # the step's best: a candidate that succeeds if any does (the lowest-loss one of those), else the first
        # in the ranking (a success must not be lost to a lower-loss candidate that misses a target token)
        i = jnp.where(match.any(), jnp.argmin(jnp.where(match, loss, jnp.inf)), self._order(loss, matched)[0])
        moved = jnp.isfinite(loss[i])
        better = moved & self._ranked_before(loss[i], matched[i], state.best_loss, state.best_matched)
        # a success is always the best: report the suffix that succeeded
        take = better & ~state.success | moved & match[i] & ~state.success
        best, best_loss, best_matched = (jnp.where(take, mine, kept) for mine, kept in (
            (cands[i], state.best), (loss[i], state.best_loss), (matched[i], state.best_matched)))
        buffer, buffer_loss, buffer_matched = state.buffer, state.buffer_loss, state.buffer_matched
        if cfg.buffer_size:   # the step's best replaces the buffer's worst if it ranks before it
            w = self._order(buffer_loss, buffer_matched)[-1]
            enter = moved & self._ranked_before(loss[i], matched[i], buffer_loss[w], buffer_matched[w])
            buffer = jnp.where(enter, buffer.at[w].set(cands[i]), buffer)
            buffer_loss = jnp.where(enter, buffer_loss.at[w].set(loss[i]), buffer_loss)
            buffer_matched = jnp.where(enter, buffer_matched.at[w].set(matched[i]), buffer_matched)
            current = buffer[self._order(buffer_loss, buffer_matched)[0]]
        else:
            current = jnp.where(moved, cands[i], state.current)
        run_best_loss, run_best_matched, stale, restarts = (state.run_best_loss, state.run_best_matched,
                                                            state.stale, state.restarts)
        if cfg.restart_patience:   # no better suffix for `restart_patience` steps: start again from the start
            improved = moved & self._ranked_before(loss[i], matched[i], run_best_loss, run_best_matched)
            run_best_loss = jnp.where(improved, loss[i], run_best_loss)
            run_best_matched = jnp.where(improved, matched[i], run_best_matched)
            stale = jnp.where(improved, 0, stale + 1)
            again = stale >= cfg.restart_patience
            start = self._restart_suffix(state.start, jax.random.fold_in(key, 2))
            current = jnp.where(again, start, current)
            buffer = jnp.where(again, jnp.broadcast_to(start, buffer.shape), buffer)
            buffer_loss = jnp.where(again, jnp.inf, buffer_loss)
            buffer_matched = jnp.where(again, -1, buffer_matched)
            run_best_loss = jnp.where(again, jnp.inf, run_best_loss)
            run_best_matched = jnp.where(again, -1, run_best_matched)
            stale = jnp.where(again, 0, stale)
            restarts = restarts + again
        seen = state.seen
        if cfg.no_revisit:
            bits = self._seen_bits(cands)
            seen = seen.at[jnp.where(ok[:, None], bits, self.seen_bits)].set(True, mode="drop")
        new = state._replace(current=current, best=best, best_loss=best_loss, best_matched=best_matched,
                             success=state.success | (moved & match[i]), n_evals=state.n_evals + ok.sum(),
                             step=state.step + 1, buffer=buffer, buffer_loss=buffer_loss,
                             buffer_matched=buffer_matched, seen=seen, run_best_loss=run_best_loss,
                             run_best_matched=run_best_matched, stale=stale, restarts=restarts)
        metrics = {"loss": loss[i], "best_loss": new.best_loss, "kept": ok.mean(), **extra_metrics}
        return new, metrics

    def done(self, state):
        return state.success & self.cfg.early_stop
