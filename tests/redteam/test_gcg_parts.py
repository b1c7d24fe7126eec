"""The parts of the stronger GCG search, each on a tiny random Llama where its effect is known: the filter of
evaluated suffixes, the buffer of the best suffixes, multi-coordinate swaps and ranking by matched tokens.
Each step's evaluated candidates are recorded from inside the compiled step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_llama_config
from jaxrisk.errors import InputError
from jaxrisk.redteam import PLAIN_GCG, GCGConfig
from jaxrisk.redteam.problem import GCGProblem

# 2 suffix tokens over a 64-token vocabulary and top-k 8: 64 reachable suffixes from any current one, so
# 30 steps of 16 candidates revisit many of them unless told not to
# plain GCG (PLAIN_GCG), each test switching on the part it tests
TINY = GCGConfig(search_width=16, topk=8, suffix_len=2, early_stop=False, filter_retokenization=False, **PLAIN_GCG)
STEPS = 30


class Recording(GCGProblem):
    """GCGProblem that keeps every step's evaluated candidates (those the filters let through)."""

    def _candidates(self, state, top, key):
        cands, ok = super()._candidates(state, top, key)
        record = lambda *a: self.log.append(tuple(np.asarray(x) for x in a))  # noqa: E731
        jax.debug.callback(record, state.step, state.current, cands, ok, ordered=True)
        return cands, ok


def tiny_plausibility():
    """Mean log p(request) under the tiny random Llama of run_tiny (token 1 as BOS)."""
    from jaxrisk.models.lm import LanguageModel
    from jaxrisk.scorers import SequenceScorer

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    return SequenceScorer(params=lm.params, bos=jnp.asarray([1], jnp.int32), graphdef=lm.graphdef)


def run_tiny(cfg: GCGConfig, steps: int = STEPS, seed: int = 0, **fields):
    """Eager GCG steps on a random 2-layer Llama: (the state after each step, per-step metrics, recorded
    candidates). `fields`: more GCGProblem fields (extras, plausibility_extra)."""
    from jaxrisk.models.lm import LanguageModel

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    problem = Recording(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.ones((64,), bool),
                        init_suffix=jnp.asarray([5, 6], jnp.int32), graphdef=lm.graphdef, cfg=cfg, max_steps=steps,
                        plausibility=tiny_plausibility() if cfg.max_perplexity is not None else None, **fields)
    object.__setattr__(problem, "log", [])
    lane = dict(before=jnp.asarray([1, 9, 10], jnp.int32), before_valid=jnp.ones((3,), bool),
                goal=jnp.asarray([9, 10], jnp.int32), goal_valid=jnp.ones((2,), bool),
                target=jnp.asarray([11, 12, 13], jnp.int32), target_valid=jnp.ones((3,), bool))
    states, metrics = [problem.init(None, lane)], []
    step = jax.jit(problem.step)
    for key in jax.random.split(jax.random.key(seed), steps):
        state, m = step(states[-1], key)
        states.append(state)
        metrics.append({k: float(v) for k, v in m.items()})
    jax.effects_barrier()
    return states[1:], metrics, problem.log


def evaluated(log) -> list[tuple]:
    return [tuple(row) for _, _, cands, ok in log for row in cands[ok]]


@pytest.mark.slow   # a compiled search of 15-30 s on 2 busy cores
def test_no_revisit_never_evaluates_a_suffix_twice():
    plain = evaluated(run_tiny(TINY)[2])
    assert len(set(plain)) < len(plain) - 50   # the setting revisits a lot without the filter
    filtered = evaluated(run_tiny(dataclasses.replace(TINY, no_revisit=True))[2])
    assert len(set(filtered)) == len(filtered)
    assert len(filtered) >= len(set(plain))     # and reaches at least as many distinct suffixes


