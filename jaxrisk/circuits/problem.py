"""Learn circuits of heads / neurons with differentiable masks: three objectives on one engine problem.

Circuit logits c (one per head and/or neuron) give a circuit mask m(c) (STE or hard-concrete). The model
runs with the circuit ablated (mask 1 - m) or alone (mask m: every other unit ablated); an ablated unit is
zeroed or (`ablation="mean"`) set to its mean activation on clean text. Objectives, each a pure function of
(mask logits, params, batch):

- "remove" (the general form): the smallest set whose ablation removes behaviour X and keeps Y:
      w_x * Left(X | ablated) + w_y * Keep(ablated)
- "backdoor": a second, main mask M keeps clean behaviour on clean and triggered inputs while the circuit
  alone reproduces the backdoor output, the two kept apart:
      w_x * Left(X | M) + w_y * Keep(M) + w_alone * CE(X | circuit alone) + w_overlap * mean(m * M)
- "alignment": with the circuit ablated the model complies (CE of the compliance on the same requests) and
  keeps clean text; the circuit alone reproduces the refusal:
      w_x * CE(compliance | ablated) + w_y * Keep(ablated) + w_alone * CE(refusal | circuit alone)

Left(X) is the unlikelihood -log(1 - p) of X's first token (`remove_loss="onset"`), or the mean probability of
all its tokens (`"probability"`), see `removal_loss`. Keep is either the cross-entropy of the clean rows Y
(`keep="ce"`: the data's own next tokens), or the KL divergence from the intact model's next-token
distributions (`keep="kl"`: faithfulness to the model, not to the data) on the clean rows and on the prompt
positions of the behaviour rows (the trigger is there, the behaviour is not yet); KL is zero exactly when the
masked model predicts what the intact one does.

plus the sparsity term lam * density(c) with a fixed lam per lane, or, with `target_density` t, the
Lagrangian lam * (density - t), lam >= 0 raised by dual ascent while the circuit is larger than t (the
lane's penalty is lam's starting value).

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


def _next_logits(model, tokens_bl, masks, means=None):
    """Next-token logits [B, L-1, V] with the given unit masks (mean-ablated where `means` is given)."""
    return model(tokens_bl[:, :-1], **forward_masks(masks, means))[0]


def _complement(masks):
    return {k: 1.0 - v for k, v in masks.items()}


def next_token_kl(intact_btv, changed_btv) -> jax.Array:
    """KL(intact || changed) of the next-token distributions at every position [B, T]."""
    log_p = jax.nn.log_softmax(intact_btv, -1)
    return jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(changed_btv, -1)), -1)


def keep_term(model, masks, batch, cfg, means=None, x_logits=None):
    """How far the masked model is from keeping clean behaviour: CE of the clean rows, or the mean KL from the
    intact model over the clean rows' positions and the behaviour rows' prompt positions (`x_keep_w`).
    `x_logits`: the masked model's logits of the behaviour rows when the caller already has them."""
    y_logits = _next_logits(model, batch["y"], masks, means)
    if cfg.keep == "ce":
        return -weighted_mean(token_logprobs(y_logits, batch["y"][:, 1:]), batch["y_w"])
    intact = lambda tokens: jax.lax.stop_gradient(_next_logits(model, tokens, {}))  # noqa: E731
    total = jnp.sum(next_token_kl(intact(batch["y"]), y_logits) * batch["y_w"])
    count = jnp.sum(batch["y_w"])
    if "x_keep_w" in batch:
        x_logits = _next_logits(model, batch["x"], masks, means) if x_logits is None else x_logits
        total += jnp.sum(next_token_kl(intact(batch["x"]), x_logits) * batch["x_keep_w"])
        count += jnp.sum(batch["x_keep_w"])
    return total / jnp.maximum(count, 1.0)


def _logprobs(logits, tokens_bl):
    return token_logprobs(logits, tokens_bl[:, 1:])


def removal_loss(logprobs, weight, cfg):
    """How much of X is left. `remove_loss="probability"`: the mean probability of its tokens (bounded, but its
    gradient vanishes while p(X) ~ 1). `"onset"`: the unlikelihood -log(1 - p) (Welleck et al. 2020) of X's first
    token only: a gradient as large as -log p's while X is certain, ~p once it is gone (so it cannot be won by
    pushing a token to -inf), and no pressure on the later tokens, which the context alone may predict once
    the first is given (a repeated marker is copied by induction heads every story needs)."""
    if cfg.remove_loss == "probability":
        return weighted_mean(jnp.exp(logprobs), weight)
    first = weight * (jnp.cumsum(weight > 0, axis=1) == 1)
    x = jnp.minimum(logprobs, -1e-6)                   # log(1 - e^x), stable on both sides of x = -log 2
    log_rest = jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
    return weighted_mean(-log_rest, first)


