"""The audit's engine problems: simulated updates (lookahead) and the worst-case batch search.

A lookahead lane takes up to k steps of SGD or Adam (the shared `optim.update_step`) on its own batches,
holding its own copy of the parameters, and measures the behaviour after every step: the target's
teacher-forced log-probability, greedy success (the greedy output starts with the target; exact from
teacher-forced argmaxes), and drift (KL of next-token distributions on clean text, before || after).
Beside each real update it measures random directions of the same per-tensor norm (the "safety basin"
probe). A worst-case lane searches a relaxed batch (weights over a pool of update examples) and a
learning rate that maximise the target's log-probability after any audited number of steps, differentiating
through them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrisk.models.lm import forward, lm_loss, token_logprobs, weighted_mean
from jaxrisk.optim.update import sgd_or_adam, update_step

PyTree = Any


# ----------------------------------------------------------------------------- measures


def behaviour_scores(graphdef, params, tokens_bt, weight_bt):
    """(target log-prob [B], greedy success [B]) of prompt + target rows; success: every target token is the
    argmax given the prompt and the target so far, i.e. greedy decoding starts with the target."""
    logits, _, _ = forward(graphdef, params, tokens_bt[:, :-1])
    logp = token_logprobs(logits, tokens_bt[:, 1:])
    hit = (jnp.argmax(logits, -1) == tokens_bt[:, 1:]) | (weight_bt == 0)
    return jnp.sum(logp * weight_bt, -1), jnp.all(hit, -1)


def clean_logprobs(graphdef, params, tokens_bt):
    """Next-token log-distributions [B, T-1, V] on clean rows (the drift reference)."""
    logits, _, _ = forward(graphdef, params, tokens_bt[:, :-1])
    return jax.nn.log_softmax(logits, -1)


def drift(graphdef, params, tokens_bt, valid_bt, base_logp):
    """Mean KL(before || after) of the next-token distributions over the clean rows' valid positions."""
    logp = clean_logprobs(graphdef, params, tokens_bt)
    kl = jnp.sum(jnp.exp(base_logp) * (base_logp - logp), -1)
    return weighted_mean(kl, valid_bt[:, 1:].astype(kl.dtype))


def random_like(key, delta: PyTree) -> PyTree:
    """A random direction with the same norm as `delta` in every tensor (Gaussian, rescaled per tensor)."""
    leaves, tree = jax.tree.flatten(delta)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, d in zip(keys, leaves):
        r = jax.random.normal(k, d.shape, jnp.float32)
        scale = jnp.linalg.norm(d.astype(jnp.float32)) / jnp.maximum(jnp.linalg.norm(r), 1e-30)
        out.append((r * scale).astype(d.dtype))
    return jax.tree.unflatten(tree, out)


def tree_add(a: PyTree, b: PyTree, scale=1.0) -> PyTree:
    return jax.tree.map(lambda x, y: (x + scale * y).astype(x.dtype), a, b)