@pytest.mark.slow   # a compiled search of 15-30 s on 2 busy cores
@pytest.mark.parametrize("buffer_size", [0, 3])
def test_a_warm_round_carries_the_buffer_and_the_filter_of_evaluated_suffixes(buffer_size):
    """A warm start's second round goes on with the first round's buffer and filter: over both rounds no suffix is
    evaluated twice (the start, the lane's own best, is not evaluated again) and the buffer never loses its best."""
    from jaxrisk.models.lm import LanguageModel

    cfg = dataclasses.replace(TINY, no_revisit=True, buffer_size=buffer_size, warm_start_step=10)
    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    log = []
    first = Recording(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.ones((64,), bool),
                      init_suffix=jnp.asarray([5, 6], jnp.int32), graphdef=lm.graphdef, cfg=cfg, max_steps=10,
                      filter_steps=STEPS)
    second = first.replace(max_steps=STEPS - 10)
    for problem in (first, second):
        object.__setattr__(problem, "log", log)
    lane = dict(before=jnp.asarray([1, 9, 10], jnp.int32), before_valid=jnp.ones((3,), bool),
                goal=jnp.asarray([9, 10], jnp.int32), goal_valid=jnp.ones((2,), bool),
                target=jnp.asarray([11, 12, 13], jnp.int32), target_valid=jnp.ones((3,), bool))
    keys = jax.random.split(jax.random.key(0), STEPS)
    state, step = first.init(None, lane), jax.jit(first.step)
    for key in keys[:10]:
        state, _ = step(state, key)
    jax.effects_barrier()
    in_first = len(evaluated(log))
    carried = {name: getattr(state, name) for name in ("buffer", "buffer_loss", "buffer_matched", "seen")}
    warm, step = second.init(None, lane | carried | {"start": state.best}), jax.jit(second.step)
    assert warm.seen.shape == state.seen.shape and bool(warm.seen.any())
    for key in keys[10:]:
        warm, _ = step(warm, key)
        if buffer_size:
            assert float(warm.buffer_loss.min()) <= float(state.buffer_loss.min())
    jax.effects_barrier()
    suffixes = evaluated(log)
    assert len(set(suffixes)) == len(suffixes)
    assert tuple(np.asarray(state.best)) in set(suffixes[:in_first])   # evaluated once, in the first round
    if not buffer_size:   # the search moves on from the start: the second round evaluates many new suffixes
        assert len(suffixes) - in_first > 50


def test_buffer_keeps_the_best_suffixes_and_searches_from_the_best():
    states, metrics, _ = run_tiny(dataclasses.replace(TINY, buffer_size=3))
    for t, state in enumerate(states):   # after every step: the 3 best step winners so far, searched from the best
        so_far = sorted(m["loss"] for m in metrics[:t + 1])[:3]
        kept = np.asarray(state.buffer_loss)
        np.testing.assert_allclose(np.sort(kept[np.isfinite(kept)]), so_far, rtol=1e-6)
        np.testing.assert_array_equal(state.current, state.buffer[int(np.argmin(kept))])
        assert float(state.best_loss) == pytest.approx(so_far[0])
        np.testing.assert_array_equal(state.best, state.current)


def test_gcg_without_buffer_moves_to_each_steps_best_even_if_worse():
    states, metrics, _ = run_tiny(TINY)
    losses = [m["loss"] for m in metrics]
    assert any(b > a for a, b in zip(losses, losses[1:]))   # plain GCG does go uphill
    assert float(states[-1].best_loss) == pytest.approx(min(losses))


def run_six_tokens(cfg: GCGConfig, steps: int):
    """Eager steps from a 6-token suffix on the tiny random Llama: (the problem, recorded candidates)."""
    from jaxrisk.models.lm import LanguageModel

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    problem = Recording(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.ones((64,), bool),
                        init_suffix=jnp.arange(20, 26, dtype=jnp.int32), graphdef=lm.graphdef, cfg=cfg,
                        max_steps=steps)
    object.__setattr__(problem, "log", [])
    state = problem.init(None, dict(before=jnp.asarray([1, 9], jnp.int32), before_valid=jnp.ones((2,), bool),
                                    goal=jnp.asarray([9], jnp.int32), goal_valid=jnp.ones((1,), bool),
                                    target=jnp.asarray([11, 12], jnp.int32), target_valid=jnp.ones((2,), bool)))
    step = jax.jit(problem.step)
    for key in jax.random.split(jax.random.key(0), steps):
        state, _ = step(state, key)
    jax.effects_barrier()
    return problem, problem.log


def test_multi_coordinate_swaps_fall_from_n_replace_to_the_final_count():
    cfg = GCGConfig(search_width=32, topk=8, suffix_len=6, early_stop=False, filter_retokenization=False,
                    n_replace=4, n_replace_final=1)
    problem, log = run_six_tokens(cfg, steps=10)
    assert [int(problem._n_replace(t)) for t in range(10)] == [4, 4, 3, 3, 3, 2, 2, 2, 1, 1]
    for t, (_, current, cands, ok) in enumerate(log):
        changed = (cands[ok] != current[None]).sum(1)
        r = int(problem._n_replace(t))
        assert changed.max() == r and changed.mean() > r - 1   # r positions (a drawn token may equal the old one)