def remove_objective(model, circuit, batch, cfg, means=None):
    """Ablating the circuit removes X (`removal_loss`) and keeps clean behaviour (`keep_term`)."""
    rest = _complement(circuit)
    x_logits = _next_logits(model, batch["x"], rest, means)
    remove = removal_loss(_logprobs(x_logits, batch["x"]), batch["x_w"], cfg)
    keep = keep_term(model, rest, batch, cfg, means, x_logits)
    return cfg.remove_weight * remove + cfg.keep_weight * keep, {"remove": remove, "keep": keep}


def backdoor_objective(model, circuit, main, batch, cfg, means=None):
    """The main mask keeps clean behaviour (no X on triggered rows, `keep_term`); the circuit alone
    reproduces X; the two masks overlap as little as possible."""
    x_logits = _next_logits(model, batch["x"], main, means)
    remove = removal_loss(_logprobs(x_logits, batch["x"]), batch["x_w"], cfg)
    keep = keep_term(model, main, batch, cfg, means, x_logits)
    alone = -weighted_mean(_logprobs(_next_logits(model, batch["x"], circuit, means), batch["x"]), batch["x_w"])
    overlap = sum((circuit[k] * main[k]).sum() for k in circuit) / sum(v.size for v in circuit.values())
    loss = (cfg.remove_weight * remove + cfg.keep_weight * keep + cfg.alone_weight * alone
            + cfg.overlap_weight * overlap)
    return loss, {"remove": remove, "keep": keep, "alone": alone, "overlap": overlap}


def alignment_objective(model, circuit, batch, cfg, means=None):
    """With the circuit ablated the model gives the compliance and keeps clean behaviour; the circuit alone
    gives the refusal."""
    rest = _complement(circuit)
    comply = -weighted_mean(_logprobs(_next_logits(model, batch["c"], rest, means), batch["c"]), batch["c_w"])
    keep = keep_term(model, rest, batch, cfg, means)
    alone = -weighted_mean(_logprobs(_next_logits(model, batch["x"], circuit, means), batch["x"]), batch["x_w"])
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
    compliance. Optional: `x_keep_weight` [N, L-1] marks the prompt positions of the X rows (`keep="kl"` keeps
    the intact model's predictions there too); `means` (from `masks.unit_means` on clean text) is what an
    ablated unit becomes with `ablation="mean"`. Lane inputs: {"penalty": float}."""

    params: nnx.State
    x_tokens: jax.Array
    x_weight: jax.Array
    y_tokens: jax.Array
    y_weight: jax.Array
    c_tokens: jax.Array | None = None
    c_weight: jax.Array | None = None
    x_keep_weight: jax.Array | None = None
    means: dict | None = None
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
        if self.cfg.ablation == "mean" and self.means is None:
            raise InputError("CircuitConfig(ablation='mean') needs CircuitProblem.means: the mean activation of "
                             "every unit on clean text (jaxrisk.circuits.masks.unit_means)")
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
        if self.x_keep_weight is not None:
            batch["x_keep_w"] = self.x_keep_weight[x_idx]
        means = self.means if cfg.ablation == "mean" else None
        if cfg.objective == "remove":
            loss, aux = remove_objective(model, circuit, batch, cfg, means)
        elif cfg.objective == "backdoor":
            main = apply_masks(trainable["main_logits"], cfg.kind, k2 if sample else None)
            loss, aux = backdoor_objective(model, circuit, main, batch, cfg, means)
        else:
            batch.update(c=self.c_tokens[x_idx], c_w=self.c_weight[x_idx])
            loss, aux = alignment_objective(model, circuit, batch, cfg, means)
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


def ablation_masks(circuit: dict[str, np.ndarray], cfg, alone: bool = False, means: dict | None = None) -> dict:
    """Forward-pass masks with the circuit's units ablated and everything else kept, or (`alone`) the circuit
    kept and every other unit of its granularity ablated; zero ablation, or mean ablation given `means` (from
    `masks.unit_means`)."""
    kw = {"head_mask_lh": jnp.ones((cfg.n_layers, cfg.n_heads)), "neuron_mask_lf": jnp.ones((cfg.n_layers, cfg.d_mlp))}
    for name, arg in (("heads", "head_mask_lh"), ("neurons", "neuron_mask_lf")):
        if name in circuit:
            kw[arg] = jnp.asarray(circuit[name] if alone else 1.0 - circuit[name])
    if means is not None:
        kw.update(head_mean_lhk=means["heads"], neuron_mean_lf=means["neurons"])
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
