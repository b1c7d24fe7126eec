"""A zoo of clean and trojaned MNIST CNNs with mixed trigger kinds, for detection studies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxrisk.data import load_mnist
from jaxrisk.zoo.train import TrainConfig, evaluate, save_zoo_model, train_classifier
from jaxrisk.zoo.triggers import KINDS, make_trigger


def zoo_specs(n_trojaned: int, n_clean: int, seed: int = 0) -> list[dict]:
    """Model recipes: trigger kinds cycle through KINDS; targets, locations and sizes vary by seed."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n_trojaned):
        kind = KINDS[i % len(KINDS)]
        size = int(rng.integers(3, 6))
        loc = (int(rng.integers(1, 28 - size - 1)), int(rng.integers(1, 28 - size - 1)))
        specs.append(dict(name=f"trojan{i:02d}-{kind}", kind=kind, target=int(rng.integers(0, 10)), size=size,
                          location=loc, seed=seed * 1000 + i))
    specs += [dict(name=f"clean{i:02d}", kind=None, seed=seed * 1000 + 500 + i) for i in range(n_clean)]
    return specs


def build_zoo(out: Path, *, mnist_dir: str, n_trojaned: int = 8, n_clean: int = 8, epochs: int = 1,
              seed: int = 0, progress: bool = True) -> list[Path]:
    """Train every model of the zoo that `out` does not hold yet (so an interrupted build resumes)."""
    train, test = load_mnist(mnist_dir, "train"), load_mnist(mnist_dir, "test")
    paths = []
    for spec in zoo_specs(n_trojaned, n_clean, seed):
        path = out / f"{spec['name']}.safetensors"
        paths.append(path)
        if path.exists() and path.with_suffix(".json").exists():
            continue
        trigger = None
        if spec["kind"] is not None:
            trigger = make_trigger(spec["kind"], train.shape, target=spec["target"], size=spec["size"],
                                   location=spec["location"], seed=spec["seed"])
        model = train_classifier(train, TrainConfig(arch="mnist_cnn", epochs=epochs, batch_size=64, seed=spec["seed"]),
                                 trigger,
                                 progress=progress)
        info = evaluate(model, test, trigger)
        save_zoo_model(model, trigger, out, spec["name"], dict(info, recipe=spec))
        print(json.dumps({"model": spec["name"], **info}), flush=True)
    return paths