@pytest.mark.parametrize("positions", ["cyclic", "random"])
def test_single_swaps_change_one_position_spread_evenly_or_drawn_at_random(positions):
    cfg = GCGConfig(search_width=32, topk=8, suffix_len=6, early_stop=False, filter_retokenization=False,
                    positions=positions)
    _, log = run_six_tokens(cfg, steps=5)
    at = []
    for _, current, cands, ok in log:
        changed = cands != current[None]
        assert ok.all() and changed.sum(1).max() == 1   # one position each (a drawn token may equal the old one)
        at.append(np.where(changed.any(1), changed.argmax(1), -1))
    at = np.stack(at)                                   # [steps, B]: the position each candidate swapped
    cyclic = np.broadcast_to(np.arange(32) % 6, at.shape)
    swapped = at >= 0
    if positions == "cyclic":
        np.testing.assert_array_equal(at[swapped], cyclic[swapped])
    else:
        assert np.mean(at[swapped] != cyclic[swapped]) > 0.5   # drawn at random: ~5/6 differ from the cycle
        assert set(at[swapped].tolist()) == set(range(6))


@pytest.mark.slow   # a compiled search of 15-30 s on 2 busy cores
def test_perplexity_filter_never_moves_to_a_request_above_the_bound():
    score = tiny_plausibility()

    def perplexity(suffix):   # of the request: run_tiny's goal [9, 10] + the suffix
        request = jnp.asarray([[9, 10, *np.asarray(suffix).tolist()]])
        return float(np.exp(-score(request, jnp.ones(request.shape, bool))[0]))

    free = [perplexity(state.current) for state in run_tiny(TINY)[0]]
    bound = float(np.median(free))   # plain GCG goes above it on about half of its steps
    assert sum(p > bound * 1.001 for p in free) >= 5
    states, metrics, _ = run_tiny(dataclasses.replace(TINY, max_perplexity=bound))
    moved = [state for state, m in zip(states, metrics) if np.isfinite(m["loss"])]
    assert len(moved) >= STEPS // 2   # it still searches
    assert all(perplexity(state.current) <= bound * 1.001 for state in moved)
    assert perplexity(states[-1].best) <= bound * 1.001


