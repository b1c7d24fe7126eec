"""Learn the smallest set of heads / neurons whose ablation removes behaviour X while preserving Y.

Circuit logits c (one per head and/or neuron) give a circuit mask m(c); the
model runs with the complement 1 - m(c) (the circuit ablated). Loss:

    w_x * mean p(X tokens | X context, ablated)      # remove X (bounded, unlike log p)
  + w_y * CE(Y text | ablated)                       # keep Y
  + lam * density(c)                                 # small circuit (fixed weight per lane)

or, with `target_density` t, the Lagrangian form: lam * (density - t) with lam >= 0 raised by gradient
ascent while the circuit is larger than t (the lane's penalty is lam's starting value).

Each lane of the engine is one (penalty weight, seed): several weights in one
compiled run give a sparsity / faithfulness front. Optax adam on the logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxrisk.circuits.masks import apply_masks, density, forward_masks, mask_shapes


@dataclasses.dataclass(frozen=True, kw_only=True)
class CircuitConfig:
    granularity: str = "both"       # heads | neurons | both
    kind: str = "ste"               # ste | hard_concrete
    init: float = -2.0              # start with (almost) nothing in the circuit
    learning_rate: float = 0.1
    remove_weight: float = 1.0
    keep_weight: float = 1.0
    batch: int = 16
    target_density: float | None = None   # Lagrangian form: the penalty becomes a multiplier driven to hit it
    multiplier_rate: float = 1.0


def _seq_logprobs(model, tokens_bl, masks):
    logits, _, _ = model(tokens_bl[:, :-1], **forward_masks(masks))
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens_bl[:, 1:, None], -1)[..., 0]  # [B, L-1]


@struct.dataclass
class CircuitProblem:
    """Engine problem. Data: `x_tokens` [N, L] rows showing behaviour X with `x_weight` [N, L-1] marking the
    X tokens to suppress; `y_tokens` [M, L] clean rows (`y_weight` marks real next tokens). Lane inputs: {"penalty": float}."""

    params: nnx.State
    x_tokens: jax.Array
    x_weight: jax.Array
    y_tokens: jax.Array
    y_weight: jax.Array              # [M, L-1] 1 where the next token is real text (0 on padding)
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    cfg: CircuitConfig = struct.field(pytree_node=False, default=CircuitConfig())

    def optimizer(self):
        return optax.adam(self.cfg.learning_rate)

    def init(self, key, lane):
        model_cfg = nnx.merge(self.graphdef, self.params).cfg
        logits = {k: jnp.full(s, self.cfg.init, jnp.float32) + 0.01 * jax.random.normal(jax.random.fold_in(key, i), s)
                  for i, (k, s) in enumerate(sorted(mask_shapes(model_cfg, self.cfg.granularity).items()))}
        return {"logits": logits, "opt": self.optimizer().init(logits), "penalty": lane["penalty"]}

    def losses(self, logits, key, x_idx, y_idx):
        model = nnx.merge(self.graphdef, self.params)
        circuit = apply_masks(logits, self.cfg.kind, key if self.cfg.kind == "hard_concrete" else None)
        ablate = {k: 1.0 - v for k, v in circuit.items()}
        x_lp = _seq_logprobs(model, self.x_tokens[x_idx], ablate)
        w = self.x_weight[x_idx]
        remove = jnp.sum(jnp.exp(x_lp) * w) / jnp.maximum(w.sum(), 1.0)
        yw = self.y_weight[y_idx]
        keep = -jnp.sum(_seq_logprobs(model, self.y_tokens[y_idx], ablate) * yw) / jnp.maximum(yw.sum(), 1.0)
        return remove, keep, density(logits, self.cfg.kind)

    def step(self, state, key):
        cfg = self.cfg
        k1, k2, k3 = jax.random.split(key, 3)
        x_idx = jax.random.randint(k1, (cfg.batch,), 0, self.x_tokens.shape[0])
        y_idx = jax.random.randint(k2, (cfg.batch,), 0, self.y_tokens.shape[0])

        target = 0.0 if cfg.target_density is None else cfg.target_density

        def total(logits):
            remove, keep, dens = self.losses(logits, k3, x_idx, y_idx)
            sparse = state["penalty"] * (dens - target)
            return cfg.remove_weight * remove + cfg.keep_weight * keep + sparse, (remove, keep, dens)

        (loss, (remove, keep, dens)), grads = jax.value_and_grad(total, has_aux=True)(state["logits"])
        updates, opt = self.optimizer().update(grads, state["opt"], state["logits"])
        logits = optax.apply_updates(state["logits"], updates)
        penalty = state["penalty"]
        if cfg.target_density is not None:   # dual ascent on the multiplier
            penalty = jnp.maximum(0.0, penalty + cfg.multiplier_rate * (dens - target))
        return dict(state, logits=logits, opt=opt, penalty=penalty), {
            "loss": loss, "remove": remove, "keep": keep, "density": dens, "penalty": penalty}

    def done(self, state):
        return jnp.asarray(False)


def circuit_from_logits(logits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The learned circuit as binary arrays (logit > 0)."""
    return {k: (np.asarray(v) > 0).astype(np.float32) for k, v in logits.items()}


def ablation_masks(circuit: dict[str, np.ndarray], cfg) -> dict[str, jnp.ndarray]:
    """Forward-pass masks with the circuit's units zeroed (and everything else kept)."""
    kw = {"head_mask_lh": jnp.ones((cfg.n_layers, cfg.n_heads)), "neuron_mask_lf": jnp.ones((cfg.n_layers, cfg.d_mlp))}
    if "heads" in circuit:
        kw["head_mask_lh"] = jnp.asarray(1.0 - circuit["heads"])
    if "neurons" in circuit:
        kw["neuron_mask_lf"] = jnp.asarray(1.0 - circuit["neurons"])
    return kw


def sparsity(circuit: dict[str, np.ndarray], cfg) -> dict[str, float]:
    """Share of heads, neurons, units and parameters in the circuit."""
    heads = float(circuit["heads"].sum()) if "heads" in circuit else 0.0
    neurons = float(circuit["neurons"].sum()) if "neurons" in circuit else 0.0
    n_heads, n_neurons = cfg.n_layers * cfg.n_heads, cfg.n_layers * cfg.d_mlp
    per_head = cfg.head_dim * cfg.d_model * 2 + cfg.head_dim * cfg.d_model * 2 / (cfg.n_heads // cfg.n_kv_heads)
    per_neuron = cfg.d_model * (2 if cfg.is_gpt2 else 3)
    return {"heads": heads / n_heads, "neurons": neurons / n_neurons,
            "units": (heads + neurons) / (n_heads + n_neurons),
            "parameters": (heads * per_head + neurons * per_neuron) / cfg.n_params(),
            "n_heads": int(heads), "n_neurons": int(neurons)}
