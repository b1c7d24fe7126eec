"""Safety circuit tuning: fine-tune only a circuit's parameters, or freeze them while tuning the rest.

A circuit of heads and neurons owns parameter entries: head h of layer l owns
q_kernel[:, h], o_kernel[h] (and its bias); neuron n owns gate/up_kernel[:, n],
down_kernel[n] (and biases). `circuit_param_mask` turns a unit circuit into a
0/1 pytree over the parameters; `jaxrisk.optim.finetune(mask=...)`
trains only where it is 1: the circuit alone, or (with `1 - mask`) everything
but the circuit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def circuit_param_mask(params: nnx.State, circuit: dict[str, np.ndarray]) -> nnx.State:
    """1.0 on the parameter entries owned by the circuit's units, 0.0 elsewhere (same tree as params)."""
    flat = {}
    for path, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        m = np.zeros(shape, np.float32)
        if path[0] == "blocks":
            layer, part, name = path[1], path[2], path[3]
            heads = circuit.get("heads")
            neurons = circuit.get("neurons")
            if part == "attn" and heads is not None:
                on = heads[layer] > 0
                if name in ("q_kernel",):
                    m[:, on] = 1.0
                elif name in ("q_bias", "o_kernel"):
                    m[on] = 1.0
            if part == "mlp" and neurons is not None:
                on = neurons[layer] > 0
                if name in ("gate_kernel", "up_kernel"):
                    m[:, on] = 1.0
                elif name in ("gate_bias", "up_bias", "down_kernel"):
                    m[on] = 1.0
        flat[path] = nnx.Param(jnp.asarray(m))
    return nnx.from_flat_state(flat)


def fraction_of_parameters(mask: nnx.State) -> float:
    leaves = jax.tree.leaves(mask)
    return float(sum(jnp.sum(m) for m in leaves) / sum(m.size for m in leaves))