@pytest.mark.slow   # three compiled searches
def test_perplexity_filter_reuses_the_fluency_terms_scores_and_searches_the_same(monkeypatch):
    """With log p(request) in the objective and the perplexity filter on, the filter takes the extra's scores
    (one scorer pass per step fewer) and the search is the same step for step."""
    from jaxrisk.redteam.gcg_run import _same_scorer
    from jaxrisk.scorers import SequenceScorer

    fluency = tiny_plausibility()
    assert _same_scorer(fluency, [(0.5, fluency)]) == 0 and _same_scorer(fluency, []) is None
    assert _same_scorer(fluency, [(0.5, tiny_plausibility())]) is None   # a copy of the weights: judged by identity
    calls = []
    real = SequenceScorer.__call__
    monkeypatch.setattr(SequenceScorer, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    extras = ((0.5, fluency),)
    free = run_tiny(TINY, steps=8, extras=extras)[0]
    perplexity = [float(np.exp(-fluency(r, jnp.ones(r.shape, bool))[0]))
                  for r in (jnp.asarray([[9, 10, *np.asarray(st.current).tolist()]]) for st in free)]
    cfg = dataclasses.replace(TINY, max_perplexity=float(np.median(perplexity)))   # binds on about half the steps
    runs = {}
    for reuse in (None, 0):
        calls.clear()
        runs[reuse] = run_tiny(cfg, steps=8, extras=extras, plausibility_extra=reuse)
        runs[reuse] += (len(calls),)   # scorer calls traced in the one compiled step
    assert runs[None][3] == 3 and runs[0][3] == 2   # gradient + candidates (+ the filter's own pass)
    for a, b in zip(runs[None][0], runs[0][0]):
        np.testing.assert_array_equal(a.current, b.current)
        np.testing.assert_array_equal(a.best, b.best)
    assert any(not np.array_equal(a.current, b.current) for a, b in zip(free, runs[0][0]))   # the filter acted


def test_restarts_go_back_to_the_start_after_patience_steps_without_a_better_suffix_and_keep_the_best():
    patience = 3
    states, metrics, _ = run_tiny(dataclasses.replace(TINY, restart_patience=patience))
    start = np.asarray([5, 6])
    run_best, stale, restarts = np.inf, 0, 0
    for t, m in enumerate(metrics):   # the rule, replayed on the losses of each step's best
        run_best, stale = (m["loss"], 0) if m["loss"] < run_best else (run_best, stale + 1)
        again = stale >= patience
        if again:
            run_best, stale, restarts = np.inf, 0, restarts + 1
        assert int(states[t].restarts) == restarts and float(states[t].run_best_loss) == pytest.approx(run_best)
        if again:   # the next step searches from the start again
            np.testing.assert_array_equal(states[t].current, start)
    assert restarts >= 2                                                      # the setting stalls often
    assert float(states[-1].best_loss) == pytest.approx(min(m["loss"] for m in metrics))   # best ever kept


def test_noisy_restarts_redraw_that_share_of_the_start_from_the_allowed_tokens():
    from jaxrisk.models.lm import LanguageModel

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    allowed = jnp.zeros((64,), bool).at[30:40].set(True)
    start = jnp.full((400,), 5, jnp.int32)   # a token never allowed: every redrawn position shows
    for noise, low, high in ((0.0, 0, 0), (0.5, 160, 240), (1.0, 400, 400)):
        problem = GCGProblem(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=allowed,
                             init_suffix=jnp.asarray([5, 6], jnp.int32), graphdef=lm.graphdef,
                             cfg=dataclasses.replace(TINY, restart_patience=3, restart_noise=noise))
        again = np.asarray(problem._restart_suffix(start, jax.random.key(1)))
        redrawn = again != 5
        assert low <= redrawn.sum() <= high
        assert np.all((again[redrawn] >= 30) & (again[redrawn] < 40))
        assert len(set(again[redrawn].tolist())) == (10 if noise else 0)   # drawn over all the allowed tokens
    # in a search: each restart searches on from a random suffix, not from the start
    states, _, _ = run_tiny(dataclasses.replace(TINY, restart_patience=3, restart_noise=1.0))
    at_restart = [s for before, s in zip(states, states[1:]) if int(s.restarts) > int(before.restarts)]
    assert len(at_restart) >= 2
    assert all(not np.array_equal(s.current, [5, 6]) for s in at_restart)
    with pytest.raises(InputError, match="restart_noise"):
        GCGConfig(restart_noise=1.5)


@pytest.mark.assets
def test_noisy_restarts_on_a_real_tokenizer_go_to_suffixes_a_user_could_type(stories_lm):
    """Random word pieces almost never survive decode / encode next to each other, so a restart drawing from every
    allowed token would leave all later candidates to the round-trip filter; drawn from the tokens that begin a
    word, one of 8 draws survives and the restart takes it."""
    from jaxrisk.redteam.gcg_run import init_suffix, target_start
    from jaxrisk.redteam.problem import RoundTrip, allowed_tokens, word_start_tokens

    tok = stories_lm.tokenizer
    allowed = allowed_tokens(tok, stories_lm.cfg.vocab_size)
    words = word_start_tokens(tok, allowed)
    assert 0 < words.sum() < allowed.sum() and not (words & ~allowed).any()
    cfg = GCGConfig(suffix_len=40, restart_patience=50, restart_noise=0.5)
    start = jnp.asarray(target_start(tok, "found a hat", init_suffix(tok, cfg)))
    keys = jax.random.split(jax.random.key(0), 20)
    roundtrip = RoundTrip(tok)
    for pool, check in ((allowed, None), (allowed, roundtrip), (words, roundtrip)):
        problem = GCGProblem(params=stories_lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.asarray(allowed),
                             restart_allowed=jnp.asarray(pool), init_suffix=start, graphdef=stories_lm.graphdef,
                             cfg=cfg, roundtrip=check)
        again = np.stack([np.asarray(problem._restart_suffix(start, k)) for k in keys])
        moved, typable = (again != np.asarray(start)).any(1), roundtrip(again)
        if check is None:      # unchecked draws from every allowed token: none a user could type
            assert moved.all() and not typable.any()
        elif pool is allowed:  # checked, none of them survives: the restart stays at the start
            assert not moved.any()
        else:                  # from word starts: nearly every restart moves, always to a suffix that round-trips
            assert moved.sum() >= 18 and typable.all()


@pytest.mark.slow   # a compiled search of 15-30 s on 2 busy cores
def test_margin_loss_is_zero_exactly_when_every_target_token_leads_by_the_margin():
    from jaxrisk.redteam.problem import target_margin_loss

    logits = jnp.asarray([[[3.0, 1.0, 0.0], [0.0, 2.5, 2.0]]])   # [1, 2, 3]: target tokens 0 and 1
    target, valid = jnp.asarray([[0, 1]]), jnp.ones((1, 2), bool)
    assert float(target_margin_loss(logits, target, valid, 0.0)[0]) == 0.0      # both are the argmax
    assert float(target_margin_loss(logits, target, valid, 1.0)[0]) == pytest.approx(0.5 / 2)   # 2nd leads by 0.5
    wrong = jnp.asarray([[2, 1]])                                               # 1st is 3 below the argmax
    assert float(target_margin_loss(logits, wrong, valid, 0.0)[0]) == pytest.approx(3.0 / 2)
    masked = jnp.asarray([[True, False]])                                       # padding never counts
    assert float(target_margin_loss(logits, wrong, masked, 0.0)[0]) == pytest.approx(3.0)
    # in GCG on the tiny model: zero (margin 0) exactly for the suffixes whose greedy continuation is the target
    from flax import nnx

    from jaxrisk.models.lm import LanguageModel
    from jaxrisk.redteam.problem import prompt_cache

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    before = [1, 9, 10]
    suffixes = np.random.default_rng(0).integers(2, 64, (32, 2)).astype(np.int32)
    greedy = [tuple(g) for g in lm.generate([np.asarray(before + s.tolist(), np.int32) for s in suffixes], 3)]
    problem = GCGProblem(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.ones((64,), bool),
                         init_suffix=jnp.asarray(suffixes[0]), graphdef=lm.graphdef,
                         cfg=dataclasses.replace(TINY, margin=0.0))
    lane = problem.init(None, dict(before=jnp.asarray(before), before_valid=jnp.ones((3,), bool),
                                   goal=jnp.asarray([9, 10]), goal_valid=jnp.ones((2,), bool),
                                   target=jnp.asarray(greedy[0]), target_valid=jnp.ones((3,), bool)))
    model = nnx.merge(lm.graphdef, lm.params)
    loss, matched, _ = problem._losses(model, prompt_cache(model, lane.before, lane.before_valid, room=4), lane,
                                       jnp.asarray(suffixes))
    solves = np.asarray([g == greedy[0] for g in greedy])
    assert 1 <= solves.sum() < len(solves)
    np.testing.assert_array_equal(np.asarray(loss) == 0.0, solves)
    np.testing.assert_array_equal(np.asarray(matched) == 3, solves)


@pytest.mark.slow   # a compiled search of 15-30 s on 2 busy cores
def test_probe_sampling_with_the_model_as_its_own_draft_searches_as_gcg_scoring_a_fraction():
    # the tiny Llama has 2 layers: a 2-layer draft is the model, so the draft's best B/R always hold the step's
    # best candidate and the search moves exactly as plain GCG's, the model scoring B/16 + B/R of B per step
    cfg = dataclasses.replace(TINY, probe_layers=2, probe_ratio=4)
    plain, _, _ = run_tiny(TINY, steps=12)
    probed, metrics, log = run_tiny(cfg, steps=12)
    for a, b in zip(plain, probed):
        np.testing.assert_array_equal(a.current, b.current)
        np.testing.assert_array_equal(a.best, b.best)
    assert [int(s.n_evals) for s in probed] == [6 * (t + 1) for t in range(12)]   # 16/16 = 1 -> 2 probes + 16/4
    assert all(m["probe_agreement"] == pytest.approx(1.0) for m in metrics)
    # a 1-layer draft differs from the model: the model scores what that draft ranks best, and the two disagree
    cheap, metrics, log = run_tiny(dataclasses.replace(cfg, probe_layers=1), steps=12)
    assert [int(s.n_evals) for s in cheap] == [6 * (t + 1) for t in range(12)]
    assert any(m["probe_agreement"] < 1.0 for m in metrics)


def test_a_start_from_the_target_ends_with_its_text_and_keeps_the_suffix_length(tiny_lm_dir):
    from jaxrisk.models import load_pretrained
    from jaxrisk.redteam.gcg_run import init_suffix, target_start
    from jaxrisk.redteam.problem import RoundTrip

    tok = load_pretrained(tiny_lm_dir).tokenizer
    suffix0 = init_suffix(tok, GCGConfig(suffix_len=9))
    ids = tok("red ball", add_special_tokens=False)["input_ids"]
    start = target_start(tok, "red ball", suffix0)
    reps = 9 // len(ids)
    assert len(start) == 9 and reps >= 1
    assert start[9 - reps * len(ids):].tolist() == ids * reps and start[:9 - reps * len(ids)].tolist() == \
        suffix0[:9 - reps * len(ids)].tolist()
    assert RoundTrip(tok)(start[None])[0]
    assert target_start(tok, "a story far longer than the nine tokens of this suffix", suffix0) is suffix0


def test_select_by_matches_prefers_more_target_tokens_right_over_a_lower_loss():
    problem = GCGProblem(params=None, after=None, allowed=None, init_suffix=None, graphdef=None,
                         cfg=GCGConfig(select="matches"))
    assert bool(problem._ranked_before(2.0, 3, 0.5, 2))       # more tokens right wins despite the higher loss
    assert bool(problem._ranked_before(0.5, 3, 0.6, 3))       # equal tokens: the lower loss
    by_loss = dataclasses.replace(problem, cfg=GCGConfig(select="loss"))
    assert not bool(by_loss._ranked_before(2.0, 3, 0.5, 2))


@pytest.mark.parametrize("kw, expected", [(dict(n_replace=0), "n_replace"), (dict(buffer_size=-1), "buffer_size"),
                                          (dict(select="best"), "select"), (dict(positions="spread"), "positions"),
                                          (dict(max_perplexity=0.5), "max_perplexity"),
                                          (dict(suffix_len=3, n_replace=4), "more than the suffix"),
                                          (dict(restart_patience=-1), "restart_patience"),
                                          (dict(probe_layers=-1), "probe_layers"), (dict(probe_ratio=0), "probe_ratio"),
                                          (dict(margin=-1.0), "margin"),
                                          (dict(margin=1.0, mellowmax_alpha=1.0), "one of margin")])
def test_bad_search_parts_are_clear_errors(kw, expected):
    with pytest.raises(InputError, match=expected):
        GCGConfig(**kw)


@pytest.mark.slow   # a compiled search of 15-30 s on 2 busy cores
def test_warm_start_takes_the_suffix_that_solves_its_target_and_reproduces_the_solution():
    from jaxrisk.models.lm import LanguageModel
    from jaxrisk.redteam.gcg_run import _warm_starts

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    # one suffix token: the start is a candidate only if the first step evaluates it (swaps always change it)
    before, solution, other = np.asarray([1, 9, 10]), np.asarray([37], np.int32), np.asarray([6], np.int32)
    target = np.asarray(lm.generate([np.concatenate([before, solution])], max_new_tokens=6)[0], np.int32)
    assert lm.generate([np.concatenate([before, other])], max_new_tokens=6)[0] != target.tolist()
    lanes = dict(before=np.stack([before, before]), before_valid=np.ones((2, 3), bool),
                 goal=np.asarray([[9, 10]] * 2), goal_valid=np.ones((2, 2), bool),
                 target=np.stack([target, target]), target_valid=np.ones((2, 6), bool))
    after = np.zeros((0,), np.int32)
    # lane 1 is unsolved: it takes lane 0's solved suffix over its own best, and says where it came from
    starts, sources = _warm_starts(lm, lanes, after, np.stack([solution, other]), np.asarray([0]), np.asarray([1]))
    np.testing.assert_array_equal(starts, [solution])
    assert sources.tolist() == [0]
    # its own best wins when that is the suffix scoring its target higher
    starts, sources = _warm_starts(lm, lanes, after, np.stack([other, solution]), np.asarray([0]), np.asarray([1]))
    np.testing.assert_array_equal(starts, [solution])
    assert sources.tolist() == [1]

    # the warm-started lane's first step evaluates the start itself, finds it succeeds, and stops there with it
    cfg = dataclasses.replace(TINY, suffix_len=1, early_stop=True, warm_start_step=5)
    problem = GCGProblem(params=lm.params, after=jnp.asarray(after), allowed=jnp.ones((64,), bool),
                         init_suffix=jnp.asarray(other), graphdef=lm.graphdef, cfg=cfg, max_steps=10)
    lane = {k: jnp.asarray(v[1]) for k, v in lanes.items()} | {"start": jnp.asarray(solution)}
    state, _ = jax.jit(problem.step)(problem.init(None, lane), jax.random.key(0))
    assert bool(state.success) and bool(problem.done(state))
    np.testing.assert_array_equal(state.best, solution)


@pytest.mark.slow   # whole runs through the driver
def test_warm_start_carries_a_solved_suffix_to_an_unsolved_behaviour_and_resumes(tiny_lm_dir, tmp_path, monkeypatch):
    """Four behaviours with one target on a tiny random model: after one step 'The kite' is the one left unsolved;
    it goes on from another behaviour's solution and succeeds at its next step (3 steps without the warm start).
    Interrupted in its second round, the run resumes to the same rows."""
    from conftest import interrupt_engine_run

    from jaxrisk import redteam
    from jaxrisk.data.prompts import Behavior
    from jaxrisk.models import load_pretrained
    from jaxrisk.redteam import RedteamConfig
    from jaxrisk.search import RunConfig

    lm = load_pretrained(tiny_lm_dir)
    behaviors = [Behavior(goal, "a a a", i) for i, goal in enumerate(["Lily had", "Tom saw", "The kite", "Tom had"])]
    gcg = GCGConfig(search_width=16, topk=8, suffix_len=3, init_token="ball", **PLAIN_GCG)
    run = RunConfig(max_steps=6, chunk_steps=2, progress=False)
    cold = redteam.run(lm, behaviors, RedteamConfig(run=run, gcg=gcg)).rows
    assert [r["steps"] for r in cold] == [1, 1, 3, 1] and all(r["success"] for r in cold)

    config = RedteamConfig(run=run, gcg=dataclasses.replace(gcg, warm_start_step=1))
    warm = redteam.run(lm, behaviors, config, out_dir=tmp_path / "whole").rows
    assert [r["steps"] for r in warm] == [1, 1, 2, 1] and all(r["success"] for r in warm)
    assert [r["warm_start_from"] for r in warm] == [None, None, "Lily had", None]
    for bh, row in zip(behaviors, warm):   # success: the greedy continuation of the prompt text, re-tokenised
        assert lm.decode(lm.generate(row["prompt"], 3)[0]).strip() == bh.target
    assert not (tmp_path / "whole" / "checkpoint").exists()

    restore = interrupt_engine_run(monkeypatch, run=2, at_step=1)   # stopped in the warm-started round
    with pytest.raises(KeyboardInterrupt):
        redteam.run(lm, behaviors, config, out_dir=tmp_path / "cut")
    restore()
    assert (tmp_path / "cut" / "checkpoint" / "group-0-warm").is_dir()
    resumed = redteam.run(lm, behaviors, config, out_dir=tmp_path / "cut").rows
    for a, b in zip(warm, resumed):
        for key in ("suffix_ids", "loss", "steps", "success", "warm_start_from", "candidates_evaluated"):
            assert a[key] == b[key], key


@pytest.mark.slow   # whole runs through the driver
def test_plausibility_weight_swept_as_lanes_of_one_run_trades_target_for_plausibility(tiny_lm_dir, monkeypatch):
    from jaxrisk.data.prompts import Behavior
    from jaxrisk.models import load_pretrained
    from jaxrisk.redteam.gcg_run import run_group
    from jaxrisk.scorers import SequenceScorer
    from jaxrisk.search import RunConfig, engine

    lm = load_pretrained(tiny_lm_dir)
    runs = []
    real_run = engine.run
    monkeypatch.setattr(engine, "run", lambda problem, lanes, *a, **k: runs.append(len(lanes["before"]))
                        or real_run(problem, lanes, *a, **k))
    behaviors = [Behavior("Lily had", "a red ball", 1), Behavior("Tom saw", "the park", 2)]
    cfg = GCGConfig(search_width=16, topk=8, suffix_len=4, init_token="ball", early_stop=False, **PLAIN_GCG)
    extras = [(0.0, SequenceScorer.of(lm))]
    rows = run_group(lm, behaviors, cfg, RunConfig(max_steps=10, chunk_steps=5, progress=False), extras=extras,
                     weight_grid=[[0.0], [3.0]])
    assert runs == [4]   # 2 behaviours x 2 weights, one program
    assert [(r["behavior"], r["extra_weights"]) for r in rows] == [
        ("Lily had", [0.0]), ("Lily had", [3.0]), ("Tom saw", [0.0]), ("Tom saw", [3.0])]
    for free, weighted in zip(rows[::2], rows[1::2]):   # the weighted lane's request is the more plausible one
        assert weighted["scores"]["SequenceScorer_0"] > free["scores"]["SequenceScorer_0"] + 0.2
        assert weighted["scores"]["target_logprob"] < free["scores"]["target_logprob"]
    with pytest.raises(InputError, match="weight_grid"):
        run_group(lm, behaviors, cfg, RunConfig(max_steps=1, progress=False), extras=extras, weight_grid=[0.0, 3.0])


@pytest.mark.slow   # whole runs through the command line
def test_cli_sweeps_the_plausibility_weight_and_writes_the_front(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    import json

    from jaxrisk.cli import main
    from jaxrisk.search import engine

    behaviors = tmp_path / "b.jsonl"
    behaviors.write_text('{"goal": "Lily had", "target": "a red ball"}\n{"goal": "Tom saw", "target": "the park"}\n')
    args = ["redteam", "--model", str(tiny_lm_dir), "--behaviors", str(behaviors), "--out", str(tmp_path / "out"),
            "--steps", "10", "--search-width", "16", "--topk", "8", "--suffix-len", "4", "--group", "1",
            "--no-early-stop", "--no-progress"]
    assert main(args + ["--fluency-weights", "0,3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["behavior"], r["extra_weights"]) for r in rows] == [
        ("Lily had", [0.0]), ("Lily had", [3.0]), ("Tom saw", [0.0]), ("Tom saw", [3.0])]
    front = json.loads((tmp_path / "out" / "front.json").read_text())
    assert [p["weights"] for p in front] == [[0.0], [3.0]] and all(p["behaviours"] == 2 for p in front)
    for p, weight in zip(front, (0.0, 3.0)):   # the front is what the rows say
        mine = [r for r in rows if r["extra_weights"] == [weight]]
        assert p["successes"] == sum(r["success"] for r in mine)
        assert p["median_request_perplexity"] == pytest.approx(
            float(np.median([np.exp(-r["scores"]["SequenceScorer_0"]) for r in mine])))
    assert front[1]["median_request_perplexity"] < front[0]["median_request_perplexity"]   # weighted: plausible
    assert (tmp_path / "out" / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "weight of log p(request) 3: " in capsys.readouterr().out

    calls = []
    monkeypatch.setattr(engine, "run", lambda *a, **k: calls.append(1))
    assert main(args + ["--fluency-weights", "0,3"]) == 0 and calls == []   # resumed: every behaviour is done
    assert main(args + ["--fluency-weights", "0,1"]) != 0                    # another sweep: not mixed in
    assert "weight_grid" in capsys.readouterr().err
    assert main(args + ["--fluency-weights", "0,1", "--method", "arca"]) != 0
    assert "--fluency-weights" in capsys.readouterr().err


@pytest.mark.slow   # a whole run through the command line
def test_cli_restarts_probe_sampling_margin_and_positions_reach_the_search(tiny_lm_dir, tmp_path, capsys):
    import json

    from jaxrisk.cli import main

    behaviors = tmp_path / "b.jsonl"
    behaviors.write_text('{"goal": "Lily had", "target": "a red ball"}\n')
    args = ["redteam", "--model", str(tiny_lm_dir), "--behaviors", str(behaviors), "--out", str(tmp_path / "out"),
            "--steps", "10", "--search-width", "16", "--topk", "8", "--suffix-len", "4", "--no-early-stop",
            "--no-filter", "--no-progress", "--restart-patience", "2", "--probe-layers", "1", "--probe-ratio", "4",
            "--margin", "0.5", "--positions", "random", "--restart-noise", "0.5"]
    assert main(args) == 0
    row = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert row["run"]["gcg"]["positions"] == "random" and row["run"]["gcg"]["select"] == "matches"   # the default
    assert row["run"]["gcg"]["restart_noise"] == 0.5
    assert row["candidates_evaluated"] == 10 * (2 + 4)   # the model scored 2 probes + the draft's best 16/4
    assert row["stall_restarts"] >= 1                      # 2 steps without a better suffix happen in 10
    args[args.index("--out") + 1] = str(tmp_path / "plain")   # plain GCG, but the flags given still win
    assert main(args + ["--plain", "--steps", "1"]) == 0
    plain = json.loads((tmp_path / "plain" / "results.jsonl").read_text())["run"]["gcg"]
    assert (plain["select"], plain["restart_patience"], plain["positions"]) == ("loss", 2, "random")
    assert "init_from_target" not in plain   # off: as results written before the field had it
    args[args.index("--out") + 1] = str(tmp_path / "other")
    assert main(args + ["--probe-layers", "2"]) != 0       # the tiny model has 2 layers: no draft of 2
    assert "probe_layers" in capsys.readouterr().err


@pytest.mark.slow   # whole runs through the command line
def test_cli_danger_probe_layer_and_pool_reach_the_probe(tiny_lm_dir, tmp_path):
    """The probe the command trains from --danger-probe-data reads the layer and pools as told: the request's score
    in the result row is the one a probe trained by hand with that layer and pool gives it."""
    import json

    from conftest import danger_texts
    from jaxrisk.cli import main
    from jaxrisk.data.batch import pad_batch
    from jaxrisk.models import load_pretrained
    from jaxrisk.scorers.probe import train_probe

    texts, labels = danger_texts(["I want to {v} the dog.", "Tom wanted to {v} the cat."])
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    behaviors = tmp_path / "b.jsonl"
    behaviors.write_text('{"goal": "Lily had", "target": "a red ball"}\n')
    lm = load_pretrained(tiny_lm_dir)
    scores = {}
    for layer, pool in ((0, "max"), (None, "mean")):
        out = tmp_path / f"out-{layer}-{pool}"
        flags = ["--danger-probe-pool", pool] + ([] if layer is None else ["--danger-probe-layer", str(layer)])
        assert main(["redteam", "--model", str(tiny_lm_dir), "--behaviors", str(behaviors), "--out", str(out),
                     "--steps", "1", "--search-width", "8", "--topk", "4", "--suffix-len", "2", "--no-progress",
                     "--danger-probe-data", str(data)] + flags) == 0
        row = json.loads((out / "results.jsonl").read_text())
        probe = train_probe(lm, texts, labels, layer=layer, pool=pool)
        tokens, valid = pad_batch([np.asarray(list(lm.encode("Lily had"))[1:] + row["suffix_ids"])])
        scores[pool] = row["scores"]["ProbeScorer_0"]
        assert scores[pool] == pytest.approx(float(probe(jnp.asarray(tokens), jnp.asarray(valid))[0]), abs=1e-5)
        assert (probe.layer, probe.pool) == ((0 if layer == 0 else lm.cfg.n_layers // 2), pool)
    assert scores["max"] != pytest.approx(scores["mean"], abs=1e-3)   # the flags change the probe
