"""Distillation discrepancy: distil a smaller student from the model on trusted inputs only, then score each
input by how far the student's output distribution is from the model's (KL, in a chosen direction).

On the trusted distribution the student has learnt to agree; a mechanism the trusted data never exercises
(a backdoor's trigger -> target) is not distilled, so where the model runs it the two disagree. Students:
an image classifier's is an MLP (`DistillConfig.hidden`); a language model's keeps the first
`DistillConfig.layers` blocks (initialised from the model's, with its embeddings and head), trained on the
next-token distributions of every trusted position. Training runs the shared update step.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrisk.anomaly.config import DetectConfig, DistillConfig
from jaxrisk.anomaly.report import DetectResult
from jaxrisk.anomaly.run import trusted_split, verdict
from jaxrisk.data.batch import pad_batch
from jaxrisk.errors import InputError
from jaxrisk.models.classifiers import build, logits_fn, pure_apply
from jaxrisk.models.lm import LanguageModel, forward
from jaxrisk.optim.update import train_host


def kl(teacher_logits, student_logits, direction: str, temperature: float) -> jax.Array:
    """KL between the softened distributions over the last axis, per row."""
    t = jax.nn.log_softmax(teacher_logits / temperature, -1)
    s = jax.nn.log_softmax(student_logits / temperature, -1)
    p, q = (t, s) if direction == "forward" else (s, t)
    return jnp.sum(jnp.exp(p) * (p - q), -1)


def _batches(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    return lambda _: rng.integers(0, n, min(size, n))


# ---- image classifiers ----

def distil_classifier(graphdef, params, images: np.ndarray, cfg: DistillConfig, *, seed: int = 0):
    """(student graphdef, student params): an MLP fit to the model's outputs on `images` [N, C, H, W]."""
    teacher = jax.jit(lambda x: logits_fn(graphdef, params, x))
    targets = np.concatenate([np.asarray(teacher(jnp.asarray(images[i:i + 1000])))   # the model's logits, once
                              for i in range(0, len(images), 1000)])
    student = build("mlp", seed=seed, input_shape=images.shape[1:], hidden=cfg.hidden, num_classes=targets.shape[-1])
    s_graphdef, s_params = pure_apply(student)
    pick = _batches(len(images), cfg.batch, seed)

    def next_batch(i):
        idx = pick(i)
        return jnp.asarray(images[idx]), jnp.asarray(targets[idx])

    def loss(p, batch):
        x, target = batch
        return jnp.mean(kl(target, logits_fn(s_graphdef, p, x), cfg.direction, cfg.temperature))

    return s_graphdef, train_host(loss, optax.adam(cfg.learning_rate), s_params, next_batch, cfg.steps)


