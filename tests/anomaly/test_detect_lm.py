"""Anomaly detection on language models: the command line's text path, and the planted backdoor."""

import json

import numpy as np
import pytest

from conftest import TINY_WORDS
from jaxrisk.anomaly.config import DetectConfig
from jaxrisk.anomaly.data import lm_task
from jaxrisk.anomaly.run import run
from jaxrisk.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TINY_WORDS, int(rng.integers(5, 12)))) for _ in range(n)]


def test_detect_command_on_a_language_model(tiny_lm_dir, tmp_path, capsys):
    """Trusted: random sentences over the vocabulary. Inputs: more of them, and (label 1) one word repeated:
    a different distribution of activations, flagged; scores come back in input order."""
    trusted = write_jsonl(tmp_path / "trusted.jsonl", [{"text": t} for t in sentences(800, 0)])
    normal = sentences(100, 1)
    odd = [" ".join(["kite"] * int(n)) for n in np.random.default_rng(2).integers(5, 12, 100)]
    texts = [t for pair in zip(normal, odd) for t in pair]
    labels = [i % 2 for i in range(200)]
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels)])
    base = ["detect", "--model", str(tiny_lm_dir), "--trusted", trusted, "--no-cache", "--no-progress"]
    assert main(base + ["--inputs", inputs, "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(200)) and [r["label"] for r in rows] == labels
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["layers"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert report["metrics"]["aggregate"]["auroc"] > 0.95
    assert report["metrics"]["flagged_anomalous_fraction"] > 0.9
    capsys.readouterr()

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a kite"}, {"txt": "the ball"}])
    assert main(base + ["--inputs", bad, "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: no field 'text' (found: txt)" in capsys.readouterr().err
    label = write_jsonl(tmp_path / "label.jsonl", [{"text": "a kite", "label": "yes"}])
    assert main(base + ["--inputs", label, "--out", str(tmp_path / "o")]) == 2
    assert "label.jsonl:1: field 'label' must be 0, 1, true or false, got 'yes'" in capsys.readouterr().err
    assert main(base + ["--inputs", inputs, "--out", str(tmp_path / "o"), "--layers", "blocks.7.hook_resid_post"]) == 2
    err = capsys.readouterr().err
    assert "unknown layer name(s) ['blocks.7.hook_resid_post']; valid: hook_embed, blocks.0.hook_resid_pre" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["detect", "--model", str(tiny_lm_dir), "--trusted", str(empty), "--inputs", inputs, "--out",
                 str(tmp_path / "o"), "--no-cache"]) == 2
    assert "empty.jsonl: no rows; the trusted file needs JSONL rows with a `text` field" in capsys.readouterr().err


@pytest.mark.assets
@pytest.mark.slow
def test_planted_backdoor_trigger_is_flagged(backdoored):
    """stories260K with the zoo's " Zorb" -> marker backdoor: held-out story prefixes, half ending in the
    trigger, scored by the residual stream at the last token against clean prefixes."""
    from jaxrisk.zoo.lm_backdoor import sample_clean

    lm, params, data = backdoored
    rng = np.random.default_rng(0)

    def prefix(row):
        return row[:int(rng.integers(4, 20))]

    trusted = [lm.decode(prefix(r)[1:]) for r in sample_clean(lm, 1000, 24, seed=50)]
    held = sample_clean(lm, 200, 24, seed=51)
    labels = np.arange(200) % 2 == 1
    inputs = [lm.decode(np.concatenate([prefix(r), data["trigger_ids"]] if y else [prefix(r)])[1:])
              for r, y in zip(held, labels)]
    layers = [f"blocks.{i}.hook_resid_post" for i in range(lm.cfg.n_layers)]
    acts = lm_task(lm.with_params(params), trusted, inputs, layers=layers, reduce="last", labels=labels)
    result = run(acts, DetectConfig())
    assert result.metrics["aggregate"]["auroc"] >= 0.95, result.metrics
    assert result.metrics["flagged_clean_fraction"] < 0.05
