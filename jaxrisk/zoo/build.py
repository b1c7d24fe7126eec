"""A zoo of clean and trojaned MNIST CNNs with mixed trigger kinds, for detection studies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxrisk.data import load_mnist
from jaxrisk.models import load_classifier
from jaxrisk.errors import InputError
from jaxrisk.zoo.train import TrainConfig, evaluate, load_zoo_info, save_zoo_model, train_classifier
from jaxrisk.zoo.triggers import STAMP_KINDS, make_trigger


def zoo_specs(n_trojaned: int, n_clean: int, seed: int = 0) -> list[dict]:
    """Model recipes: trigger kinds cycle through the stamp kinds (what a trigger scan inverts); targets,
    locations and sizes vary by seed."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n_trojaned):
        kind = STAMP_KINDS[i % len(STAMP_KINDS)]
        size = int(rng.integers(3, 6))
        loc = (int(rng.integers(1, 28 - size - 1)), int(rng.integers(1, 28 - size - 1)))
        specs.append(dict(name=f"trojan{i:02d}-{kind}", kind=kind, target=int(rng.integers(0, 10)), size=size,
                          location=loc, seed=seed * 1000 + i))
    specs += [dict(name=f"clean{i:02d}", kind=None, seed=seed * 1000 + 500 + i) for i in range(n_clean)]
    return specs


MIN_CLEAN_ACCURACY = 0.98
MIN_ATTACK_SUCCESS = 0.95


def meets_bar(info: dict) -> bool:
    """A zoo model keeps clean accuracy >= 98% and, if trojaned, its trigger fires on >= 95%."""
    return info["clean_accuracy"] >= MIN_CLEAN_ACCURACY and info.get("attack_success", 1.0) >= MIN_ATTACK_SUCCESS


def build_zoo(out: Path, *, mnist_dir: str, n_trojaned: int = 8, n_clean: int = 8, epochs: int = 1,
              max_epochs: int = 3, seed: int = 0, progress: bool = True) -> list[Path]:
    """Train every model of the zoo that `out` does not hold yet (so an interrupted build resumes).

    Each model trains `epochs` epochs, then one more at a time (up to `max_epochs`) until it meets the bar.
    """
    train, test = load_mnist(mnist_dir, "train"), load_mnist(mnist_dir, "test")
    paths = []
    for spec in zoo_specs(n_trojaned, n_clean, seed):
        path = out / f"{spec['name']}.safetensors"
        paths.append(path)
        trigger = None
        if spec["kind"] is not None:
            trigger = make_trigger(spec["kind"], train.shape, target=spec["target"], size=spec["size"],
                                   location=spec["location"], seed=spec["seed"])
        model, info, done_epochs = None, None, 0
        if path.exists() and path.with_suffix(".json").exists():
            info = load_zoo_info(path)
            if not {"clean_accuracy", "recipe"} <= set(info) or info["recipe"] != json.loads(json.dumps(spec)):
                raise InputError(f"{path.with_suffix('.json')}: not the record of zoo model {spec['name']} as this "
                                 "build makes it (jaxrisk would overwrite it); move it away or choose another --out")
            done_epochs = info.get("epochs", epochs)
            if meets_bar(info) or done_epochs >= max_epochs:
                continue
            model = load_classifier(path, "mnist_cnn")
        while info is None or (not meets_bar(info) and done_epochs < max_epochs):
            step = epochs if model is None else 1
            model = train_classifier(train, TrainConfig(arch="mnist_cnn", epochs=step, batch_size=64,
                                                        seed=spec["seed"]), trigger,
                                     progress=progress, model=model)
            done_epochs += step
            info = dict(evaluate(model, test, trigger), epochs=done_epochs)
        save_zoo_model(model, trigger, out, spec["name"], dict(info, recipe=spec, meets_bar=meets_bar(info)))
        print(json.dumps({"model": spec["name"], **info}), flush=True)
    return paths
