"""Safety circuit tuning: fine-tune only a circuit's parameters, or freeze them while tuning the rest.

A circuit of heads and neurons owns parameter entries: head h of layer l owns
q_kernel[:, h], o_kernel[h] (and its bias); neuron n owns gate/up_kernel[:, n],
down_kernel[n] (and biases). `circuit_param_mask` turns a unit circuit into a
0/1 pytree over the parameters; `masked_updates` multiplies Optax updates by
it (only the circuit trains) or by its complement (the circuit is frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrisk.zoo.lm_backdoor import lm_loss


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


def masked_updates(mask: nnx.State) -> optax.GradientTransformation:
    """Multiply every update by `mask` (0 freezes an entry)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, mask), state

    return optax.GradientTransformation(init, update)


def tune(lm, params, rows: np.ndarray, mask: nnx.State | None, *, steps: int = 200, batch: int = 32,
         learning_rate: float = 1e-3, seed: int = 0) -> nnx.State:
    """Next-token fine-tuning on `rows` [N, L]; with `mask`, only entries where it is 1 change."""
    opt = optax.adam(learning_rate)
    if mask is not None:
        opt = optax.chain(opt, masked_updates(mask))
    state = opt.init(params)
    rng = np.random.default_rng(seed)

    @jax.jit
    def step(params, state, batch_rows):
        grads = jax.grad(lambda p: lm_loss(lm.graphdef, p, batch_rows, jnp.ones_like(batch_rows, bool)))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state, jnp.asarray(rows[rng.integers(0, len(rows), batch)]))
    return params


def fraction_of_parameters(mask: nnx.State) -> float:
    leaves = jax.tree.leaves(mask)
    return float(sum(jnp.sum(m) for m in leaves) / sum(m.size for m in leaves))
