"""Circuit masks: straight-through and hard-concrete gates, granularities, and masked forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_llama_config
from jaxrisk.circuits.masks import (apply_masks, density, expected_l0, hard_concrete_mean, hard_concrete_sample,
                                    init_logits, mask_shapes, ste_sigmoid)
from jaxrisk.errors import InputError

TINY = tiny_llama_config()


def test_ste_is_binary_forward_and_sigmoid_backward():
    x = jnp.asarray([-2.0, -0.1, 0.3, 4.0])
    np.testing.assert_array_equal(ste_sigmoid(x), [0, 0, 1, 1])
    grad = jax.grad(lambda v: ste_sigmoid(v).sum())(x)
    np.testing.assert_allclose(grad, jax.nn.sigmoid(x) * (1 - jax.nn.sigmoid(x)), rtol=1e-6)


def test_hard_concrete_samples_reach_exact_zeros_and_ones_and_match_expected_l0():
    log_alpha = jnp.full((20000,), 0.5)
    s = hard_concrete_sample(jax.random.key(0), log_alpha)
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0 and bool(((s > 0) & (s < 1)).any())
    # expected L0 = P(s > 0), checked by sampling
    assert float((s > 0).mean()) == pytest.approx(float(expected_l0(log_alpha)[0]), abs=0.01)
    assert float(hard_concrete_mean(jnp.asarray(10.0))) == 1.0 and float(hard_concrete_mean(jnp.asarray(-10.0))) == 0.0
    grad = jax.grad(lambda a: hard_concrete_sample(jax.random.key(1), a).sum())(jnp.zeros(8))
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0


def test_granularities_and_density():
    assert mask_shapes(TINY, "heads") == {"heads": (2, 4)}
    assert mask_shapes(TINY, "neurons") == {"neurons": (2, 48)}
    logits = init_logits(TINY, "both", value=-1.0)
    assert set(apply_masks(logits, "binary")) == {"heads", "neurons"}
    assert float(density(logits, "ste")) == pytest.approx(float(jax.nn.sigmoid(-1.0)))
    with pytest.raises(InputError, match="granularity"):
        mask_shapes(TINY, "layers")


@pytest.mark.slow
def test_all_ones_masks_change_nothing_and_one_head_changes_its_own_output():
    from flax import nnx

    from jaxrisk.models.lm import LanguageModel

    lm = LanguageModel.random(TINY, seed=0)
    tokens = np.random.default_rng(0).integers(0, 64, size=(2, 12)).astype(np.int32)
    masks = apply_masks(init_logits(TINY, "both", value=5.0), "ste")
    np.testing.assert_array_equal(np.asarray(lm(tokens, head_mask_lh=masks["heads"],
                                                 neuron_mask_lf=masks["neurons"])), np.asarray(lm(tokens)))
    # zeroing head (1, 2) leaves layer 0 untouched and changes the output
    off = masks["heads"].at[1, 2].set(0.0)
    _, acts = lm.run_with_cache(tokens, names=["blocks.1.hook_resid_pre"], head_mask_lh=off)
    _, ref = lm.run_with_cache(tokens, names=["blocks.1.hook_resid_pre"])
    np.testing.assert_array_equal(np.asarray(acts["blocks.1.hook_resid_pre"]),
                                  np.asarray(ref["blocks.1.hook_resid_pre"]))
    assert float(jnp.abs(lm(tokens, head_mask_lh=off) - lm(tokens)).max()) > 1e-4
    del nnx
