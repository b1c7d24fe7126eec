"""Anomaly detection on real MNIST: cupbearer's own performance bar, and the command line's contract."""

import json

import numpy as np
import pytest

from jaxrisk.anomaly.config import DetectConfig
from jaxrisk.anomaly.data import classifier_task
from jaxrisk.anomaly.run import run
from jaxrisk.cli import main

pytestmark = [pytest.mark.assets, pytest.mark.slow]   # trains an MLP on MNIST


@pytest.fixture(scope="module")
def corner_pixel(mnist_dir):
    """cupbearer's performance-test case: an MLP [128, 128] trained 3 epochs (batch 64) on MNIST with 5% of
    the training images given a white top-left pixel and relabelled 0."""
    from jaxrisk.data import load_mnist
    from jaxrisk.models.classifiers import pure_apply
    from jaxrisk.zoo.train import TrainConfig, evaluate, train_classifier
    from jaxrisk.zoo.triggers import make_trigger

    train, test = load_mnist(mnist_dir, "train"), load_mnist(mnist_dir, "test")
    trigger = make_trigger("patch", (1, 28, 28), size=1, location=(0, 0), target=0)
    model = train_classifier(train, TrainConfig(arch="mlp", hidden=(128, 128), epochs=3, batch_size=64,
                                                poison_rate=0.05), trigger, progress=False)
    metrics = evaluate(model, test, trigger)
    assert metrics["clean_accuracy"] > 0.9 and metrics["attack_success"] > 0.9, metrics
    return model, pure_apply(model), train, test, trigger


def mixed(images, trigger, fraction, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(len(images)) < fraction
    out = images.copy()
    out[labels] = trigger.apply(out[labels])
    return out, labels


@pytest.mark.parametrize("detector", ["mahalanobis", "que", "spectral", "spectre", "probe"])
def test_cupbearer_bar_corner_pixel_backdoor(corner_pixel, detector):
    """cupbearer's test_performance: trusted = clean training images; untrusted = other training images,
    half of them triggered (its QUE setting); test = MNIST test images, half triggered. Its bar: AUROC > 0.97
    on the two hidden layers, > 0.90 on the logits (the probe: > 0.97 on the second layer), with its sizes:
    30,000 trusted, 30,000 untrusted and all 10,000 test images (with half of those sizes SPECTRE's fc2 AUROC
    measured 0.965 here)."""
    _, (graphdef, params), train, test, trigger = corner_pixel
    untrusted, _ = mixed(train.images[30000:], trigger, 0.5, 1)
    inputs, labels = mixed(test.images, trigger, 0.5, 2)
    acts = classifier_task(graphdef, params, train.images[:30000], inputs, layers=("fc1", "fc2", "fc3"),
                           labels=labels, untrusted=untrusted)
    layers = run(acts, DetectConfig(detector=detector)).metrics["layers"]
    bars = {"fc1": 0.97, "fc2": 0.97, "fc3": 0.90}
    for layer in (("fc2",) if detector == "probe" else bars):
        assert layers[layer]["auroc"] > bars[layer], (detector, layer, layers[layer])


def test_detect_command_writes_scores_in_input_order(corner_pixel, mnist_dir, tmp_path):
    from jaxrisk.models.weights import save_classifier

    model, _, _, test, trigger = corner_pixel
    weights = save_classifier(model, tmp_path / "mlp.safetensors")
    images, labels = mixed(test.images[:3000], trigger, 0.3, 3)
    np.savez(tmp_path / "inputs.npz", images=images, labels=labels)
    cache = tmp_path / "cache"
    argv = ["detect", "--weights", str(weights), "--arch", "mlp", "--trusted", str(mnist_dir), "--inputs",
            str(tmp_path / "inputs.npz"), "--max-trusted", "10000", "--cache", str(cache), "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "out"), "--detector", "que"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(3000))
    assert [r["label"] for r in rows] == labels.tolist()
    scores, flagged = np.array([r["score"] for r in rows]), np.array([r["flagged"] for r in rows])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["detector"] == "que" and report["layers"] == ["fc1", "fc2", "fc3"]
    assert np.array_equal(flagged, scores > report["threshold"])
    assert report["n_flagged"] == flagged.sum()
    assert report["metrics"]["aggregate"]["auroc"] > 0.97
    assert report["metrics"]["flagged_clean_fraction"] < 0.03         # the threshold's fpr is 0.01
    assert report["metrics"]["flagged_anomalous_fraction"] > 0.9
    assert (tmp_path / "out" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2                                               # trusted and inputs activations
    assert main(argv + ["--out", str(tmp_path / "out2"), "--detector", "mahalanobis", "--shrinkage", "0.1"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == cached              # the second detector read them
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["settings"]["shrinkage"] == 0.1


def test_detect_reads_safetensors_inputs(corner_pixel, mnist_dir, tmp_path):
    from safetensors.numpy import save_file

    from jaxrisk.models.weights import save_classifier

    model, _, _, test, trigger = corner_pixel
    weights = save_classifier(model, tmp_path / "mlp.safetensors")
    images, labels = mixed(test.images[:1000], trigger, 0.5, 4)
    save_file({"images": images, "labels": labels}, str(tmp_path / "inputs.safetensors"))
    assert main(["detect", "--weights", str(weights), "--arch", "mlp", "--trusted", str(mnist_dir), "--inputs",
                 str(tmp_path / "inputs.safetensors"), "--out", str(tmp_path / "out"), "--max-trusted", "5000",
                 "--no-cache", "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["detector"] == "que" and report["n_inputs"] == 1000
    assert report["metrics"]["aggregate"]["auroc"] > 0.97


def test_bad_inputs_get_one_clear_error(corner_pixel, mnist_dir, tmp_path, capsys):
    from jaxrisk.models.weights import save_classifier

    model, _, _, test, _ = corner_pixel
    weights = str(save_classifier(model, tmp_path / "mlp.safetensors"))
    np.savez(tmp_path / "flat.npz", images=test.images[:10].reshape(10, -1))
    np.savez(tmp_path / "ints.npz", images=(test.images[:10] * 255).astype(np.uint8))
    np.savez(tmp_path / "good.npz", images=test.images[:200])
    np.savez(tmp_path / "empty.npz", images=test.images[:0])
    base = ["detect", "--weights", weights, "--arch", "mlp", "--out", str(tmp_path / "o"), "--no-cache",
            "--no-progress"]
    cases = [
        (["--trusted", str(mnist_dir), "--inputs", str(tmp_path / "flat.npz")],
         "must be [N, 1, 28, 28], got [10, 784]"),
        (["--trusted", str(mnist_dir), "--inputs", str(tmp_path / "ints.npz")], "must be float in [0, 1], got uint8"),
        (["--trusted", str(tmp_path / "empty.npz"), "--inputs", str(tmp_path / "good.npz")], "holds no images"),
        (["--trusted", str(mnist_dir), "--inputs", str(tmp_path / "good.npz"), "--layers", "fc1,conv9"],
         "unknown layer name(s) ['conv9']; valid: fc1, fc2, fc3"),
        (["--trusted", str(tmp_path / "good.npz"), "--inputs", str(tmp_path / "good.npz")],
         "too few trusted examples: 200; que needs at least 500"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
