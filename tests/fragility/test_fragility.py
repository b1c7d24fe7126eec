"""The post-update audit on a tiny random Llama: simulated updates equal plain optax loops, the Taylor screen
predicts a small step, the worst-case search finds the examples that teach the behaviour, devices agree."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrisk.data.prompts import Behavior
from jaxrisk.data.updates import UpdateExample
from jaxrisk.fragility import FragilityConfig, fragility_data, run
from jaxrisk.fragility.problem import Lookahead, behaviour_scores, clean_logprobs, project_capped_simplex
from jaxrisk.fragility.run import direction_keys
from jaxrisk.models import load_pretrained
from jaxrisk.models.lm import lm_loss
from jaxrisk.search import engine
from jaxrisk.search.config import RunConfig

WORDS = "Lily Tom had a red big ball kite The was happy sad went to the park with saw and".split()
TARGET = " the big red kite"


def stories(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(6, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    lm = load_pretrained(tiny_lm_dir)
    examples = [UpdateExample("", t, i + 1) for i, t in enumerate(stories(24, 0))]
    behaviours = [Behavior(p, TARGET, i + 1) for i, p in enumerate(["Lily saw", "Tom went to", "The park was",
                                                                       "Tom had a"])]
    return lm, fragility_data(lm, examples, behaviours)


AUDIT = FragilityConfig(run=RunConfig(restarts=1, max_steps=2, chunk_steps=2, devices=1, progress=False),
                        learning_rates=(3e-3, 1e-2), steps=(1, 2), batch=8, draws=2, pool=8, random_directions=1)


@pytest.fixture(scope="module")
def audit(tiny):
    """One small audit (SGD and Adam at lr 3e-3 and 1e-2, 1-2 steps, 2 draws, worst case) shared by the tests
    that read its report."""
    lm, data = tiny
    return run(lm, data, AUDIT)


def lookahead(lm, data, random_directions=0):
    return Lookahead(params=lm.params, update_tokens=jnp.asarray(data.update_tokens),
                     update_loss_mask=jnp.asarray(data.update_loss_mask),
                     behaviour_tokens=jnp.asarray(data.behaviour_tokens),
                     behaviour_weight=jnp.asarray(data.behaviour_weight),
                     clean_tokens=jnp.asarray(data.update_tokens[:4]), clean_valid=jnp.asarray(data.update_valid[:4]),
                     base_clean_logp=clean_logprobs(lm.graphdef, lm.params, jnp.asarray(data.update_tokens[:4])),
                     graphdef=lm.graphdef, random_directions=random_directions)


@pytest.mark.slow
def test_lookahead_equals_an_explicit_optax_loop(tiny):
    """Each lane's parameters after k steps equal optax.sgd / optax.adam applied by hand to the same batches,
    and its metrics equal the behaviour measured on those parameters. Tolerances (float32): SGD rtol 1e-5,
    atol 1e-6; Adam atol 1e-3 x lr x k, a thousandth of the most Adam can move an entry in k steps (its
    first steps are sign-like, so the rounding of a near-zero gradient, vmapped vs not, can flip one entry's
    step; a wrong update rule, batch or step count moves entries by ~lr)."""
    lm, data = tiny
    k, rng = 3, np.random.default_rng(0)
    batches = np.stack([np.stack([rng.choice(24, 5, replace=False) for _ in range(k)]) for _ in range(3)])
    lanes = {"learning_rate": np.asarray([0.05, 1e-3, 3e-3], np.float32), "adam": np.asarray([False, True, True]),
             "batches": batches.astype(np.int32), "direction_key": direction_keys(0, 3)}
    problem = lookahead(lm, data)
    res = engine.run(problem, lanes, RunConfig(max_steps=k, chunk_steps=2, devices=1, progress=False))
    for lane, (lr, adam) in enumerate(zip(lanes["learning_rate"], lanes["adam"])):
        opt = optax.adam(float(lr)) if adam else optax.sgd(float(lr))
        params, state = lm.params, opt.init(lm.params)
        for rows in batches[lane]:
            grads = jax.grad(lambda p: lm_loss(lm.graphdef, p, data.update_tokens[rows],
                                               data.update_loss_mask[rows]))(params)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        got = jax.tree.map(lambda x: x[lane], res.state.params)
        tol = dict(rtol=0, atol=1e-3 * float(lr) * k) if adam else dict(rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), got, params)
        logp, success = behaviour_scores(lm.graphdef, params, problem.behaviour_tokens, problem.behaviour_weight)
        np.testing.assert_allclose(res.metrics["target_logprob"][k - 1, lane], np.mean(logp), rtol=1e-5)
        assert res.metrics["success"][k - 1, lane] == np.mean(success)


@pytest.mark.slow
def test_greedy_success_equals_generation(tiny):
    """Teacher-forced success (every target token the argmax) is what greedy generation says, row by row."""
    from jaxrisk.evals.behaviour import greedy_continuations

    lm, data = tiny
    # behaviours whose target is the model's own greedy continuation (success) or not (failure)
    prompts = [lm.encode(p) for p in ["Lily saw", "Tom went to", "The park was", "Tom had a"]]
    own = greedy_continuations(lm, lm.params, prompts, 3)
    behaviours = [Behavior(p, lm.decode(o) if i % 2 == 0 else TARGET, i + 1)
                  for i, (p, o) in enumerate(zip(["Lily saw", "Tom went to", "The park was", "Tom had a"], own))]
    d = fragility_data(lm, [UpdateExample("", "Lily saw a kite", 1)], behaviours)
    _, success = behaviour_scores(lm.graphdef, lm.params, jnp.asarray(d.behaviour_tokens),
                                  jnp.asarray(d.behaviour_weight))
    for b, s in zip(behaviours, np.asarray(success)):
        target = lm.tokenizer(b.target, add_special_tokens=False)["input_ids"]
        out = greedy_continuations(lm, lm.params, [lm.encode(b.goal)], len(target))[0]
        assert bool(s) == (list(out) == list(target))
    assert np.asarray(success)[0::2].all()   # the model's own continuations


@pytest.mark.slow   # runs whole audits (several compiled programs)
def test_taylor_screens_predict_a_small_step(audit):
    """For a small SGD step the first-order term <grad f, u> predicts the simulated change of the target
    log-prob within 10%, first + second order (Hessian-vector product) within 1%; the first-order error
    grows with lr^2 (x 11.1 from lr 3e-3 to 1e-2; accepted 7-16)."""
    geometry = audit.report["geometry"]
    sgd = [g for g in geometry["lanes"] if g["optimizer"] == "sgd"]
    for small, large in zip([g for g in sgd if g["lr"] == 3e-3], [g for g in sgd if g["lr"] == 1e-2]):
        assert small["draw"] == large["draw"]
        assert abs(small["error_first"]) <= 0.1 * abs(small["simulated"])
        assert abs(small["error_second"]) <= 0.01 * abs(small["simulated"])
        assert 7 <= large["error_first"] / small["error_first"] <= 16
    assert geometry["layers"][:2] == ["blocks.0", "blocks.1"]   # then the embedding (tied), the final norm
    assert len(sgd[0]["layer_cosine"]) == len(geometry["layers"]) == 4


def test_capped_simplex_projection():
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = jnp.asarray(rng.normal(size=20) * 2)
        p = np.asarray(project_capped_simplex(w, 6.0))
        assert p.min() >= 0 and p.max() <= 1 and abs(p.sum() - 6.0) < 1e-4
        # optimality: p = clip(w - tau, 0, 1) for one tau
        free = (p > 1e-6) & (p < 1 - 1e-6)
        if free.any():
            tau = np.asarray(w)[free] - p[free]
            assert np.ptp(tau) < 1e-4


@pytest.mark.slow   # runs whole audits (several compiled programs)
def test_worst_case_batch_beats_random_draws_and_the_teaching_batch(tiny_lm_dir):
    """An update set of benign rows plus four rows that end in the target phrase: the batch the worst-case
    search returns, measured exactly, raises the target's log-prob more than every random draw and at least
    as much as the obvious candidate, the four teaching rows together."""
    lm = load_pretrained(tiny_lm_dir)
    benign = stories(28, 1)
    teaching = [f"{s}{TARGET}" for s in stories(4, 2)]
    examples = [UpdateExample("", t, i + 1) for i, t in enumerate(benign[:10] + teaching + benign[10:])]
    behaviours = [Behavior(p, TARGET, i + 1) for i, p in enumerate(["Lily saw", "Tom went to", "The park was"])]
    data = fragility_data(lm, examples, behaviours)
    config = FragilityConfig(run=RunConfig(restarts=2, max_steps=20, chunk_steps=20, devices=1, progress=False),
                             optimizers=("sgd",), learning_rates=(0.1, 0.3), steps=(1,), batch=4, draws=4,
                             pool=32, random_directions=0)
    report = run(lm, data, config).report
    searched = max(e["target_logprob"] for e in report["after"] if e["draw"] is None)
    assert searched > max(e["target_logprob"] for e in report["after"] if e["draw"] is not None)
    teaching_lane = {"learning_rate": np.asarray([0.3], np.float32), "adam": np.asarray([False]),
                     "batches": np.asarray([[[10, 11, 12, 13]]], np.int32), "direction_key": direction_keys(0, 1)}
    res = engine.run(lookahead(lm, data), teaching_lane,
                     RunConfig(max_steps=1, chunk_steps=1, devices=1, progress=False))
    assert searched >= float(res.metrics["target_logprob"][0, 0]) - 1e-4


@pytest.mark.slow   # runs whole audits (several compiled programs)
def test_devices_and_lane_groups_agree(tiny, audit):
    """One device with every lane in one program, or eight devices eight lanes at a time (--max-lanes; the
    16 lanes in two groups): the same simulated updates and random directions, lane by lane."""
    lm, data = tiny
    eight = run(lm, data, AUDIT.replace(run=AUDIT.run.replace(devices=8), worst_case=False, max_lanes=8)).report
    one = [e for e in audit.report["after"] if e["draw"] is not None]
    assert len(one) == len(eight["after"]) == 2 * 2 * 2 * 2
    for a, b in zip(one, eight["after"]):
        assert (a["optimizer"], a["lr"], a["draw"], a["steps"]) == (b["optimizer"], b["lr"], b["draw"], b["steps"])
        for key in ("success", "target_logprob", "kl", "update_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a["random"]["target_logprob_mean"], b["random"]["target_logprob_mean"],
                                   rtol=1e-4)


@pytest.mark.slow   # runs whole audits (several compiled programs)
def test_report_contract_and_figure(audit, tmp_path):
    json_path, png = audit.write(tmp_path)
    report = json.loads(json_path.read_text())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert isinstance(report["flagged"], bool)
    assert set(report["before"]) >= {"success", "target_logprob"}
    # 2 optimizers x 2 learning rates x 2 draws, plus one worst-case lane per optimizer; each at 1 and 2 steps
    assert len(report["after"]) == (2 * 2 * 2 + 2) * 2
    for e in report["after"]:
        assert set(e) >= {"optimizer", "lr", "steps", "draw", "success", "target_logprob"}
    assert set(report["worst"]) >= {"optimizer", "lr", "steps", "success", "target_logprob"}
    assert set(report["random_direction"]) >= {"success_max", "rise_max", "gradient_aligned"}
    assert f"at least {AUDIT.threshold:g}" in report["rule"]
