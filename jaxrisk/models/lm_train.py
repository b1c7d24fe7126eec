"""Next-token fine-tuning of a causal LM's parameters: the loss and one Adam loop.

Used to plant behaviours in the zoo, to tune only a circuit, and to fine-tune
everything but a circuit. `mask` (a 0/1 tree like the parameters) multiplies
every update, so entries where it is 0 never move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrisk.models.lm import forward
from jaxrisk.scorers.probe import pad_batch


def answer_rows(prompts, answers) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt + answer rows [N, L] and next-token weights [N, L-1], 1 where the next token
    belongs to the answer: the rows a loss on the answer alone needs."""
    tokens, _ = pad_batch([np.concatenate([p, a]) for p, a in zip(prompts, answers)])
    weight = np.zeros((len(tokens), tokens.shape[1] - 1), np.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        weight[i, len(p) - 1:len(p) + len(a) - 1] = 1.0
    return tokens, weight


def lm_loss(graphdef, params, tokens_bl, valid_bl, **masks):
    """Mean next-token cross-entropy over the positions whose target token is valid."""
    logits, _, _ = forward(graphdef, params, tokens_bl[:, :-1], **masks)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens_bl[:, 1:, None], -1)[..., 0]
    v = valid_bl[:, 1:]
    return -jnp.sum(jnp.where(v, logp, 0.0)) / jnp.maximum(v.sum(), 1)


def masked_updates(mask: nnx.State) -> optax.GradientTransformation:
    """Multiply every update by `mask` (0 freezes an entry)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, mask), state

    return optax.GradientTransformation(init, update)


def finetune(lm, params, rows: np.ndarray, *, steps: int, batch: int = 32, learning_rate: float = 1e-3,
             rng: np.random.Generator, valid: np.ndarray | None = None, mask: nnx.State | None = None,
             progress=None) -> nnx.State:
    """Adam on the next-token loss of random batches of `rows` [N, L] (`valid` [N, L] marks real tokens;
    default all). With `mask`, only entries where it is 1 change. `progress(step, loss)` is called per step."""
    opt = optax.adam(learning_rate)
    if mask is not None:
        opt = optax.chain(opt, masked_updates(mask))
    valid = np.ones(rows.shape, bool) if valid is None else valid
    state = opt.init(params)

    @jax.jit
    def step(params, state, tokens, ok):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(lm.graphdef, p, tokens, ok))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
        idx = rng.integers(0, len(rows), batch)
        params, state, loss = step(params, state, jnp.asarray(rows[idx]), jnp.asarray(valid[idx]))
        if progress is not None:
            progress(i, float(loss))
    return params
