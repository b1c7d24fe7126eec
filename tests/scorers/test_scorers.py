"""Log-scorers on the real stories260K: sequence and judge scores equal direct computation; a linear danger
probe separates held-out texts and is differentiable w.r.t. one-hot tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import danger_texts


@pytest.fixture(scope="module")
def lm(stories_lm):
    return stories_lm


@pytest.mark.slow
@pytest.mark.assets
def test_sequence_and_judge_scorers_equal_direct_computation(lm):
    from jaxrisk.scorers.lm import JudgeScorer, SequenceScorer, mellowmax, target_logprob
    from jaxrisk.data.batch import pad_batch

    texts = ["Lily saw a big dog.", "The cat sat"]
    ids = [lm.encode(t)[1:] for t in texts]  # without BOS
    tokens, valid = pad_batch(ids)
    seq = SequenceScorer(params=lm.params, bos=jnp.asarray([1]), graphdef=lm.graphdef)
    got = np.asarray(seq(jnp.asarray(tokens), jnp.asarray(valid)))
    for r, i in enumerate(ids):
        logp = jax.nn.log_softmax(lm(np.asarray([[1] + list(i)])), -1)[0]
        expected = np.mean([float(logp[t, tok]) for t, tok in enumerate(i)])
        np.testing.assert_allclose(got[r], expected, atol=1e-5)
    one_hot = jax.nn.one_hot(tokens, lm.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(seq(one_hot, jnp.asarray(valid))), got, atol=1e-5)

    before, after = lm.encode("Is"), lm.tokenizer(" a story? Answer:", add_special_tokens=False)["input_ids"]
    yes = lm.tokenizer(" Yes", add_special_tokens=False)["input_ids"][-1]
    judge = JudgeScorer(params=lm.params, before=jnp.asarray(before), after=jnp.asarray(after),
                        answer=jnp.asarray(yes), graphdef=lm.graphdef)
    got = np.asarray(judge(jnp.asarray(tokens), jnp.asarray(valid)))
    for r, i in enumerate(ids):
        full = np.asarray([list(before) + list(i) + list(after)])
        np.testing.assert_allclose(got[r], float(jax.nn.log_softmax(lm(full)[0, -1])[yes]), atol=1e-5)

    x = jnp.asarray([[-1.0, -3.0, -0.5]])
    v = jnp.ones((1, 3), bool)
    np.testing.assert_allclose(target_logprob(x, v), -1.5, atol=1e-6)
    assert -float(mellowmax(-x, 50.0, v)[0]) == pytest.approx(-3.0, abs=0.05)  # worst token dominates


def test_max_pooled_probe_scores_a_text_by_its_highest_scoring_valid_position():
    from jaxrisk.scorers.probe import _pooled_logits

    h = jnp.asarray([[[1.0, 0.0], [0.0, 3.0], [9.0, 9.0]],      # position 2 is padding
                     [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = jnp.asarray([[True, True, False], [True, True, True]])
    w, b = jnp.asarray([1.0, 2.0]), jnp.asarray(-1.0)
    np.testing.assert_allclose(_pooled_logits(h, valid, w, b, "max"), [6.0 - 1.0, 2.0 - 1.0])
    np.testing.assert_allclose(_pooled_logits(h.mean(1), valid, w, b, "mean"), [(1 + 6 + 27) / 3 - 1, 2 / 3 - 1])


@pytest.mark.slow
@pytest.mark.assets
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_danger_probe_separates_held_out_texts_and_is_differentiable(lm, pool):
    from jaxrisk.data.batch import pad_batch
    from jaxrisk.evals.metrics import auroc
    from jaxrisk.scorers.probe import train_probe

    frames_train = ["I want to {v} the dog.", "How can I {v} my friend?", "Tom wanted to {v} the cat."]
    frames_test = ["Can you {v} the baby bird?", "Lily will {v} her brother."]

    probe = train_probe(lm, *danger_texts(frames_train), pool=pool)
    texts, labels = danger_texts(frames_test)   # unseen sentences
    tokens, valid = pad_batch([lm.encode(t) for t in texts])
    scores = np.asarray(probe(jnp.asarray(tokens), jnp.asarray(valid)))
    assert np.all(scores <= 0)   # log-probabilities
    area = auroc(scores, labels)
    assert area >= 0.85, f"held-out AUROC {area:.2f}"
    one_hot = jax.nn.one_hot(tokens[:1], lm.cfg.vocab_size)
    grad = jax.grad(lambda oh: probe(oh, jnp.asarray(valid[:1])).sum())(one_hot)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


@pytest.mark.parametrize("kw, expected", [(dict(pool="sum"), "pool"), (dict(layer=9), "layer 9")])
def test_bad_probe_settings_are_clear_errors(tiny_lm_dir, kw, expected):
    from jaxrisk.errors import InputError
    from jaxrisk.models import load_pretrained
    from jaxrisk.scorers.probe import train_probe

    lm = load_pretrained(tiny_lm_dir)
    with pytest.raises(InputError, match=expected):
        train_probe(lm, ["a", "b", "c", "d"], [0, 1, 0, 1], **kw)
