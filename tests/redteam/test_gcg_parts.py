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
from jaxrisk.redteam import GCGConfig
from jaxrisk.redteam.problem import GCGProblem

# 2 suffix tokens over a 64-token vocabulary and top-k 8: 64 reachable suffixes from any current one, so
# 30 steps of 16 candidates revisit many of them unless told not to
TINY = GCGConfig(search_width=16, topk=8, suffix_len=2, early_stop=False, filter_retokenization=False)
STEPS = 30


class Recording(GCGProblem):
    """GCGProblem that keeps every step's evaluated candidates (those the filters let through)."""

    def _candidates(self, state, top, key):
        cands, ok = super()._candidates(state, top, key)
        record = lambda *a: self.log.append(tuple(np.asarray(x) for x in a))  # noqa: E731
        jax.debug.callback(record, state.step, state.current, cands, ok, ordered=True)
        return cands, ok


def run_tiny(cfg: GCGConfig, steps: int = STEPS, seed: int = 0):
    """Eager GCG steps on a random 2-layer Llama: (the state after each step, per-step metrics, recorded
    candidates)."""
    from jaxrisk.models.lm import LanguageModel

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    problem = Recording(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.ones((64,), bool),
                        init_suffix=jnp.asarray([5, 6], jnp.int32), graphdef=lm.graphdef, cfg=cfg, max_steps=steps)
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


def test_no_revisit_never_evaluates_a_suffix_twice():
    plain = evaluated(run_tiny(TINY)[2])
    assert len(set(plain)) < len(plain) - 50   # the setting revisits a lot without the filter
    filtered = evaluated(run_tiny(dataclasses.replace(TINY, no_revisit=True))[2])
    assert len(set(filtered)) == len(filtered)
    assert len(filtered) >= len(set(plain))     # and reaches at least as many distinct suffixes


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


def test_multi_coordinate_swaps_fall_from_n_replace_to_the_final_count():
    cfg = GCGConfig(search_width=32, topk=8, suffix_len=6, early_stop=False, filter_retokenization=False,
                    n_replace=4, n_replace_final=1)
    from jaxrisk.models.lm import LanguageModel

    lm = LanguageModel.random(tiny_llama_config(), seed=0)
    problem = Recording(params=lm.params, after=jnp.zeros((0,), jnp.int32), allowed=jnp.ones((64,), bool),
                        init_suffix=jnp.arange(20, 26, dtype=jnp.int32), graphdef=lm.graphdef, cfg=cfg, max_steps=10)
    assert [int(problem._n_replace(t)) for t in range(10)] == [4, 4, 3, 3, 3, 2, 2, 2, 1, 1]
    object.__setattr__(problem, "log", [])
    state = problem.init(None, dict(before=jnp.asarray([1, 9], jnp.int32), before_valid=jnp.ones((2,), bool),
                                    goal=jnp.asarray([9], jnp.int32), goal_valid=jnp.ones((1,), bool),
                                    target=jnp.asarray([11, 12], jnp.int32), target_valid=jnp.ones((2,), bool)))
    step = jax.jit(problem.step)
    for t, key in enumerate(jax.random.split(jax.random.key(0), 10)):
        state, _ = step(state, key)
        jax.effects_barrier()
        _, current, cands, ok = problem.log[-1]
        changed = (cands[ok] != current[None]).sum(1)
        r = int(problem._n_replace(t))
        assert changed.max() == r and changed.mean() > r - 1   # r positions (a drawn token may equal the old one)


def test_select_by_matches_prefers_more_target_tokens_right_over_a_lower_loss():
    problem = GCGProblem(params=None, after=None, allowed=None, init_suffix=None, graphdef=None,
                         cfg=GCGConfig(select="matches"))
    assert bool(problem._ranked_before(2.0, 3, 0.5, 2))       # more tokens right wins despite the higher loss
    assert bool(problem._ranked_before(0.5, 3, 0.6, 3))       # equal tokens: the lower loss
    by_loss = dataclasses.replace(problem, cfg=GCGConfig())
    assert not bool(by_loss._ranked_before(2.0, 3, 0.5, 2))


@pytest.mark.parametrize("kw, expected", [(dict(n_replace=0), "n_replace"), (dict(buffer_size=-1), "buffer_size"),
                                          (dict(select="best"), "select"),
                                          (dict(suffix_len=3, n_replace=4), "more than the suffix")])
def test_bad_search_parts_are_clear_errors(kw, expected):
    with pytest.raises(InputError, match=expected):
        GCGConfig(**kw)
