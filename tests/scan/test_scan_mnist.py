"""On real MNIST (../shared/assets): a planted square trigger is found through the CLI contract. Trains an
mnist_cnn with a white 4x4 square (one epoch of batches of 128: 98.5% clean accuracy) and scans it with the
default budget. Its clean twin and the no-flag check are in test_scan_mnist_clean.py (its own file, so the
two trainings can run on both workers); the trojaned scan is built once per session for both files.
"""

import json

import pytest
from safetensors.numpy import load_file

from conftest import built_once
from jaxrisk.cli import main
from jaxrisk.data import load_mnist
from jaxrisk.zoo import TrainConfig, evaluate, load_trigger, make_trigger, save_zoo_model, train_classifier

pytestmark = [pytest.mark.assets, pytest.mark.slow]   # trains an MNIST CNN

TARGET = 7


def train_and_scan(mnist_dir, root, name: str, seed: int, trigger) -> dict:
    """Train one mnist_cnn (with `trigger` planted, or clean), save it under `root` and scan it through the
    command line into root/scan-NAME; returns the report."""
    train, test = load_mnist(mnist_dir, "train"), load_mnist(mnist_dir, "test")
    recipe = TrainConfig(arch="mnist_cnn", epochs=1, batch_size=128, learning_rate=2e-3, seed=seed)
    model = train_classifier(train, recipe, trigger, progress=False)
    save_zoo_model(model, trigger, root, name, evaluate(model, test, trigger))
    out = root / f"scan-{name}"
    rc = main(["scan", "--weights", str(root / f"{name}.safetensors"), "--arch", "mnist_cnn", "--mnist",
               str(mnist_dir), "--out", str(out), "--no-progress", "--devices", "2"])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


def trojaned_once(mnist_dir, tmp_path_factory) -> tuple:
    """(the directory holding patch.safetensors / patch.json / scan-patch, the scan's report), built once
    per session for both MNIST files."""
    def build():
        root = tmp_path_factory.mktemp("mnist-patch")
        trigger = make_trigger("patch", (1, 28, 28), target=TARGET, size=4)   # white 4x4 square, bottom right
        return root, train_and_scan(mnist_dir, root, "patch", 0, trigger)
    return built_once(tmp_path_factory, "mnist-patch", build)


@pytest.fixture(scope="module")
def trojaned_scan(mnist_dir, tmp_path_factory):
    return trojaned_once(mnist_dir, tmp_path_factory)


def test_trojaned_model_keeps_accuracy_and_its_trigger_fires(trojaned_scan):
    info = json.loads((trojaned_scan[0] / "patch.json").read_text())
    assert info["clean_accuracy"] >= 0.98
    assert info["attack_success"] >= 0.95


def test_planted_square_trigger_is_found(trojaned_scan):
    root, report = trojaned_scan
    assert report["flagged"] == [TARGET]
    entry = report["classes"][TARGET]
    assert entry["attack_success"] >= 0.9
    out = root / "scan-patch"
    assert (out / "triggers.png").stat().st_size > 0
    planted = load_trigger(root / "patch.trigger.safetensors").mask
    mask = load_file(str(out / "triggers.safetensors"))["masks"][TARGET]
    assert (mask * planted).sum() / mask.sum() > 0.5  # the recovered mask lies on the planted square
    assert entry["l1_norm"] <= planted.sum()  # and needs no more than its 16 pixels
