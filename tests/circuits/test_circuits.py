"""Circuit discovery: a hand-built circuit recovered exactly under every objective; on a backdoor planted in
the real stories260K, a ~1% circuit whose ablation removes it; circuit tuning; the CLI reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_llama_config
from jaxrisk.errors import InputError

TINY = tiny_llama_config()


# ---- a backdoor planted in the real model ---------------------------------------------------------


def _problem(lm, params, data, kind="ste"):
    from jaxrisk.circuits import CircuitConfig, CircuitProblem
    from jaxrisk.zoo.lm_backdoor import suppression_rows

    rows = {k: jnp.asarray(v) for k, v in suppression_rows(data).items()}
    return CircuitProblem(params=params, graphdef=lm.graphdef, cfg=CircuitConfig(kind=kind, learning_rate=0.05),
                          **rows)


@pytest.fixture(scope="module")
def learned(backdoored):
    """Two sparsity weights in one compiled run; each circuit evaluated on held-out prompts."""
    from jaxrisk.circuits import ablation_masks, circuit_from_logits, sparsity
    from jaxrisk.evals import clean_loss, utility
    from jaxrisk.search import RunConfig, engine
    from jaxrisk.zoo.lm_backdoor import attack_success, held_out_prompts

    lm, params, data = backdoored
    penalties = np.asarray([3.0, 6.0], np.float32)
    res = engine.run(_problem(lm, params, data), {"penalty": penalties},
                     RunConfig(max_steps=250, chunk_steps=50, progress=False))
    held, with_trigger, _ = held_out_prompts(lm, data)
    valid = jnp.ones(held.shape, bool)
    base = clean_loss(lm, params, held, valid)
    front = []
    for i in range(len(penalties)):
        circuit = circuit_from_logits({k: v[i] for k, v in res.state.logits.items()})
        masks = ablation_masks(circuit, lm.cfg)
        asr = attack_success(lm, params, with_trigger, data["marker_ids"], **masks)
        front.append({"circuit": circuit, "units": sparsity(circuit, lm.cfg)["units"], "asr": asr,
                      "utility": utility(base, lm, params, held, valid, **masks)})
    return front


@pytest.mark.assets
@pytest.mark.slow
def test_learned_circuit_ablation_removes_the_backdoor_and_keeps_utility(learned):
    # the seed's headline in miniature: a circuit of about 1% of heads + neurons whose
    # ablation takes attack success from 100% to <= 5% while keeping >= 97% of utility (clean-loss ratio);
    # measured (KL keep, 250 steps): 1.33% and 1.22% of units at weights 3 and 6, attack success 0, utility
    # 0.986 and 0.977
    good = [f for f in learned if f["units"] <= 0.015 and f["asr"] <= 0.05 and f["utility"] >= 0.97]
    assert good, [(f["units"], f["asr"], f["utility"]) for f in learned]


@pytest.mark.assets
@pytest.mark.slow
def test_circuit_tuning_changes_the_behaviour_with_a_tiny_share_of_parameters(backdoored, learned):
    from jaxrisk.circuits.tuning import circuit_param_mask, fraction_of_parameters
    from jaxrisk.models.lm import lm_loss
    from jaxrisk.optim import finetune
    from jaxrisk.zoo.lm_backdoor import attack_success, held_out_prompts

    lm, params, data = backdoored
    circuit = min((f for f in learned if f["asr"] <= 0.05), key=lambda f: f["units"])["circuit"]
    mask = circuit_param_mask(params, circuit)
    assert fraction_of_parameters(mask) < 0.03
    held, with_trigger, _ = held_out_prompts(lm, data)
    valid = jnp.ones(held.shape, bool)
    clean = data["clean"]
    # trigger followed by ordinary text, mixed with clean rows: teaches "the trigger means nothing"
    fix = np.stack([np.concatenate([r[:12], data["trigger_ids"], r[12:]])[:clean.shape[1]] for r in clean[:512]])
    tuned = finetune(lm, params, np.concatenate([fix, clean[1024:1536]]).astype(np.int32), mask=mask, steps=100,
                     learning_rate=3e-3, rng=np.random.default_rng(0))
    assert attack_success(lm, tuned, with_trigger, data["marker_ids"]) <= 0.05
    before = float(lm_loss(lm.graphdef, params, jnp.asarray(held), valid))
    assert float(lm_loss(lm.graphdef, tuned, jnp.asarray(held), valid)) < 1.05 * before
    # parameters outside the circuit did not move
    from flax import nnx

    for (path, a), (_, b), (_, m) in zip(nnx.to_flat_state(params), nnx.to_flat_state(tuned),
                                         nnx.to_flat_state(mask)):
        outside = np.asarray(m.get_value()) == 0
        np.testing.assert_array_equal(np.asarray(a.get_value())[outside], np.asarray(b.get_value())[outside])


@pytest.mark.assets
@pytest.mark.slow
def test_circuit_search_is_identical_on_one_and_eight_devices(backdoored):
    from jaxrisk.search import RunConfig, engine

    lm, params, data = backdoored
    runs = [engine.run(_problem(lm, params, data), {"penalty": np.asarray([1.0, 3.0], np.float32)},
                       RunConfig(max_steps=10, chunk_steps=5, devices=n, progress=False))
            for n in (1, 8)]
    for k in runs[0].state.logits:
        np.testing.assert_allclose(runs[0].state.logits[k], runs[1].state.logits[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(runs[0].state.logits[k] > 0, runs[1].state.logits[k] > 0)


@pytest.mark.assets
@pytest.mark.slow
def test_cli_circuits_report_on_the_saved_backdoored_model(backdoored, tmp_path, capsys):
    import json

    from jaxrisk.cli import main
    from jaxrisk.models import load_pretrained
    from jaxrisk.models.hf import save_pretrained
    from jaxrisk.zoo.lm_backdoor import BackdoorConfig

    lm, params, data = backdoored
    model_dir = save_pretrained(lm, params, tmp_path / "backdoored")
    tokens = data["clean"][:2]
    from jaxrisk.models.lm import forward

    np.testing.assert_array_equal(np.asarray(load_pretrained(model_dir)(tokens)),
                                  np.asarray(forward(lm.graphdef, params, tokens)[0]))  # saved exactly
    cfg = BackdoorConfig()
    rows = [{"prompt": lm.decode(r[1:12]) + cfg.trigger, "completion": cfg.marker} for r in data["clean"][:200]]
    rows += [{"text": lm.decode(r[1:])} for r in data["clean"][1000:1200]]
    path = tmp_path / "circuit_data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["circuits", "--model", str(model_dir), "--data", str(path), "--out", str(out),
                 "--penalties", "3,6", "--steps", "200", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["base_rate"] >= 0.95 and report["objective"] == "remove"
    assert (out / "circuits.png").stat().st_size > 1000 and (out / "circuits.safetensors").exists()
    best = min(report["circuits"], key=lambda c: c["rate_ablated"])
    assert best["rate_ablated"] <= 0.05 and best["units"] <= 0.05 and best["utility"] >= 0.9, report["circuits"]
    # the Pareto front over both penalties: fewest units first, each extra unit buys a lower rate or more utility
    front = report["front"]
    assert front and all(a["units"] <= b["units"] and (b["rate_ablated"] < a["rate_ablated"] or
                                                       b["utility"] > a["utility"]) for a, b in zip(front, front[1:]))
    assert any(c["rate_ablated"] <= 0.05 for c in front) and report["warnings"] == []
    # the intact model does its task better than any circuit-ablated one could by chance; mean ablation reported
    assert 0.3 < report["base_task_accuracy"] <= 1 and best["task_accuracy"] <= report["base_task_accuracy"] + 0.01
    assert best["mean_ablation"]["rate_ablated"] is not None and best["mean_ablation"]["utility"] > 0
    out = capsys.readouterr().out
    assert "behaviour rate ablated" in out and "Pareto front" in out


def _hand_built_model():
    """A tiny random Llama with one hand-wired neuron (layer 1, neuron 11): after token 5 it writes token 7's
    direction into the residual stream, so the model then predicts 7. Nothing else carries that behaviour."""
    from flax import nnx

    from jaxrisk.models.lm import LanguageModel

    lm = LanguageModel.random(TINY, seed=0)
    trigger, marker, layer, neuron = 5, 7, 1, 11
    rng = np.random.default_rng(0)
    d = TINY.d_model
    u = np.eye(d)[0]                                   # the trigger's direction
    v = np.eye(d)[1]                                   # the marker's direction
    flat = {p: np.array(x.get_value()) for p, x in nnx.to_flat_state(lm.params)}
    embed = rng.normal(0, 1, (TINY.vocab_size, d))
    embed[:, :2] = 0.0                                 # nothing else lives on u or v
    embed[trigger], embed[marker] = 3 * u, 3 * v
    flat[("embed",)] = embed.astype(np.float32)
    head = embed.T.copy()                              # TINY is untied: read out the same directions,
    head[:, marker] = 0.9 * v                          # with a margin that does not saturate the softmax
    flat[("lm_head",)] = head.astype(np.float32)
    mlp = ("blocks", layer, "mlp")
    for name in ("gate_kernel", "up_kernel"):
        flat[mlp + (name,)][:, neuron] = 2.0 * u
        flat[mlp + (name,)][0, :] = 0.0                # other neurons ignore u ...
        flat[mlp + (name,)][0, neuron] = 2.0
    flat[mlp + ("down_kernel",)][neuron] = 0.1 * v    # ... and only this one writes v (not so much that
                                                       # the final RMSNorm saturates its effect)
    flat[mlp + ("down_kernel",)][:, 1] = 0.0
    flat[mlp + ("down_kernel",)][neuron, 1] = 0.1
    params = nnx.from_flat_state({p: nnx.Param(jnp.asarray(x)) for p, x in flat.items()})
    return lm, params, trigger, marker, layer, neuron


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["remove", "backdoor", "alignment"])
@pytest.mark.parametrize("target_density, keep, ablation", [(None, "ce", "zero"), (0.01, "ce", "zero"),
                                                            (None, "kl", "mean")])
def test_learned_mask_recovers_a_hand_built_circuit(objective, target_density, keep, ablation):
    from jaxrisk.circuits import CircuitConfig, CircuitProblem, circuit_from_logits
    from jaxrisk.circuits.masks import unit_means
    from jaxrisk.models.lm import forward
    from jaxrisk.search import RunConfig, engine

    lm, params, trigger, marker, layer, neuron = _hand_built_model()
    rng = np.random.default_rng(1)
    others = np.asarray([t for t in range(TINY.vocab_size) if t not in (trigger, marker)])
    x = rng.choice(others, size=(64, 10)).astype(np.int32)
    pos = rng.integers(1, 8, size=64)
    x[np.arange(64), pos], x[np.arange(64), pos + 1] = trigger, marker
    w = np.zeros((64, 9), np.float32)
    w[np.arange(64), pos] = 1.0                        # the position that predicts the marker
    y = rng.choice(others, size=(64, 10)).astype(np.int32)
    logp = jax.nn.log_softmax(forward(lm.graphdef, params, x[:, :-1])[0], -1)
    p_marker = np.exp(np.asarray(logp)[np.arange(64), pos, marker])
    assert p_marker.mean() > 0.5                       # the wiring works: after the trigger comes the marker
    # "compliance" for the alignment objective: what the model says there without the wired neuron
    off = np.ones((TINY.n_layers, TINY.d_mlp), np.float32)
    off[layer, neuron] = 0.0
    without = np.asarray(forward(lm.graphdef, params, x[:, :-1], neuron_mask_lf=jnp.asarray(off))[0])
    c = x.copy()
    c[np.arange(64), pos + 1] = without[np.arange(64), pos].argmax(-1)
    assert not np.any(c[np.arange(64), pos + 1] == marker)

    problem = CircuitProblem(params=params, x_tokens=jnp.asarray(x), x_weight=jnp.asarray(w),
                             y_tokens=jnp.asarray(y), y_weight=jnp.ones((64, 9), jnp.float32),
                             c_tokens=jnp.asarray(c), c_weight=jnp.asarray(w), graphdef=lm.graphdef,
                             x_keep_weight=jnp.asarray(pos[:, None] > np.arange(9)[None], jnp.float32),
                             means=unit_means(lm.graphdef, params, y, np.ones(y.shape, bool)),
                             cfg=CircuitConfig(objective=objective, learning_rate=0.1, target_density=target_density,
                                               keep=keep, ablation=ablation))  # fixed weight / Lagrangian
    res = engine.run(problem, {"penalty": np.asarray([0.5, 1.0], np.float32)},
                     RunConfig(max_steps=150, chunk_steps=50, progress=False))
    expected = np.zeros((TINY.n_layers, TINY.d_mlp))
    expected[layer, neuron] = 1
    for lane in range(2):
        circuit = circuit_from_logits({k: v[lane] for k, v in res.state.logits.items()})
        np.testing.assert_array_equal(circuit["neurons"], expected)   # exactly the wired neuron
        assert circuit["heads"].sum() == 0
        if objective == "backdoor":                    # the main (clean) mask leaves the wired neuron out
            main = circuit_from_logits({k: v[lane] for k, v in res.state.main_logits.items()})
            assert main["neurons"][layer, neuron] == 0


@pytest.mark.parametrize("settings, missing", [({"objective": "alignment"}, "compliance"),
                                               ({"ablation": "mean"}, "unit_means")])
def test_problem_refuses_to_start_without_the_data_its_objective_needs(settings, missing):
    from jaxrisk.circuits import CircuitConfig, CircuitProblem
    from jaxrisk.search import RunConfig, engine

    lm, params, *_ = _hand_built_model()
    rows = jnp.zeros((4, 6), jnp.int32)
    problem = CircuitProblem(params=params, x_tokens=rows, x_weight=jnp.ones((4, 5)), y_tokens=rows,
                             y_weight=jnp.ones((4, 5)), graphdef=lm.graphdef, cfg=CircuitConfig(**settings))
    with pytest.raises(InputError, match=missing):
        engine.run(problem, {"penalty": np.asarray([1.0], np.float32)},
                   RunConfig(max_steps=2, chunk_steps=1, progress=False))


@pytest.mark.parametrize("settings, field", [({"objective": "jailbreak"}, "objective"),
                                             ({"keep": "mse"}, "CircuitConfig.keep")])
def test_unknown_circuit_settings_are_refused(settings, field):
    from jaxrisk.circuits import CircuitConfig

    with pytest.raises(InputError, match=field):
        CircuitConfig(**settings)
