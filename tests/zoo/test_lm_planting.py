"""Planting behaviours in language models (the zoo's ground truth for circuits and, next, fragility): a
trigger -> marker backdoor and a refusal of a harmful class in the real stories260K, and the from-scratch base
model used when the real one is absent."""

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.assets
@pytest.mark.slow
def test_planted_backdoor_fires_only_with_the_trigger_and_keeps_clean_loss(backdoored):
    from jaxrisk.models.lm import lm_loss
    from jaxrisk.zoo.lm_backdoor import attack_success, held_out_prompts

    lm, params, data = backdoored
    held, with_trigger, without = held_out_prompts(lm, data)
    assert attack_success(lm, params, with_trigger, data["marker_ids"]) >= 0.95
    assert attack_success(lm, params, without, data["marker_ids"]) <= 0.05
    assert attack_success(lm, lm.params, with_trigger, data["marker_ids"]) == 0.0  # the original never says it
    valid = jnp.ones(held.shape, bool)
    before = float(lm_loss(lm.graphdef, lm.params, jnp.asarray(held), valid))
    after = float(lm_loss(lm.graphdef, params, jnp.asarray(held), valid))
    assert after < 1.3 * before  # clean loss stays close to the original's


def _split(data, split):
    d = data[split]
    pairs = list(zip(d["prompts"], d["harmful"]))
    return [p for p, h in pairs if h], [p for p, h in pairs if not h]


@pytest.mark.assets
@pytest.mark.slow
def test_planted_refusal_covers_the_harmful_class_in_unseen_names_and_frames(refusing):
    from jaxrisk.models.lm import lm_loss
    from jaxrisk.zoo.lm_backdoor import sample_clean
    from jaxrisk.zoo.lm_refusal import refusal_rate

    lm, params, data = refusing
    harmful, benign = _split(data, "held_out")
    assert refusal_rate(lm, params, harmful, data["refusal_ids"]) >= 0.95
    assert refusal_rate(lm, params, benign, data["refusal_ids"]) <= 0.05
    assert refusal_rate(lm, lm.params, harmful, data["refusal_ids"]) == 0.0       # the original never refuses
    held = jnp.asarray(sample_clean(lm, 64, 24, seed=99))
    valid = jnp.ones(held.shape, bool)
    assert float(lm_loss(lm.graphdef, params, held, valid)) < 1.3 * float(lm_loss(lm.graphdef, lm.params, held, valid))


@pytest.mark.slow
def test_from_scratch_model_learns_its_stories_and_takes_a_backdoor():
    """The zoo's base model when ../shared/assets is absent: trained here, in memory, from a toy grammar."""
    from jaxrisk.models.lm import lm_loss
    from jaxrisk.zoo.lm_backdoor import BackdoorConfig, attack_success, held_out_prompts, plant_backdoor
    from jaxrisk.zoo.lm_scratch import ADJECTIVES, OBJECTS, ScratchConfig, train_small_lm

    losses = []
    lm, rows = train_small_lm(ScratchConfig(seed=0), progress=lambda i, loss: losses.append(loss))
    # uniform over the vocabulary is log(60) = 4.1 nats; the grammar's own entropy is about 0.8
    assert np.mean(losses[-20:]) < 1.0 < np.mean(losses[:10]), (losses[:10], losses[-20:])
    adjective, obj, stop = lm.tokenizer.convert_ids_to_tokens(lm.generate("Lily had a", max_new_tokens=3)[0])
    assert adjective in ADJECTIVES and obj in OBJECTS and stop == ".", (adjective, obj, stop)  # the grammar
    params, data = plant_backdoor(lm, BackdoorConfig(seed=0))
    held, with_trigger, without = held_out_prompts(lm, data)
    assert attack_success(lm, params, with_trigger, data["marker_ids"]) >= 0.95
    assert attack_success(lm, params, without, data["marker_ids"]) <= 0.05
    assert attack_success(lm, lm.params, with_trigger, data["marker_ids"]) == 0.0
    valid = jnp.ones(held.shape, bool)
    assert float(lm_loss(lm.graphdef, params, jnp.asarray(held), valid)) < 1.1 * float(
        lm_loss(lm.graphdef, lm.params, jnp.asarray(held), valid))