def classifier_discrepancy(graphdef, params, student, images: np.ndarray, cfg: DistillConfig,
                           batch: int = 1000) -> np.ndarray:
    s_graphdef, s_params = student
    score = jax.jit(lambda x: kl(logits_fn(graphdef, params, x), logits_fn(s_graphdef, s_params, x), cfg.direction,
                                 cfg.temperature))
    return np.concatenate([np.asarray(score(jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


def run_classifier(graphdef, params, trusted: np.ndarray, inputs: np.ndarray, config: DetectConfig,
                   labels=None, source: dict | None = None) -> DetectResult:
    """Distil on the trusted fit rows, score the inputs and the held-out trusted rows, then the verdict."""
    distill = config.distill
    fit, cal = _split(len(trusted), config)
    student = distil_classifier(graphdef, params, trusted[fit], distill, seed=config.run.seed)
    raw = {"output": classifier_discrepancy(graphdef, params, student, inputs, distill)}
    raw_cal = {"output": classifier_discrepancy(graphdef, params, student, trusted[cal], distill)}
    return verdict(raw, raw_cal, labels, config, dict(source or {}, trusted_fit=len(fit), trusted_calibration=len(cal),
                                                      student=f"mlp {list(distill.hidden)}"))


def _split(n_trusted: int, config: DetectConfig):
    need = int(np.ceil(1.0 / config.fpr))
    fit, cal = trusted_split(n_trusted, config)
    if len(cal) < need or len(fit) < 1:
        raise InputError(f"too few trusted examples: {n_trusted}; the distillation detector needs at least "
                         f"{int(np.ceil(need / config.calibration)) + 1} ({need} held out to set the threshold at "
                         f"a false-positive rate of {config.fpr}, calibration {config.calibration} of them)")
    return fit, cal


# ---- language models ----

def student_lm(lm: LanguageModel, layers: int) -> LanguageModel:
    """The model's first `layers` blocks with its embeddings, final norm and head: the student's start."""
    if not 1 <= layers <= lm.cfg.n_layers:
        raise InputError(f"student layers: expected 1..{lm.cfg.n_layers} (the model's blocks), got {layers}")
    small = LanguageModel.random(dataclasses.replace(lm.cfg, n_layers=layers), dtype=lm.dtype,
                                 tokenizer=lm._tokenizer)
    teacher = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(lm.params)[0]}
    params = jax.tree_util.tree_map_with_path(lambda p, x: teacher[jax.tree_util.keystr(p)], small.params)
    return small.with_params(params)


def _lm_kl(teacher, student, tokens, valid, cfg: DistillConfig, student_params=None):
    """[B, T] KL per position (0 at padding)."""
    t_logits = forward(teacher.graphdef, teacher.params, tokens, valid_bt=valid)[0]
    s_logits = forward(student.graphdef, student.params if student_params is None else student_params, tokens,
                       valid_bt=valid)[0]
    return kl(t_logits, s_logits, cfg.direction, cfg.temperature) * valid


def distil_lm(lm: LanguageModel, tokens: np.ndarray, valid: np.ndarray, cfg: DistillConfig, *,
              seed: int = 0) -> LanguageModel:
    """A student (`student_lm`) fit to the model's next-token distributions at every valid position."""
    student = student_lm(lm, cfg.layers or max(1, lm.cfg.n_layers // 2))
    pick = _batches(len(tokens), cfg.batch, seed)

    def next_batch(i):
        idx = pick(i)
        return jnp.asarray(tokens[idx]), jnp.asarray(valid[idx])

    def loss(p, batch):
        x, v = batch
        return jnp.sum(_lm_kl(lm, student, x, v, cfg, p)) / jnp.maximum(jnp.sum(v), 1)

    return student.with_params(train_host(loss, optax.adam(cfg.learning_rate), student.params, next_batch, cfg.steps))


def lm_discrepancy(lm, student, tokens, valid, cfg: DistillConfig, reduce: str, batch: int = 64) -> np.ndarray:
    """Per text: the KL averaged over its tokens (`mean`) or at its last token (`last`)."""
    @jax.jit
    def score(x, v):
        per = _lm_kl(lm, student, x, v, cfg)
        if reduce == "last":
            return per[jnp.arange(x.shape[0]), jnp.maximum(jnp.sum(v, 1) - 1, 0)]
        return jnp.sum(per, 1) / jnp.maximum(jnp.sum(v, 1), 1)

    return np.concatenate([np.asarray(score(jnp.asarray(tokens[i:i + batch]), jnp.asarray(valid[i:i + batch])))
                           for i in range(0, len(tokens), batch)])


def run_lm(lm: LanguageModel, trusted: list[str], inputs: list[str], config: DetectConfig, labels=None,
           reduce: str = "mean", source: dict | None = None) -> DetectResult:
    """Distil on the trusted fit texts, score the inputs and the held-out trusted texts, then the verdict."""
    def encode(texts):
        return pad_batch([lm.encode(t)[:lm.cfg.max_position] for t in texts])

    distill = config.distill
    fit, cal = _split(len(trusted), config)
    t_tokens, t_valid = encode(trusted)
    student = distil_lm(lm, t_tokens[fit], t_valid[fit], distill, seed=config.run.seed)
    x_tokens, x_valid = encode(inputs)
    raw = {"output": lm_discrepancy(lm, student, x_tokens, x_valid, distill, reduce)}
    raw_cal = {"output": lm_discrepancy(lm, student, t_tokens[cal], t_valid[cal], distill, reduce)}
    return verdict(raw, raw_cal, labels, config, dict(source or {}, trusted_fit=len(fit), trusted_calibration=len(cal),
                                                      student=f"first {student.cfg.n_layers} of {lm.cfg.n_layers} "
                                                              "blocks"))
