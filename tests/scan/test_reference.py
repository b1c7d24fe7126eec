"""`jaxrisk scan --reference`: scans of clean models of the same architecture as the verdict's null. On the
embedded digits: three clean MLPs trained from other seeds are the reference; the planted trigger is
flagged against them, the demo's clean model is not, and bad reference reports are one-line errors."""

import json

import pytest

from jaxrisk.cli import main
from jaxrisk.data import load_digits
from jaxrisk.demo import TARGET, cache_dir, demo_models
from jaxrisk.zoo import TrainConfig, evaluate, save_zoo_model, train_classifier

SETTINGS = ["--arch", "mlp", "--no-progress", "--devices", "1"]


def _scan(weights, out, *extra) -> dict:
    assert main(["scan", "--weights", str(weights), "--out", str(out), *SETTINGS, *extra]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """report.json of three clean digits MLPs (the demo's recipe, seeds 1-3), scanned with the defaults."""
    demo_models(progress=False)
    root = tmp_path_factory.mktemp("reference")
    train, test = load_digits("train"), load_digits("test")
    paths = []
    for seed in (1, 2, 3):
        model = train_classifier(train, TrainConfig(arch="mlp", hidden=(64,), epochs=30, batch_size=32, seed=seed),
                                 None, progress=False)
        save_zoo_model(model, None, root, f"clean{seed}", evaluate(model, test, None))
        _scan(root / f"clean{seed}.safetensors", root / f"scan{seed}")
        paths.append(root / f"scan{seed}" / "report.json")
    return paths


@pytest.mark.slow
def test_planted_trigger_is_flagged_against_clean_references(references, tmp_path):
    report = _scan(cache_dir() / "trojaned.safetensors", tmp_path, "--reference", *map(str, references))
    assert report["flagged"] == [TARGET]
    assert report["reference"]["n"] == 3
    target = report["classes"][TARGET]
    assert target["reference_p"] <= 0.01 and target["reference_ratio"] < 0.5
    assert "clean reference models" in report["verdict"]
    assert "symmetry" not in report   # the reference replaces the symmetry search


def test_clean_model_is_not_flagged_against_clean_references(references, tmp_path):
    report = _scan(cache_dir() / "clean.safetensors", tmp_path, "--reference", *map(str, references))
    assert report["flagged"] == [] and "no trojan found" in report["verdict"]
    assert min(e["reference_p"] for e in report["classes"]) > 0.01


def test_bad_references_are_one_line_errors(references, tmp_path, capsys):
    weights = str(cache_dir() / "trojaned.safetensors")
    other = json.loads(references[0].read_text())
    other["config"]["max_steps"] = 500
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "broken.json").write_text("{not json")
    lenet = json.loads(references[1].read_text())
    lenet["architecture"] = {"name": "LeNet5", "input_shape": [1, 28, 28]}
    (tmp_path / "lenet.json").write_text(json.dumps(lenet))
    cases = [([str(references[0])], "at least 2 clean models"),
             ([str(references[0]), str(tmp_path / "other.json")], "`config.max_steps` is 500"),
             ([str(references[0]), str(tmp_path / "broken.json")], "not a JSON object"),
             ([str(references[0]), str(tmp_path / "absent.json")], "no such file"),
             ([str(references[0]), str(tmp_path / "lenet.json")], "field `architecture`")]
    for paths, expected in cases:
        rc = main(["scan", "--weights", weights, "--out", str(tmp_path / "o"), *SETTINGS, "--reference", *paths])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("jaxrisk: error: ") and expected in err, (paths, err)
        assert len(err.strip().splitlines()) == 1
