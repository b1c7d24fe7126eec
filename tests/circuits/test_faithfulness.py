"""Faithfulness to the intact model (KL), mean ablation, task accuracy and the Pareto front of a circuit sweep,
each on a case whose answer is known."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_llama_config
from jaxrisk.errors import InputError

TINY = tiny_llama_config()


def _tiny_lm(**overrides):
    from jaxrisk.models.lm import LanguageModel

    return LanguageModel.random(dataclasses.replace(TINY, **overrides), seed=0)


def _rows(n=6, width=9, seed=0):
    """Token rows with ragged right padding, and their valid mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY.vocab_size, (n, width)).astype(np.int32)
    valid = np.ones((n, width), bool)
    for i in range(n):
        valid[i, width - i % 3:] = False
    return np.where(valid, tokens, 0), valid


def test_kl_keep_is_zero_for_the_intact_model_and_grows_with_ablation():
    from flax import nnx

    from jaxrisk.circuits import CircuitConfig
    from jaxrisk.circuits.problem import keep_term

    lm = _tiny_lm()
    model = nnx.merge(lm.graphdef, lm.params)
    y, valid = _rows()
    x, _ = _rows(seed=1)
    batch = {"y": jnp.asarray(y), "y_w": jnp.asarray(valid[:, 1:], jnp.float32), "x": jnp.asarray(x),
             "x_keep_w": jnp.ones((x.shape[0], x.shape[1] - 1), jnp.float32)}
    kl = CircuitConfig(keep="kl")
    ones = {"heads": jnp.ones((TINY.n_layers, TINY.n_heads)), "neurons": jnp.ones((TINY.n_layers, TINY.d_mlp))}
    assert float(keep_term(model, ones, batch, kl)) == pytest.approx(0.0, abs=1e-6)
    assert float(keep_term(model, {}, batch, kl)) == pytest.approx(0.0, abs=1e-6)
    one_head = dict(ones, heads=ones["heads"].at[0, 1].set(0.0))
    all_heads = dict(ones, heads=jnp.zeros_like(ones["heads"]))
    small, large = float(keep_term(model, one_head, batch, kl)), float(keep_term(model, all_heads, batch, kl))
    assert 0 < small < large
    # the KL is the mean over the weighted positions of sum_v p log(p / q), computed here by hand (float64)
    from jaxrisk.models.lm import forward

    def by_hand(tokens):
        def log_softmax(**masks):
            z = np.asarray(forward(lm.graphdef, lm.params, tokens[:, :-1], **masks)[0], np.float64)
            z = z - z.max(-1, keepdims=True)
            return z - np.log(np.exp(z).sum(-1, keepdims=True))
        log_p = log_softmax()
        log_q = log_softmax(head_mask_lh=all_heads["heads"], neuron_mask_lf=all_heads["neurons"])
        return np.sum(np.exp(log_p) * (log_p - log_q), -1)

    kl_y, kl_x, w = by_hand(batch["y"]), by_hand(batch["x"]), valid[:, 1:]
    assert large == pytest.approx((kl_y[w].sum() + kl_x.sum()) / (w.sum() + kl_x.size), rel=1e-4)
    # the data cross-entropy of the intact model is not zero: the two keep terms measure different things
    assert float(keep_term(model, ones, batch, CircuitConfig(keep="ce"))) > 1.0


