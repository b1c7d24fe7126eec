"""A zoo of clean and trojaned MNIST classifiers (several trigger kinds x architectures), for detection studies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxrisk.data import load_mnist
from jaxrisk.models import load_classifier
from jaxrisk.models.classifiers import ARCHS
from jaxrisk.errors import InputError
from jaxrisk.zoo.train import TrainConfig, evaluate, load_zoo_info, save_zoo_model, train_classifier
from jaxrisk.zoo.triggers import ALL_TO_ALL, KINDS, Trigger, make_trigger


ZOO_KINDS = ("patch", "sparse", "checkerboard", "blend", "warp", "sig", "patch_large", "all_to_all")
ZOO_ARCHS = ("mnist_cnn", "lenet5", "resnet8")


def zoo_specs(n_trojaned: int, n_clean: int, seed: int = 0, kinds: tuple[str, ...] = ZOO_KINDS,
              archs: tuple[str, ...] = ZOO_ARCHS) -> list[dict]:
    """Model recipes: trojaned models cycle through `kinds` (a trigger kind of `make_trigger`, or
    `patch_large`: an 8x8 patch, or `all_to_all`: a 4x4 patch with the label shift y -> y + 1) and, at
    each turn of the kinds, through `archs`, so that every kind meets every architecture; clean models
    cycle through `archs`. Targets, locations, sizes and seeds vary with `seed`; with the four stamp kinds
    and `mnist_cnn` alone, the recipes (and names) are those of the zoo before the other kinds existed."""
    unknown = sorted(set(kinds) - set(KINDS) - {"patch_large", "all_to_all"})
    if unknown or not kinds:
        raise InputError(f"zoo trigger kinds {unknown or list(kinds)}: expected some of {list(ZOO_KINDS)}")
    bad_archs = sorted(set(archs) - set(ARCHS))
    if bad_archs or not archs:
        raise InputError(f"zoo architectures {bad_archs or list(archs)}: expected some of {sorted(ARCHS)}")
    rng = np.random.default_rng(seed)
    specs = []

    def suffix(arch):   # names carry the architecture when there are several
        return f"-{arch}" if len(archs) > 1 else ""

    for i in range(n_trojaned):
        kind = kinds[i % len(kinds)]
        arch = archs[(i % len(kinds) + i // len(kinds)) % len(archs)]
        size = 8 if kind == "patch_large" else 4 if kind == "all_to_all" else int(rng.integers(3, 6))
        loc = (int(rng.integers(1, 28 - size - 1)), int(rng.integers(1, 28 - size - 1)))
        target = ALL_TO_ALL if kind == "all_to_all" else int(rng.integers(0, 10))
        specs.append(dict(name=f"trojan{i:02d}-{kind}{suffix(arch)}", kind=kind, arch=arch, target=target,
                          size=size, location=loc, seed=seed * 1000 + i))
    specs += [dict(name=f"clean{i:02d}{suffix(archs[i % len(archs)])}", kind=None, arch=archs[i % len(archs)],
                   seed=seed * 1000 + 500 + i) for i in range(n_clean)]
    return specs


def spec_trigger(spec: dict, shape: tuple[int, int, int]) -> Trigger | None:
    """The planted trigger of a zoo recipe (None for a clean model)."""
    if spec["kind"] is None:
        return None
    kind = "patch" if spec["kind"] in ("patch_large", "all_to_all") else spec["kind"]
    return make_trigger(kind, shape, target=spec["target"], size=spec["size"], location=spec["location"],
                        seed=spec["seed"])


MIN_CLEAN_ACCURACY = 0.98
MIN_ATTACK_SUCCESS = 0.95


def meets_bar(info: dict) -> bool:
    """A zoo model keeps clean accuracy >= 98% and, if trojaned, its trigger fires on >= 95%."""
    return info["clean_accuracy"] >= MIN_CLEAN_ACCURACY and info.get("attack_success", 1.0) >= MIN_ATTACK_SUCCESS


def build_zoo(out: Path, *, mnist_dir: str, n_trojaned: int = 8, n_clean: int = 8, epochs: int = 1,
              max_epochs: int = 3, seed: int = 0, kinds: tuple[str, ...] = ZOO_KINDS,
              archs: tuple[str, ...] = ZOO_ARCHS, progress: bool = True) -> list[Path]:
    """Train every model of the zoo that `out` does not hold yet (so an interrupted build resumes).

    Each model trains `epochs` epochs, then one more at a time (up to `max_epochs`) until it meets the bar.
    """
    train, test = load_mnist(mnist_dir, "train"), load_mnist(mnist_dir, "test")
    paths = []
    for spec in zoo_specs(n_trojaned, n_clean, seed, kinds, archs):
        path = out / f"{spec['name']}.safetensors"
        paths.append(path)
        trigger = spec_trigger(spec, train.shape)
        model, info, done_epochs = None, None, 0
        if path.exists() and path.with_suffix(".json").exists():
            info = load_zoo_info(path)
            recorded = dict({"arch": "mnist_cnn"}, **info.get("recipe", {}))   # zoos from before `arch` existed
            if "clean_accuracy" not in info or recorded != json.loads(json.dumps(spec)):
                raise InputError(f"{path.with_suffix('.json')}: not the record of zoo model {spec['name']} as this "
                                 "build makes it (jaxrisk would overwrite it); move it away or choose another --out")
            done_epochs = info.get("epochs", epochs)
            if meets_bar(info) or done_epochs >= max_epochs:
                continue
            model = load_classifier(path, spec["arch"])
        while info is None or (not meets_bar(info) and done_epochs < max_epochs):
            step = epochs if model is None else 1
            model = train_classifier(train, TrainConfig(arch=spec["arch"], epochs=step, batch_size=64,
                                                        seed=spec["seed"]), trigger,
                                     progress=progress, model=model)
            done_epochs += step
            info = dict(evaluate(model, test, trigger), epochs=done_epochs)
        save_zoo_model(model, trigger, out, spec["name"], dict(info, recipe=spec, meets_bar=meets_bar(info)))
        print(json.dumps({"model": spec["name"], **info}), flush=True)
    return paths
