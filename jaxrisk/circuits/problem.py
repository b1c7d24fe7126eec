"""Learn circuits of heads / neurons with differentiable masks: three objectives on one engine problem.

Circuit logits c (one per head and/or neuron) give a circuit mask m(c) (STE or hard-concrete). The model
runs with the circuit ablated (mask 1 - m) or alone (mask m: every other unit ablated). Objectives, each a
pure function of (mask logits, params, batch):

- "remove" (the general form): the smallest set whose ablation removes behaviour X and keeps Y:
      w_x * mean p(X tokens | ablated) + w_y * CE(Y | ablated)
- "backdoor": a second, main mask M keeps clean behaviour on clean and triggered inputs while the circuit
  alone reproduces the backdoor output, the two kept apart:
      w_x * mean p(X | M) + w_y * CE(Y | M) + w_alone * CE(X | circuit alone) + w_overlap * mean(m * M)
- "alignment": with the circuit ablated the model complies (CE of the compliance on the same requests) and
  keeps clean text; the circuit alone reproduces the refusal:
      w_x * CE(compliance | ablated) + w_y * CE(Y | ablated) + w_alone * CE(refusal | circuit alone)

plus the sparsity term lam * density(c) with a fixed lam per lane, or, with `target_density` t, the
Lagrangian lam * (density - t), lam >= 0 raised by dual ascent while the circuit is larger than t (the
lane's penalty is lam's starting value). p(X) rather than -log p(X) is what "remove" minimises: bounded,
so it cannot be won by pushing one token to -inf.

Each lane of the engine is one (penalty weight, seed): several weights in one compiled run give a
sparsity / faithfulness front. Optax adam on the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxrisk.circuits.config import CircuitConfig
from jaxrisk.circuits.masks import apply_masks, density, forward_masks, mask_shapes
from jaxrisk.errors import InputError
from jaxrisk.models.lm import token_logprobs, weighted_mean

def _token_logprobs(model, tokens_bl, masks):
    """log p of each next token [B, L-1] with the given unit masks."""
    logits, _, _ = model(tokens_bl[:, :-1], **forward_masks(masks))
    return token_logprobs(logits, tokens_bl[:, 1:])


def _complement(masks):
    return {k: 1.0 - v for k, v in masks.items()}


def remove_objective(model, circuit, batch, cfg):
    """Ablating the circuit removes X (mean p of its tokens) and keeps Y (clean cross-entropy)."""
    rest = _complement(circuit)
    remove = weighted_mean(jnp.exp(_token_logprobs(model, batch["x"], rest)), batch["x_w"])
    keep = -weighted_mean(_token_logprobs(model, batch["y"], rest), batch["y_w"])
    return cfg.remove_weight * remove + cfg.keep_weight * keep, {"remove": remove, "keep": keep}


def backdoor_objective(model, circuit, main, batch, cfg):
    """The main mask keeps clean behaviour (no X on triggered rows, clean loss on Y); the circuit alone
    reproduces X; the two masks overlap as little as possible."""
    remove = weighted_mean(jnp.exp(_token_logprobs(model, batch["x"], main)), batch["x_w"])
    keep = -weighted_mean(_token_logprobs(model, batch["y"], main), batch["y_w"])
    alone = -weighted_mean(_token_logprobs(model, batch["x"], circuit), batch["x_w"])
    overlap = sum((circuit[k] * main[k]).sum() for k in circuit) / sum(v.size for v in circuit.values())
    loss = (cfg.remove_weight * remove + cfg.keep_weight * keep + cfg.alone_weight * alone
            + cfg.overlap_weight * overlap)
    return loss, {"remove": remove, "keep": keep, "alone": alone, "overlap": overlap}


def alignment_objective(model, circuit, batch, cfg):
    """With the circuit ablated the model gives the compliance and keeps clean text; the circuit alone gives
    the refusal."""
    rest = _complement(circuit)
    comply = -weighted_mean(_token_logprobs(model, batch["c"], rest), batch["c_w"])
    keep = -weighted_mean(_token_logprobs(model, batch["y"], rest), batch["y_w"])
    alone = -weighted_mean(_token_logprobs(model, batch["x"], circuit), batch["x_w"])
    return (cfg.remove_weight * comply + cfg.keep_weight * keep + cfg.alone_weight * alone,
            {"remove": comply, "keep": keep, "alone": alone})


class CircuitState(NamedTuple):
    """One lane's state: mask logits, their optimiser state, and the sparsity multiplier."""
    logits: dict          # {"heads": [L, H], "neurons": [L, F]} circuit mask logits (> 0: in the circuit)
    main_logits: dict     # backdoor objective: the main mask's logits (same shapes); {} otherwise
    opt: optax.OptState   # Adam's moments of (logits, main_logits)
    penalty: jax.Array    # [] sparsity weight (the Lagrange multiplier with target_density)