def test_unit_means_are_the_mean_activations_over_real_tokens():
    from jaxrisk.circuits.masks import unit_means

    lm = _tiny_lm()
    tokens, valid = _rows(n=7)
    means = unit_means(lm.graphdef, lm.params, tokens, valid, batch=3)   # batches of 3: the sums add up
    _, acts = lm.run_with_cache(tokens, [f"blocks.{i}.{h}" for i in range(TINY.n_layers)
                                         for h in ("attn.hook_z", "mlp.hook_post")])
    for i in range(TINY.n_layers):
        np.testing.assert_allclose(means["heads"][i], np.asarray(acts[f"blocks.{i}.attn.hook_z"])[valid].mean(0),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(means["neurons"][i], np.asarray(acts[f"blocks.{i}.mlp.hook_post"])[valid].mean(0),
                                   rtol=1e-5, atol=1e-6)
    assert means["heads"].shape == (TINY.n_layers, TINY.n_heads, TINY.head_dim)


def test_mean_ablation_equals_zero_ablation_plus_the_means_written_as_output_biases():
    """By hand: a unit set to a constant c adds c's projection to its block's output at every position, so mean
    ablation = zero ablation with o_bias += sum_h (1 - m_h) mean_h @ O_h and down_bias += sum_f (1 - m_f)
    mean_f down_f."""
    from flax import nnx

    from jaxrisk.circuits.problem import ablation_masks
    from jaxrisk.models.lm import forward

    lm = _tiny_lm(o_bias=True, mlp_bias=True)
    rng = np.random.default_rng(3)
    means = {"heads": jnp.asarray(rng.normal(size=(TINY.n_layers, TINY.n_heads, TINY.head_dim)), jnp.float32),
             "neurons": jnp.asarray(rng.normal(size=(TINY.n_layers, TINY.d_mlp)), jnp.float32)}
    circuit = {"heads": (rng.random((TINY.n_layers, TINY.n_heads)) < 0.5).astype(np.float32),
               "neurons": (rng.random((TINY.n_layers, TINY.d_mlp)) < 0.3).astype(np.float32)}
    tokens, valid = _rows()
    for alone in (False, True):
        kept = {k: v if alone else 1.0 - v for k, v in circuit.items()}
        mean_ablated = forward(lm.graphdef, lm.params, tokens, valid_bt=valid,
                               **ablation_masks(circuit, TINY, alone=alone, means=means))[0]
        flat = {p: np.array(x.get_value()) for p, x in nnx.to_flat_state(lm.params)}
        for layer in range(TINY.n_layers):
            o_kernel = flat[("blocks", layer, "attn", "o_kernel")]
            flat[("blocks", layer, "attn", "o_bias")] += np.einsum(
                "hk,hkd->d", (1 - kept["heads"][layer])[:, None] * np.asarray(means["heads"][layer]), o_kernel)
            flat[("blocks", layer, "mlp", "down_bias")] += (
                (1 - kept["neurons"][layer]) * np.asarray(means["neurons"][layer])) @ flat[("blocks", layer, "mlp",
                                                                                             "down_kernel")]
        biased = nnx.from_flat_state({p: nnx.Param(jnp.asarray(x)) for p, x in flat.items()})
        zero_ablated = forward(lm.graphdef, biased, tokens, valid_bt=valid,
                               **ablation_masks(circuit, TINY, alone=alone))[0]
        np.testing.assert_allclose(np.asarray(mean_ablated)[valid], np.asarray(zero_ablated)[valid],
                                   rtol=1e-4, atol=1e-5)
        plain = forward(lm.graphdef, lm.params, tokens, valid_bt=valid, **ablation_masks(circuit, TINY, alone=alone))[0]
        assert not np.allclose(np.asarray(plain), np.asarray(mean_ablated), atol=1e-3)   # the means did something


def test_mean_ablation_values_of_the_wrong_shape_are_refused():
    lm = _tiny_lm()
    with pytest.raises(InputError, match="head_mean_lhk: expected shape"):
        lm(np.ones((1, 4), np.int32), head_mask_lh=np.ones((TINY.n_layers, TINY.n_heads)),
           head_mean_lhk=np.zeros((TINY.n_layers, TINY.n_heads)))


def test_next_token_accuracy_counts_only_real_next_tokens():
    from jaxrisk.evals import next_token_accuracy
    from jaxrisk.models.lm import forward

    lm = _tiny_lm()
    tokens, valid = _rows()
    greedy = np.asarray(forward(lm.graphdef, lm.params, tokens[:, :-1])[0]).argmax(-1)
    # rewrite the text so the model is right exactly where a chosen pattern says, then count by hand
    text = tokens.copy()
    right = np.random.default_rng(0).random(greedy.shape) < 0.5
    text[:, 1:] = np.where(right, greedy, (greedy + 1) % TINY.vocab_size)
    # the model's predictions depend on earlier tokens, so recompute them on the rewritten text
    greedy = np.asarray(forward(lm.graphdef, lm.params, text[:, :-1])[0]).argmax(-1)
    expected = ((greedy == text[:, 1:]) & valid[:, 1:]).sum() / valid[:, 1:].sum()
    assert next_token_accuracy(lm, lm.params, text, valid) == pytest.approx(expected)
    assert 0 < expected < 1


def test_pareto_front_keeps_exactly_the_undominated_circuits_in_a_monotone_order():
    from jaxrisk.search.reduce import pareto_set

    costs = lambda c: (c["units"], c["rate"], -c["utility"])  # noqa: E731
    hand = [{"units": 0.00, "rate": 1.0, "utility": 1.00},    # empty: keeps everything, removes nothing
            {"units": 0.01, "rate": 0.0, "utility": 0.95},
            {"units": 0.02, "rate": 0.0, "utility": 0.90},    # larger and worse than the one above: dominated
            {"units": 0.02, "rate": 0.0, "utility": 0.98},
            {"units": 0.01, "rate": 0.0, "utility": 0.95},    # a duplicate of the second: kept once
            {"units": 0.05, "rate": 0.5, "utility": 0.99}]
    assert pareto_set(hand, costs) == [0, 1, 3, 5]
    rng = np.random.default_rng(0)
    for _ in range(20):
        items = [{"units": float(u), "rate": float(r), "utility": float(t)}
                 for u, r, t in zip(rng.integers(0, 6, 12) / 100, rng.integers(0, 3, 12) / 2, rng.random(12))]
        front = pareto_set(items, costs)
        dominates = lambda a, b: all(x <= y for x, y in zip(costs(a), costs(b))) and costs(a) != costs(b)  # noqa
        for i in front:
            assert not any(dominates(items[j], items[i]) for j in range(len(items)))
        for i in set(range(len(items))) - set(front):
            assert any(dominates(items[j], items[i]) or (costs(items[j]) == costs(items[i]) and j in front)
                       for j in range(len(items)))
        # monotone: along the front, every extra unit buys a lower behaviour rate or a higher utility
        for a, b in zip(front, front[1:]):
            assert items[a]["units"] <= items[b]["units"]
            if items[a]["units"] < items[b]["units"]:
                assert items[b]["rate"] < items[a]["rate"] or items[b]["utility"] > items[a]["utility"]


def test_sweep_warnings_name_the_missed_range():
    from jaxrisk.circuits.run import sweep_warnings

    empty = [{"units": 0.0, "rate_ablated": 1.0}] * 3
    assert any("too large" in w for w in sweep_warnings(empty))
    dense = [{"units": 0.3, "rate_ablated": 0.0}, {"units": 0.2, "rate_ablated": 0.0}]
    assert any("too small" in w for w in sweep_warnings(dense))
    good = [{"units": 0.0, "rate_ablated": 1.0}, {"units": 0.01, "rate_ablated": 0.0}]
    assert sweep_warnings(good) == []
    # circuits learned for mean ablation are judged by their mean-ablation rates, not the zero-ablation ones
    learned_mean = [{"units": 0.01, "rate_ablated": 0.6, "mean_ablation": {"rate_ablated": 0.0}}]
    assert sweep_warnings(learned_mean, "mean") == []
    assert any("no circuit" in w for w in sweep_warnings(learned_mean, "zero"))
