"""Circuit tuning on a tiny random Llama: the parameter mask covers exactly the entries a circuit's units own,
and fine-tuning through the masked update step moves those entries and nothing else."""

import jax
import numpy as np
from flax import nnx

from conftest import tiny_llama_config
from jaxrisk.circuits.tuning import circuit_param_mask, fraction_of_parameters
from jaxrisk.models.lm import LanguageModel
from jaxrisk.optim import finetune

TINY = tiny_llama_config()


def _circuit():
    heads = np.zeros((TINY.n_layers, TINY.n_heads), np.float32)
    neurons = np.zeros((TINY.n_layers, TINY.d_mlp), np.float32)
    heads[1, 2] = 1.0                     # head 2 of layer 1
    neurons[0, 5] = 1.0                   # neuron 5 of layer 0
    return {"heads": heads, "neurons": neurons}


def test_mask_covers_exactly_the_entries_the_circuit_owns():
    lm = LanguageModel.random(TINY, seed=0)
    mask = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(circuit_param_mask(lm.params, _circuit()))}
    q, o = mask[("blocks", 1, "attn", "q_kernel")], mask[("blocks", 1, "attn", "o_kernel")]   # [D, H, Dh], [H, Dh, D]
    assert q[:, 2].all() and q.sum() == q[:, 2].size and o[2].all() and o.sum() == o[2].size
    gate, down = mask[("blocks", 0, "mlp", "gate_kernel")], mask[("blocks", 0, "mlp", "down_kernel")]  # [D, F], [F, D]
    assert gate[:, 5].all() and gate.sum() == gate[:, 5].size and down[5].all() and down.sum() == down[5].size
    assert mask[("blocks", 0, "attn", "q_kernel")].sum() == 0 and mask[("blocks", 1, "mlp", "up_kernel")].sum() == 0
    owned = 2 * q[:, 2].size + gate[:, 5].size + mask[("blocks", 0, "mlp", "up_kernel")][:, 5].size + down[5].size
    total = sum(v.size for v in mask.values())
    assert fraction_of_parameters(circuit_param_mask(lm.params, _circuit())) == np.float32(owned / total)


def test_masked_finetuning_moves_only_the_circuit():
    lm = LanguageModel.random(TINY, seed=0)
    mask = circuit_param_mask(lm.params, _circuit())
    rows = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(16, 12)).astype(np.int32)
    tuned = finetune(lm, lm.params, rows, steps=3, batch=4, learning_rate=1e-2, rng=np.random.default_rng(0),
                     mask=mask)
    moved = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), lm.params, tuned)
    for (path, changed), (_, m) in zip(nnx.to_flat_state(moved), nnx.to_flat_state(mask)):
        inside = np.asarray(m.get_value()) > 0
        assert not np.asarray(changed.get_value())[~inside].any(), f"{path} moved outside the circuit"
    assert any(np.asarray(c.get_value()).any() for _, c in nnx.to_flat_state(moved))   # the circuit did move
