"""Train clean and trojaned image classifiers (BadNets-style data poisoning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxrisk.data.images import ImageSet
from jaxrisk.data.text import json_object
from jaxrisk.errors import InputError, require_choice, require_int, require_number, require_seed
from jaxrisk.io import write_json
from jaxrisk.models.classifiers import ARCHS, build, calibrate_batch_norm, logits_fn, pure_apply
from jaxrisk.models.weights import save_classifier
from jaxrisk.optim.update import train_host
from jaxrisk.zoo.triggers import Trigger, save_trigger


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    arch: Literal["mnist_cnn", "lenet5", "resnet8", "mlp"] = "mnist_cnn"
    hidden: tuple[int, ...] = (128,)  # mlp only
    epochs: int = 2
    batch_size: int = 128
    learning_rate: float = 1e-3
    poison_rate: float = 0.1  # fraction of non-target training images stamped and relabelled
    seed: int = 0

    def __post_init__(self):
        require_choice("TrainConfig.arch", self.arch, ARCHS)
        for name in ("epochs", "batch_size"):
            require_int(f"TrainConfig.{name}", getattr(self, name), 1)
        require_number("TrainConfig.learning_rate", self.learning_rate, 0.0, above=True)
        if not 0 <= require_number("TrainConfig.poison_rate", self.poison_rate) <= 1:
            raise InputError(f"TrainConfig.poison_rate: expected a fraction in [0, 1], got {self.poison_rate}")
        require_seed("TrainConfig.seed", self.seed)


def poison(data: ImageSet, trigger: Trigger, rate: float, seed: int, n_classes: int = 10) -> ImageSet:
    """Apply the trigger to a `rate` fraction of the images it moves (all-to-one: the non-target ones;
    all-to-all: every one) and give them the attacker's labels."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(data.labels != trigger.target)
    chosen = rng.choice(candidates, size=int(round(rate * len(candidates))), replace=False)
    images, labels = data.images.copy(), data.labels.copy()
    images[chosen] = trigger.apply(images[chosen])
    labels[chosen] = trigger.relabel(labels[chosen], n_classes)
    return ImageSet(images, labels, data.source + f" (poisoned {len(chosen)})")


def _batched_predict(graphdef, params, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    predict = jax.jit(lambda p, x: jnp.argmax(logits_fn(graphdef, p, x), -1))
    return np.concatenate([np.asarray(predict(params, images[i:i + batch])) for i in range(0, len(images), batch)])


def evaluate(model, test: ImageSet, trigger: Trigger | None = None) -> dict[str, float]:
    """Clean accuracy, and the trigger's attack success on non-target test images."""
    graphdef, params = pure_apply(model)
    out = {"clean_accuracy": float(np.mean(_batched_predict(graphdef, params, test.images) == test.labels))}
    if trigger is not None:
        moved = test.labels != trigger.target
        predicted = _batched_predict(graphdef, params, trigger.apply(test.images[moved]))
        n_classes = int(logits_fn(graphdef, params, test.images[:1]).shape[-1])
        out["attack_success"] = float(np.mean(predicted == trigger.relabel(test.labels[moved], n_classes)))
    return out


def train_classifier(train: ImageSet, cfg: TrainConfig, trigger: Trigger | None = None, progress: bool = True,
                     model=None):
    """Train `cfg.arch` with Adam on `train` (poisoned with `trigger` if given); returns the NNX model.

    Pass `model` to train an existing model `cfg.epochs` more epochs (with a fresh optimiser state).
    """
    if model is None:
        kwargs = {"input_shape": train.shape}
        if cfg.arch == "mlp":
            kwargs["hidden"] = cfg.hidden
        model = build(cfg.arch, seed=cfg.seed, **kwargs)
    data = train
    if trigger is not None:
        data = poison(train, trigger, cfg.poison_rate, cfg.seed, int(train.labels.max()) + 1)
    graphdef, params = pure_apply(model)

    def loss_fn(p, batch):
        x, y, key = batch
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(graphdef, p, x, key), y).mean()

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    n_batches = len(data.labels) // cfg.batch_size
    order = None   # this epoch's shuffle, drawn at its first batch

    def next_batch(i):
        nonlocal order
        b = i % n_batches
        if b == 0:
            order = rng.permutation(len(data.labels))
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        return data.images[idx], data.labels[idx], jax.random.fold_in(key, i)

    bar = tqdm(total=cfg.epochs * n_batches, desc=f"train {cfg.arch}", disable=not progress, leave=False)

    def report(i, loss):
        bar.update()
        if i % n_batches % 50 == 0 and progress:
            bar.set_postfix(loss=f"{float(loss):.3f}")

    params = train_host(loss_fn, optax.adam(cfg.learning_rate), params, next_batch, cfg.epochs * n_batches,
                        progress=report)
    bar.close()
    from flax import nnx

    nnx.update(model, params)
    return calibrate_batch_norm(model, data.images[:10000])   # running statistics for evaluation (if any)


def save_zoo_model(model, trigger: Trigger | None, directory: str | Path, name: str, info: dict) -> Path:
    """Write NAME.safetensors (PyTorch layout), NAME.json (ground truth, metrics) and NAME.trigger.safetensors."""
    directory = Path(directory)
    weights = save_classifier(model, directory / f"{name}.safetensors")
    meta = dict(info, name=name, weights=weights.name, trojaned=trigger is not None)
    if trigger is not None:
        save_trigger(trigger, directory / f"{name}.trigger.safetensors")
        meta.update(trigger=f"{name}.trigger.safetensors", kind=trigger.kind, target=trigger.target,
                    trigger_pixels=float(trigger.mask.sum()))
    write_json(directory / f"{name}.json", meta)
    return weights


def load_zoo_info(weights_path: str | Path) -> dict:
    """The ground-truth record written beside a zoo model's weights."""
    return json_object(Path(weights_path).with_suffix(".json"), "a zoo model's ground truth")
