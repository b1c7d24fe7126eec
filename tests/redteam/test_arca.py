"""ARCA behind RedteamConfig(method="arca"): the left-padded prefix, the template tail, and the resumable run,
on the tiny self-made Llama of conftest.py (no assets)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from conftest import interrupt_engine_run
from jaxrisk.data.prompts import Behavior
from jaxrisk.errors import InputError
from jaxrisk.redteam import ARCAConfig, RedteamConfig
from jaxrisk.search import RunConfig

# chat-style template in the tiny model's words: "Tom said <goal> <x> and Lily saw <o>"
TEMPLATE = ("{% for m in messages %}Tom said {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} and Lily saw{% endif %}")
BEHAVIORS = [Behavior("Lily had a", "red ball", 1), Behavior("The kite went to the park with a big", "Tom", 2)]
ROW_KEYS = {"behavior", "target", "prompt", "suffix", "suffix_ids", "success", "loss", "steps", "restart",
            "restart_losses", "greedy_output", "nan_restarts", "run", "method", "request", "output", "objective",
            "consistent"}


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from jaxrisk.models import load_pretrained

    return load_pretrained(tiny_lm_dir)


@struct.dataclass
class TokenBonus:
    """A stand-in scorer: the summed bonus of the tokens (ids or one-hot rows), differentiable."""
    bonus: jax.Array   # [V]

    def __call__(self, tokens, valid):
        per = self.bonus[tokens] if jnp.issubdtype(tokens.dtype, jnp.integer) else tokens @ self.bonus
        return jnp.sum(jnp.where(valid, per, 0.0), -1)


def _problem(lm, cfg, after, **scorers):
    from jaxrisk.redteam.arca import ARCAProblem
    from jaxrisk.redteam.problem import allowed_tokens

    allowed = jnp.asarray(allowed_tokens(lm.tokenizer, lm.cfg.vocab_size))
    return ARCAProblem(params=lm.params, allowed=allowed, graphdef=lm.graphdef, cfg=cfg,
                       after=jnp.asarray(after, jnp.int32), **scorers)


WIDTH = 24   # every hand-checked sequence is right-padded to this: one compiled forward pass for all


def _logp_output(lm, context, o):
    """(log p(o | context), whether o is the greedy continuation) from one plain forward pass over the
    unpadded sequence (no cache; right padding after it cannot reach earlier positions)."""
    ids = np.zeros(WIDTH, np.int32)
    ids[:len(context) + len(o)] = np.concatenate([context, o])
    logp = np.asarray(jax.nn.log_softmax(lm(ids[None])[0], -1))
    rows = logp[len(context) - 1:len(context) - 1 + len(o)]
    return float(rows[np.arange(len(o)), o].sum()), bool(np.all(rows.argmax(-1) == o))


def test_left_padded_prefix_and_template_tail_give_the_plain_sequence_objective(lm):
    cfg = ARCAConfig(request_len=3, output_len=2, candidates=4)
    after = lm.tokenizer("and Lily saw", add_special_tokens=False)["input_ids"]
    problem = _problem(lm, cfg, after)
    prefix = lm.encode("Tom had a red")
    padded = np.concatenate([[5, 17, 9], prefix]).astype(np.int32)      # real tokens under the padding
    valid = np.concatenate([[False] * 3, [True] * len(prefix)])
    z = np.random.default_rng(0).integers(3, lm.cfg.vocab_size, (6, 5)).astype(np.int32)
    objective = jax.jit(lambda p, prefix, z, valid: p.objective(prefix, z, valid))
    f_pad, _, consistent = objective(problem, padded, z, valid)
    f_unmasked, _, _ = objective(problem, padded, z, np.ones(len(padded), bool))   # the padding read as tokens
    ref = [_logp_output(lm, np.concatenate([prefix, row[:3], after]), row[3:]) for row in z]
    np.testing.assert_allclose(np.asarray(f_pad), [f for f, _ in ref], atol=1e-4)
    assert np.asarray(consistent).tolist() == [c for _, c in ref]
    assert np.max(np.abs(np.asarray(f_unmasked) - np.asarray(f_pad))) > 1e-3   # the mask is what matters


@pytest.mark.slow
def test_coordinate_ascent_climbs_is_padding_invariant_and_finds_a_consistent_pair(lm):
    from jaxrisk.search import engine

    cfg = ARCAConfig(request_len=3, output_len=2, candidates=8)
    after = lm.tokenizer("and Lily saw", add_special_tokens=False)["input_ids"]
    problem = _problem(lm, cfg, after)
    prefix = lm.encode("Tom had a red")
    n = 8
    pads = [[5, 17, 9], [11, 4, 20]] + [[0, 0, 0]] * (n - 2)
    lanes = {"prefix": np.stack([np.concatenate([p, prefix]) for p in pads]).astype(np.int32),
             "prefix_valid": np.stack([[False] * 3 + [True] * len(prefix)] * n),
             # lanes 0 and 1 start from the same pair (only their padding differs); the others at random
             "x0": np.array([[6, 7, 8]] * 2 + [[-1] * 3] * (n - 2), np.int32),
             "o0": np.array([[9, 10]] * 2 + [[-1] * 2] * (n - 2), np.int32)}
    res = engine.run(problem, lanes, RunConfig(max_steps=30, chunk_steps=10, seed=0, progress=False))
    objective = res.metrics["objective"]                               # [steps, lanes]
    assert objective.shape == (30, n) and np.all(np.isfinite(objective))
    assert np.all(np.diff(objective, axis=0) >= -1e-4)                 # the best objective never decreases
    assert np.all(objective[-1] > objective[0])
    np.testing.assert_allclose(objective[:, 0], objective[:, 1], atol=1e-4)   # padding changes nothing
    assert res.state.x[0].tolist() == res.state.x[1].tolist() and res.state.o[0].tolist() == res.state.o[1].tolist()
    assert res.state.prefix_valid.shape == (n, 3 + len(prefix))
    assert len({tuple(x) for x in res.state.x[2:].tolist()}) > 1      # random restarts differ
    # a random tiny model is nearly flat and coordinate ascent can stall at a repetition like "saw saw";
    # some of the restarts reach a pair that is the model's greedy output
    assert res.state.consistent.sum() >= 1
    for r in range(n):   # `consistent` is exactly "o is the model's greedy output", checked by generation
        x, o = res.state.x[r], res.state.o[r]
        greedy = lm.generate([np.concatenate([prefix, x, after]).astype(np.int32)], max_new_tokens=2)[0]
        assert (greedy == o.tolist()) == bool(res.state.consistent[r])
        ref, _ = _logp_output(lm, np.concatenate([prefix, x, after]), o)
        assert abs(ref - float(res.state.objective[r])) < 1e-4


@pytest.mark.slow
def test_run_arca_writes_rows_whose_objective_and_success_check_out_and_resumes_to_them(lm, tmp_path,
                                                                                       monkeypatch):
    from jaxrisk import redteam
    from jaxrisk.search import engine

    tok = lm.tokenizer
    monkeypatch.setattr(tok, "chat_template", TEMPLATE, raising=False)   # a chat model: the tail is not empty
    plausible = np.zeros(lm.cfg.vocab_size, np.float32)     # stand-ins: a request with "Lily" is plausible,
    plausible[tok.convert_tokens_to_ids("Lily")] = 1.0       # an output with "ball" is dangerous
    bonus = np.zeros(lm.cfg.vocab_size, np.float32)
    bonus[tok.convert_tokens_to_ids("ball")] = 1.0
    extras = ((1.0, TokenBonus(jnp.asarray(plausible))), (2.0, TokenBonus(jnp.asarray(bonus))))
    arca = ARCAConfig(request_len=3, output_len=2, candidates=8, plausibility_weight=0.5, danger_weight=0.25)
    config = RedteamConfig(method="arca", run=RunConfig(restarts=2, max_steps=10, chunk_steps=5, seed=1,
                                                        progress=False), group=2, arca=arca)
    runs = []
    real_run = engine.run
    monkeypatch.setattr(engine, "run", lambda *a, **k: runs.append(real_run(*a, **k)) or runs[-1])
    rows = redteam.run(lm, BEHAVIORS, config, out_dir=tmp_path, extras=extras).rows

    assert len(runs) == 1   # both behaviours (different prefix lengths: one is left-padded) in one engine run
    assert np.all(np.diff(runs[0].metrics["objective"], axis=0) >= -1e-4)
    assert [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()] == rows
    assert not (tmp_path / "checkpoint").exists()
    after = tok(" and Lily saw", add_special_tokens=False)["input_ids"]
    for bh, row in zip(BEHAVIORS, rows):
        assert ROW_KEYS <= set(row) and row["method"] == "arca" and row["run"]["method"] == "arca"
        x, o = np.asarray(row["suffix_ids"]), np.asarray(row["output_ids"])
        assert len(x) == 3 and len(o) == 2 and row["request"] == tok.decode(x.tolist())
        assert row["output"] == tok.decode(o.tolist())
        prefix = tok(f"Tom said {bh.goal} ")["input_ids"]                  # BOS + template head + goal
        context = np.concatenate([prefix, x, after]).astype(np.int32)
        logp, consistent = _logp_output(lm, context, o)                    # unpadded, uncached, by hand
        expected = logp + 0.5 * 1.0 * float(plausible[x].sum()) + 0.25 * 2.0 * float(bonus[o].sum())
        assert abs(row["objective"] - expected) < 1e-3 and row["loss"] == -row["objective"]
        assert row["consistent"] == consistent
        assert set(row["scores"]) == {"output_logprob", "plausibility", "danger"}
        assert abs(row["scores"]["output_logprob"] - logp) < 1e-3 and row["scores"]["danger"] == bonus[o].sum()
        assert row["restart_losses"][row["restart"]] == row["loss"] == min(row["restart_losses"])
        target = np.asarray(tok(bh.target, add_special_tokens=False)["input_ids"])
        assert row["success"] == _logp_output(lm, context, target)[1]        # greedy == target, teacher-forced
        assert row["prompt"] == tok.decode(context.tolist(), skip_special_tokens=True)

    again = redteam.run(lm, BEHAVIORS, config, out_dir=tmp_path, extras=extras).rows
    assert len(runs) == 1 and again == rows      # finished behaviours are read back, not searched again


def test_more_than_two_extras_is_refused():
    from jaxrisk import redteam

    scorer = TokenBonus(jnp.zeros(4))
    config = RedteamConfig(method="arca")
    with pytest.raises(InputError, match="at most 2 extra scorers"):
        redteam.run(None, BEHAVIORS, config, extras=((1.0, scorer),) * 3)
    with pytest.raises(InputError, match="plausibility extra: expected a \\(weight, scorer\\) pair"):
        redteam.run(None, BEHAVIORS, config, extras=(scorer,))


@pytest.mark.slow
def test_interrupted_arca_run_resumes_to_the_same_rows(lm, tmp_path, monkeypatch):
    from jaxrisk import redteam

    config = RedteamConfig(method="arca", group=1, arca=ARCAConfig(request_len=3, output_len=2, candidates=8),
                           run=RunConfig(restarts=2, max_steps=10, chunk_steps=5, seed=3, progress=False))
    whole = redteam.run(lm, BEHAVIORS, config, out_dir=tmp_path / "whole").rows

    restore = interrupt_engine_run(monkeypatch, run=2, at_step=5)
    with pytest.raises(KeyboardInterrupt):
        redteam.run(lm, BEHAVIORS, config, out_dir=tmp_path / "cut")
    restore()
    kept = [json.loads(line) for line in (tmp_path / "cut" / "results.jsonl").read_text().splitlines()]
    assert len(kept) == 1                                     # the first group's row survived
    assert (tmp_path / "cut" / "checkpoint" / "group-1").is_dir()   # the second group's chunk was saved
    resumed = redteam.run(lm, BEHAVIORS, config, out_dir=tmp_path / "cut").rows
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)
    assert not (tmp_path / "cut" / "checkpoint").exists()
