"""The one pure update step every training loop in jaxrisk runs, and the loops built on it.

`update_step(loss_fn, optimizer, mask)` returns

    step(params, opt_state, batch) -> (params, opt_state, loss)

a pure function (jit it, scan it, vmap it) that takes one optax step on
`loss_fn(params, batch)`. With `mask` (a 0/1 tree like the parameters) every
update is multiplied by it, so entries where it is 0 never move: tune only a
circuit, or everything but a circuit. Zoo planting, LM fine-tuning, probe
fitting and circuit tuning all train through it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrisk.models.lm import lm_loss

PyTree = Any


def masked_updates(mask: PyTree) -> optax.GradientTransformation:
    """Multiply every update by `mask` (0 freezes an entry)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, mask), state

    return optax.GradientTransformation(init, update)


def with_mask(optimizer: optax.GradientTransformation, mask: PyTree | None) -> optax.GradientTransformation:
    return optimizer if mask is None else optax.chain(optimizer, masked_updates(mask))


def sgd_or_adam(learning_rate, adam) -> optax.GradientTransformation:
    """`optax.sgd(learning_rate)` where `adam` is False, `optax.adam(learning_rate)` where True; both may be
    traced, so lanes of one compiled program can audit both optimizers at several learning rates. The
    state is Adam's either way (SGD ignores it)."""
    scale = optax.scale_by_adam()

    def update(grads, state, params=None):
        direction, state = scale.update(grads, state, params)
        pick = lambda d, g: (-learning_rate * jnp.where(adam, d, g)).astype(g.dtype)  # noqa: E731
        return jax.tree.map(pick, direction, grads), state

    return optax.GradientTransformation(scale.init, update)


def update_step(loss_fn: Callable[[PyTree, Any], jax.Array], optimizer: optax.GradientTransformation,
                mask: PyTree | None = None):
    """Pure `step(params, opt_state, batch) -> (params, opt_state, loss)`; initialise the state with
    `with_mask(optimizer, mask).init(params)`."""
    opt = with_mask(optimizer, mask)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train_scan(loss_fn, optimizer, params: PyTree, batches: PyTree = None, *, steps: int | None = None,
               mask: PyTree | None = None):
    """Run the update step over `batches` (leading axis: steps; None: `steps` full-data steps, the loss
    ignores its batch) inside one `lax.scan`; returns (params, losses [steps])."""
    step = update_step(loss_fn, optimizer, mask)

    def body(carry, batch):
        params, opt_state, loss = step(*carry, batch)
        return (params, opt_state), loss

    (params, _), losses = jax.lax.scan(body, (params, with_mask(optimizer, mask).init(params)), batches,
                                      length=steps)
    return params, losses


def train_host(loss_fn, optimizer, params: PyTree, next_batch: Callable[[int], Any], steps: int, *,
               mask: PyTree | None = None, progress: Callable[[int, float], None] | None = None) -> PyTree:
    """The update step jitted once and called `steps` times on host-made batches (`next_batch(i)`);
    `progress(i, loss)` after each step (`loss` a device scalar: reading it waits for the step)."""
    step = jax.jit(update_step(loss_fn, optimizer, mask))
    opt_state = with_mask(optimizer, mask).init(params)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, next_batch(i))
        if progress is not None:
            progress(i, loss)
    return params


def finetune(lm, params, rows: np.ndarray, *, steps: int, batch: int = 32, learning_rate: float = 1e-3,
             rng: np.random.Generator, valid: np.ndarray | None = None, mask: PyTree | None = None,
             progress=None, optimizer: optax.GradientTransformation | None = None):
    """Adam (or `optimizer`) on the next-token loss of random batches of `rows` [N, L] (`valid` [N, L] marks real
    tokens; default all). With `mask`, only entries where it is 1 change. `progress(step, loss)` is called per
    step."""
    valid = np.ones(rows.shape, bool) if valid is None else valid

    def next_batch(_):
        idx = rng.integers(0, len(rows), batch)
        return rows[idx], valid[idx]

    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    return train_host(lambda p, b: lm_loss(lm.graphdef, p, *b), optimizer, params, next_batch,
                      steps, mask=mask, progress=progress)
