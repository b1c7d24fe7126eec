"""The embedded default: a trojaned and a clean MLP on scikit-learn's digits (no download), at 16x16.

Trained once (seconds) and cached under `$JAXRISK_CACHE` (default
`~/.cache/jaxrisk`), beside their ground truth.
"""

from __future__ import annotations

from pathlib import Path

from jaxrisk.data import load_digits
from jaxrisk.io import cache_root
from jaxrisk.models import load_classifier
from jaxrisk.zoo import TrainConfig, evaluate, make_trigger, save_zoo_model, train_classifier

RECIPE = "digits16-mlp64-v1"
TARGET = 3


def cache_dir() -> Path:
    return cache_root() / RECIPE


def demo_models(progress: bool = True) -> dict:
    """{"trojaned": model, "clean": model}, trained on first use and cached."""
    train, test = load_digits("train"), load_digits("test")
    trigger = make_trigger("patch", train.shape, target=TARGET, size=2)
    cfg = TrainConfig(arch="mlp", hidden=(64,), epochs=30, batch_size=32, poison_rate=0.1, seed=0)
    models = {}
    for name, trig in (("trojaned", trigger), ("clean", None)):
        path = cache_dir() / f"{name}.safetensors"
        if not path.exists():
            model = train_classifier(train, cfg, trig, progress=progress)
            save_zoo_model(model, trig, path.parent, name, evaluate(model, test, trig))
        models[name] = load_classifier(path, "mlp", input_shape=train.shape)
    return models