def global_norm(tree: PyTree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- lookahead


class LookaheadState(NamedTuple):
    params: PyTree            # the lane's updated parameters (the model's tree and shapes)
    opt_state: PyTree         # Adam's moments and count (SGD lanes carry and ignore them)
    step: jax.Array           # [] int32 updates taken
    learning_rate: jax.Array  # [] float32
    adam: jax.Array           # [] bool: Adam, else SGD
    batches: jax.Array        # [k, batch] int32 update rows of each step
    direction_key: jax.Array  # [2] uint32: the lane's random directions (fixed; only their norms follow the update)


@struct.dataclass
class Lookahead:
    """Lanes: {"learning_rate": [R], "adam": [R] bool, "batches": [R, k, batch] int32, "direction_key": [R, 2]
    uint32 (the lane's random directions: raw key data, fixed by the lane, not by how lanes are grouped)}."""
    params: PyTree                 # the model before any update
    update_tokens: jax.Array       # [N, L]
    update_loss_mask: jax.Array    # [N, L]
    behaviour_tokens: jax.Array    # [B, T]
    behaviour_weight: jax.Array    # [B, T-1]
    clean_tokens: jax.Array        # [C, S]
    clean_valid: jax.Array         # [C, S]
    base_clean_logp: jax.Array     # [C, S-1, V] the model's next-token log-distributions before the update
    graphdef: Any = struct.field(pytree_node=False)
    random_directions: int = struct.field(pytree_node=False, default=4)

    def update_loss(self, params, rows_b):
        return lm_loss(self.graphdef, params, self.update_tokens[rows_b], self.update_loss_mask[rows_b])

    def measure(self, params) -> dict[str, jax.Array]:
        logp, success = behaviour_scores(self.graphdef, params, self.behaviour_tokens, self.behaviour_weight)
        kl = drift(self.graphdef, params, self.clean_tokens, self.clean_valid, self.base_clean_logp)
        return {"target_logprob": jnp.mean(logp), "success": jnp.mean(success.astype(jnp.float32)), "kl": kl}

    def init(self, key, lane) -> LookaheadState:
        del key
        return LookaheadState(params=self.params, opt_state=sgd_or_adam(0.0, False).init(self.params),
                              step=jnp.zeros((), jnp.int32),
                              learning_rate=jnp.asarray(lane["learning_rate"], jnp.float32),
                              adam=jnp.asarray(lane["adam"], bool), batches=jnp.asarray(lane["batches"], jnp.int32),
                              direction_key=jnp.asarray(lane["direction_key"], jnp.uint32))

    def step(self, state: LookaheadState, key):
        del key   # a lane's batches and directions are fixed by its lane input and init key
        step = update_step(self.update_loss, sgd_or_adam(state.learning_rate, state.adam))
        params, opt_state, loss = step(state.params, state.opt_state, state.batches[state.step])
        metrics = {"loss": loss, **self.measure(params)}
        delta = jax.tree.map(lambda a, b: a - b, params, self.params)
        metrics["update_norm"] = global_norm(delta)
        if self.random_directions:
            base_key = jax.random.wrap_key_data(state.direction_key)
            keys = jax.random.split(base_key, self.random_directions)
            rand = jax.lax.map(lambda k: self.measure(tree_add(self.params, random_like(k, delta))), keys)
            for name, values in rand.items():
                metrics[f"random_{name}_mean"] = jnp.mean(values)
                metrics[f"random_{name}_max"] = jnp.max(values)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    def done(self, state: LookaheadState):
        return state.step >= state.batches.shape[0]


# ----------------------------------------------------------------------------- worst case


def project_capped_simplex(w: jax.Array, total: float) -> jax.Array:
    """Euclidean projection of `w` onto {0 <= w <= 1, sum(w) = total} (bisection on the shift)."""
    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        over = jnp.sum(jnp.clip(w - mid, 0.0, 1.0)) > total
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 50, body, (jnp.min(w) - 1.0, jnp.max(w)))
    return jnp.clip(w - (lo + hi) / 2, 0.0, 1.0)


def _sqrt(v: jax.Array) -> jax.Array:
    """sqrt with a zero gradient where v is 0 (plain sqrt's is infinite there, and an Adam step differentiated
    through a parameter whose gradient is exactly 0, or through the unused Adam branch of an SGD lane, would
    turn the search's gradient into NaN)."""
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, v, 1.0)), 0.0)


class WorstCaseState(NamedTuple):
    weights: jax.Array      # [P] relaxed batch membership of each pool example, in [0, 1], summing to the batch size
    position: jax.Array     # [] float32 in [0, 1]: the learning rate's place between the range's ends (log scale)
    opt_state: PyTree       # the search's own Adam state over (weights, position)
    adam: jax.Array         # [] bool: the audited optimizer is Adam, else SGD
    objective: jax.Array    # [] float32 mean target log-prob after the relaxed update, before the last step


