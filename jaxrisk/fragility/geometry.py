"""The cheap screens: update vs misalignment gradients, and the Taylor prediction of one update step.

For f = mean target log-probability of the behaviour set and u = the first real update of a lane
(SGD: -lr g_update; Adam: -lr g / (|g| + eps)):

    f(theta + u) - f(theta) ~ <grad f, u>  +  1/2 u^T H_f u

the first-order term and the second-order term (a Hessian-vector product, forward over reverse), checked
in the report against the simulated step. The per-layer cosine between the update gradient and the
misalignment gradient (-grad f) says where an update pushes toward the behaviour (> 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxrisk.fragility.problem import Lookahead, behaviour_scores
from jaxrisk.optim.update import sgd_or_adam


def layer_names(params) -> list[str]:
    """One name per parameter tensor, grouping by block (`blocks.3`) or top-level module (`embed`)."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]
        names.append(f"{keys[0]}.{keys[1]}" if len(keys) > 1 and isinstance(keys[1], int) else str(keys[0]))
    return names


def _dots(a, b, groups: list[int], n_groups: int) -> jax.Array:
    """Per-group inner products <a_G, b_G> [n_groups] (groups: the group of each leaf)."""
    out = jnp.zeros(n_groups, jnp.float32)
    for g, x, y in zip(groups, jax.tree.leaves(a), jax.tree.leaves(b)):
        out = out.at[g].add(jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)))
    return out


@struct.dataclass
class Screens:
    first_order: jax.Array    # [R] <grad f, u>
    second_order: jax.Array   # [R] 1/2 u^T H_f u
    cosine: jax.Array         # [R] cos(g_update, g_misalign) over all parameters
    layer_cosine: jax.Array   # [R, G] the same per layer group
    layers: tuple = struct.field(pytree_node=False, default=())


def screens(problem: Lookahead, lanes: dict) -> Screens:
    """The screens for every lane's first step (lanes as for `Lookahead`: learning_rate, adam, batches)."""
    names = layer_names(problem.params)
    layers = tuple(dict.fromkeys(names))
    groups = [layers.index(n) for n in names]

    @jax.jit
    def compute(problem, lanes):
        def f(params):
            logp, _ = behaviour_scores(problem.graphdef, params, problem.behaviour_tokens, problem.behaviour_weight)
            return jnp.mean(logp)

        grad_f = jax.grad(f)(problem.params)
        f_dot_f = _dots(grad_f, grad_f, groups, len(layers))

        def one(lane):
            g_update = jax.grad(problem.update_loss)(problem.params, lane["batches"][0])
            opt = sgd_or_adam(lane["learning_rate"], lane["adam"])
            u, _ = opt.update(g_update, opt.init(problem.params), problem.params)
            first = jnp.sum(_dots(grad_f, u, groups, len(layers)))
            h_u = jax.jvp(jax.grad(f), (problem.params,), (u,))[1]
            second = 0.5 * jnp.sum(_dots(u, h_u, groups, len(layers)))
            # misalignment gradient = -grad f: cos(g_update, -grad f)
            cross = -_dots(g_update, grad_f, groups, len(layers))
            u_dot_u = _dots(g_update, g_update, groups, len(layers))
            cos_layer = cross / jnp.maximum(jnp.sqrt(u_dot_u * f_dot_f), 1e-30)
            cos = jnp.sum(cross) / jnp.maximum(jnp.sqrt(jnp.sum(u_dot_u) * jnp.sum(f_dot_f)), 1e-30)
            return first, second, cos, cos_layer

        return jax.lax.map(one, lanes)

    first, second, cos, cos_layer = compute(problem, jax.tree.map(jnp.asarray, lanes))
    return Screens(first, second, cos, cos_layer, layers)