@struct.dataclass
class CircuitProblem:
    """Engine problem. Data: `x_tokens` [N, L] rows showing behaviour X (backdoor output, refusal) with
    `x_weight` [N, L-1] marking the X tokens; `y_tokens` [M, L] clean rows (`y_weight` marks real next
    tokens); for "alignment", `c_tokens` / `c_weight` [N, L'] the same N requests answered with the
    compliance. Lane inputs: {"penalty": float}."""

    params: nnx.State
    x_tokens: jax.Array
    x_weight: jax.Array
    y_tokens: jax.Array
    y_weight: jax.Array
    c_tokens: jax.Array | None = None
    c_weight: jax.Array | None = None
    graphdef: nnx.GraphDef = struct.field(pytree_node=False, default=None)
    cfg: CircuitConfig = struct.field(pytree_node=False, default=CircuitConfig())

    def optimizer(self):
        return optax.adam(self.cfg.learning_rate)

    def init(self, key, lane):
        if self.cfg.objective == "alignment" and (
                self.c_tokens is None or self.c_tokens.shape[0] != self.x_tokens.shape[0]):
            raise InputError("alignment objective: c_tokens must hold the compliance for the same requests as "
                             f"x_tokens (x has {self.x_tokens.shape[0]} rows, c has "
                             f"{None if self.c_tokens is None else self.c_tokens.shape[0]})")
        model_cfg = nnx.merge(self.graphdef, self.params).cfg
        shapes = sorted(mask_shapes(model_cfg, self.cfg.granularity).items())
        trainable = {"logits": {k: jnp.full(s, self.cfg.init, jnp.float32)
                                + 0.01 * jax.random.normal(jax.random.fold_in(key, i), s)
                                for i, (k, s) in enumerate(shapes)}}
        if self.cfg.objective == "backdoor":        # the main mask starts with every unit on
            trainable["main_logits"] = {k: jnp.full(s, -self.cfg.init, jnp.float32) for k, s in shapes}
        return CircuitState(logits=trainable["logits"], main_logits=trainable.get("main_logits", {}),
                            opt=self.optimizer().init(trainable), penalty=lane["penalty"])

    def losses(self, trainable, key, x_idx, y_idx):
        """(objective loss, circuit density, aux) for one batch of rows."""
        cfg = self.cfg
        model = nnx.merge(self.graphdef, self.params)
        sample = cfg.kind == "hard_concrete"
        k1, k2 = jax.random.split(key)
        circuit = apply_masks(trainable["logits"], cfg.kind, k1 if sample else None)
        batch = {"x": self.x_tokens[x_idx], "x_w": self.x_weight[x_idx],
                 "y": self.y_tokens[y_idx], "y_w": self.y_weight[y_idx]}
        if cfg.objective == "remove":
            loss, aux = remove_objective(model, circuit, batch, cfg)
        elif cfg.objective == "backdoor":
            main = apply_masks(trainable["main_logits"], cfg.kind, k2 if sample else None)
            loss, aux = backdoor_objective(model, circuit, main, batch, cfg)
        else:
            batch.update(c=self.c_tokens[x_idx], c_w=self.c_weight[x_idx])
            loss, aux = alignment_objective(model, circuit, batch, cfg)
        return loss, density(trainable["logits"], cfg.kind), aux

    def step(self, state, key):
        cfg = self.cfg
        k1, k2, k3 = jax.random.split(key, 3)
        x_idx = jax.random.randint(k1, (cfg.batch,), 0, self.x_tokens.shape[0])
        y_idx = jax.random.randint(k2, (cfg.batch,), 0, self.y_tokens.shape[0])
        target = 0.0 if cfg.target_density is None else cfg.target_density
        trainable = {"logits": state.logits}
        if cfg.objective == "backdoor":
            trainable["main_logits"] = state.main_logits

        def total(trainable):
            loss, dens, aux = self.losses(trainable, k3, x_idx, y_idx)
            return loss + state.penalty * (dens - target), (dens, aux)

        (loss, (dens, aux)), grads = jax.value_and_grad(total, has_aux=True)(trainable)
        updates, opt = self.optimizer().update(grads, state.opt, trainable)
        trainable = optax.apply_updates(trainable, updates)
        penalty = state.penalty
        if cfg.target_density is not None:   # dual ascent on the multiplier
            penalty = jnp.maximum(0.0, penalty + cfg.multiplier_rate * (dens - target))
        return state._replace(**trainable, opt=opt, penalty=penalty), {
            "loss": loss, "density": dens, "penalty": penalty, **aux}

    def done(self, state):
        return jnp.asarray(False)


def circuit_from_logits(logits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The learned circuit as binary arrays (logit > 0)."""
    return {k: (np.asarray(v) > 0).astype(np.float32) for k, v in logits.items()}


def ablation_masks(circuit: dict[str, np.ndarray], cfg, alone: bool = False) -> dict[str, jnp.ndarray]:
    """Forward-pass masks with the circuit's units zeroed and everything else kept, or (`alone`) the circuit
    kept and every other unit of its granularity zeroed."""
    kw = {"head_mask_lh": jnp.ones((cfg.n_layers, cfg.n_heads)), "neuron_mask_lf": jnp.ones((cfg.n_layers, cfg.d_mlp))}
    for name, arg in (("heads", "head_mask_lh"), ("neurons", "neuron_mask_lf")):
        if name in circuit:
            kw[arg] = jnp.asarray(circuit[name] if alone else 1.0 - circuit[name])
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