@struct.dataclass
class WorstCase:
    """Lanes: {"adam": [R] bool}; init draws random starting weights and learning rate."""
    params: PyTree
    pool_tokens: jax.Array        # [P, L]
    pool_loss_mask: jax.Array     # [P, L]
    behaviour_tokens: jax.Array   # [B, T]
    behaviour_weight: jax.Array   # [B, T-1]
    lr_range: jax.Array           # [2, 2] float32 (low, high) learning rate per optimizer (row 0 SGD, row 1 Adam)
    graphdef: Any = struct.field(pytree_node=False)
    batch: int = struct.field(pytree_node=False, default=32)
    measure_steps: tuple[int, ...] = struct.field(pytree_node=False, default=(1,))   # the audited step counts
    search_rate: float = struct.field(pytree_node=False, default=0.05)
    relax: float = struct.field(pytree_node=False, default=0.1)

    def learning_rate(self, position, adam):
        low, high = self.lr_range[adam.astype(jnp.int32)]
        return jnp.exp(jnp.log(low) + jnp.clip(position, 0.0, 1.0) * (jnp.log(high) - jnp.log(low)))

    def weighted_loss(self, params, weights):
        """The batch loss with example i counted weights[i] times (equal to the real batch loss when the weights
        are 0 / 1): summed token losses over summed token counts."""
        logits, _, _ = forward(self.graphdef, params, self.pool_tokens[:, :-1])
        per_token = -token_logprobs(logits, self.pool_tokens[:, 1:]) * self.pool_loss_mask[:, 1:]
        return jnp.sum(weights * per_token.sum(-1)) / jnp.maximum(
            jnp.sum(weights * self.pool_loss_mask[:, 1:].sum(-1)), 1.0)

    def objective(self, weights, position, adam):
        """The mean target log-prob after the relaxed update, at the audited step count where it is highest
        (`measure_steps`): the search looks for the worst update at any of them. SGD steps are exact; Adam's
        use eps = relax x rms(gradient)."""
        lr = self.learning_rate(position, adam)
        b1, b2 = 0.9, 0.999

        def one_step(carry, t):
            params, mu, nu = carry
            grads = jax.grad(self.weighted_loss)(params, weights)
            mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
            nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
            m_hat = jax.tree.map(lambda m: m / (1 - b1 ** t), mu)
            v_hat = jax.tree.map(lambda v: v / (1 - b2 ** t), nu)
            rms = _sqrt(sum(jnp.sum(v) for v in jax.tree.leaves(v_hat)) /
                        sum(v.size for v in jax.tree.leaves(v_hat)))
            eps = self.relax * rms + 1e-8
            params = jax.tree.map(lambda p, g, m, v: p - lr * jnp.where(adam, m / (_sqrt(v) + eps), g),
                                  params, grads, m_hat, v_hat)
            logp, _ = behaviour_scores(self.graphdef, params, self.behaviour_tokens, self.behaviour_weight)
            return (params, mu, nu), jnp.mean(logp)

        zeros = jax.tree.map(jnp.zeros_like, self.params)
        steps = jnp.arange(1, max(self.measure_steps) + 1, dtype=jnp.float32)
        _, logp_per_step = jax.lax.scan(one_step, (self.params, zeros, zeros), steps)
        return jnp.max(logp_per_step[jnp.asarray(self.measure_steps) - 1])

    def _search(self):
        return optax.adam(self.search_rate)

    def init(self, key, lane) -> WorstCaseState:
        k1, k2 = jax.random.split(key)
        pool = self.pool_tokens.shape[0]
        weights = project_capped_simplex(jax.random.uniform(k1, (pool,)) * 2 * self.batch / pool, self.batch)
        position = jax.random.uniform(k2, ())
        adam = jnp.asarray(lane["adam"], bool)
        return WorstCaseState(weights, position, self._search().init((weights, position)), adam,
                              jnp.asarray(-jnp.inf, jnp.float32))

    def step(self, state: WorstCaseState, key):
        del key
        value, grads = jax.value_and_grad(self.objective, argnums=(0, 1))(state.weights, state.position, state.adam)
        ascent = jax.tree.map(jnp.negative, grads)
        updates, opt_state = self._search().update(ascent, state.opt_state)
        weights, position = optax.apply_updates((state.weights, state.position), updates)
        weights = project_capped_simplex(weights, self.batch)
        position = jnp.clip(position, 0.0, 1.0)
        return (WorstCaseState(weights, position, opt_state, state.adam, value),
                {"objective": value, "learning_rate": self.learning_rate(position, state.adam)})

    def done(self, state: WorstCaseState):
        return jnp.zeros((), bool)
