"""Anomaly detection on jaxrisk's own zoo: triggered vs clean inputs, per detector and per layer.

Image classifiers: MNIST CNNs trojaned with a patch (4x4 white square), a blend (a fixed random image at
alpha 0.15) and a warp (WaNet-style displacement field, mean 1 pixel), 10% of non-target training images
poisoned, 2 epochs (the models are kept in OUT/ and reused). Trusted: 20,000 clean training images.
Inputs (and the untrusted set): the 10,000 MNIST test images, half of the non-target ones triggered.
Language model: stories260K with the zoo's planted " Zorb" -> marker backdoor; trusted: 2,000 clean story
prefixes sampled from the original model; inputs: 400 held-out prefixes, half ending in the trigger
(activations of every block's residual stream at the last token).

Reported per model, detector and layer (and for the default aggregate over layers): AUROC, AP, TPR at 1%
FPR, and the fraction of inputs flagged at the threshold set on held-out trusted data.

    python benchmarks/anomaly_zoo.py --mnist ../shared/assets/data/mnist \
        --model ../shared/assets/models/tinyllamas-stories260K --out runs/anomaly_zoo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxrisk.anomaly import distill
from jaxrisk.anomaly.config import DETECTOR_NAMES, DetectConfig
from jaxrisk.anomaly.data import classifier_task, lm_task
from jaxrisk.anomaly.run import run
from jaxrisk.data import load_mnist
from jaxrisk.io import write_json
from jaxrisk.models import load_classifier, load_pretrained
from jaxrisk.models.classifiers import pure_apply
from jaxrisk.models.weights import save_classifier
from jaxrisk.zoo.lm_backdoor import BackdoorConfig, plant_backdoor, sample_clean
from jaxrisk.zoo.train import TrainConfig, evaluate, train_classifier
from jaxrisk.zoo.triggers import make_trigger

TRIGGERS = {"patch": dict(size=4, location=(3, 3)), "blend": dict(alpha=0.15), "warp": dict(strength=1.0)}


def summarise(result) -> dict:
    m = result.metrics
    return {"aggregate": m["aggregate"], "layers": m["layers"], "flagged_clean": m["flagged_clean_fraction"],
            "flagged_anomalous": m["flagged_anomalous_fraction"]}


def study(acts, detectors, distilled) -> dict:
    """Every detector on the same activations; `distilled(config)` runs the distillation detector."""
    out = {}
    for detector in detectors:
        t0 = time.perf_counter()
        config = DetectConfig(detector=detector)
        result = distilled(config) if detector == "distillation" else run(acts, config)
        out[detector] = dict(summarise(result), seconds=time.perf_counter() - t0)
        agg = out[detector]["aggregate"]
        print(f"  {detector:12s} AUROC {agg['auroc']:.4f}  AP {agg['ap']:.4f}  TPR@1% {agg['tpr_at_0.01_fpr']:.3f}  "
              + "  ".join(f"{k} {v['auroc']:.3f}" for k, v in out[detector]["layers"].items()), flush=True)
    return out


def mnist_models(args, out: Path) -> dict:
    train, test = load_mnist(args.mnist, "train"), load_mnist(args.mnist, "test")
    rng = np.random.default_rng(0)
    trusted = train.images[rng.permutation(len(train.images))[:20000]]
    results = {}
    for kind, kwargs in TRIGGERS.items():
        trigger = make_trigger(kind, (1, 28, 28), target=7, seed=3, **kwargs)
        path = out / f"cnn_{kind}.safetensors"
        if path.exists():
            model = load_classifier(path, "mnist_cnn")
        else:
            model = train_classifier(train, TrainConfig(arch="mnist_cnn", epochs=2, batch_size=64, poison_rate=0.1),
                                     trigger, progress=False)
            save_classifier(model, path)
        info = evaluate(model, test, trigger)
        labels = (test.labels != trigger.target) & (np.random.default_rng(1).random(len(test.labels)) < 0.5)
        inputs = test.images.copy()
        inputs[labels] = trigger.apply(inputs[labels])
        graphdef, params = pure_apply(model)
        acts = classifier_task(graphdef, params, trusted, inputs, labels=labels, layers=model.tap_names)
        print(f"{kind}: {json.dumps(info)}", flush=True)
        distilled = lambda c: distill.run_classifier(graphdef, params, trusted, inputs, c, labels=labels)  # noqa: E731
        results[f"mnist_cnn_{kind}"] = dict(model=info, detectors=study(acts, args.detectors, distilled))
    return results


def lm_backdoor(args) -> dict:
    lm = load_pretrained(args.model)
    params, data = plant_backdoor(lm, BackdoorConfig(seed=0))
    planted = lm.with_params(params)
    rng = np.random.default_rng(2)
    trusted_rows = sample_clean(lm, 2000, 24, seed=50)
    held = sample_clean(lm, 400, 24, seed=51)

    def prefix(row):
        return row[:int(rng.integers(4, 20))]

    trusted = [lm.decode(prefix(r)[1:]) for r in trusted_rows]
    labels = np.arange(len(held)) % 2 == 1
    inputs = [lm.decode(np.concatenate([prefix(r), data["trigger_ids"]])[1:]) if anomalous
              else lm.decode(prefix(r)[1:]) for r, anomalous in zip(held, labels)]
    layers = [f"blocks.{i}.hook_resid_post" for i in range(lm.cfg.n_layers)]
    acts = lm_task(planted, trusted, inputs, layers=layers, reduce="last", labels=labels)
    print("lm backdoor:", flush=True)
    return {"lm_backdoor": dict(detectors=study(
        acts, args.detectors, lambda c: distill.run_lm(planted, trusted, inputs, c, labels=labels, reduce="last")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="runs/anomaly_zoo")
    ap.add_argument("--detectors", default=",".join(DETECTOR_NAMES), type=lambda s: s.split(","))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {**mnist_models(args, out), **lm_backdoor(args)}
    write_json(out / "anomaly_zoo.json", results)


if __name__ == "__main__":
    main()
