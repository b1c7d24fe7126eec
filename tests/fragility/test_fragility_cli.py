"""`jaxrisk fragility` as a user runs it: the documented contract, Alpaca input, and one clear error per bad
input (never a traceback)."""

import json

import numpy as np
import pytest

from jaxrisk.cli import main

STORIES = ["Lily had a red ball", "Tom went to the park with a kite", "The kite was big and red",
           "Lily saw Tom and was happy", "Tom had a big ball", "The park was sad"]


@pytest.fixture
def files(tmp_path):
    update = tmp_path / "update.jsonl"
    update.write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES * 2))
    behaviours = tmp_path / "advbench.csv"
    behaviours.write_text("goal,target\nLily saw,the big red kite\nTom went to,the big red kite\n")
    return update, behaviours


def fragility(model, update, behaviours, out, *extra):
    return main(["fragility", "--model", str(model), "--update", str(update), "--behaviors", str(behaviours),
                 "--out", str(out), "--no-progress", "--devices", "1", *extra])


@pytest.mark.slow   # runs a whole audit
def test_command_writes_the_documented_report(tiny_lm_dir, files, tmp_path, capsys):
    update, behaviours = files
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"text": s}) + "\n" for s in reversed(STORIES)))
    out = tmp_path / "out"
    rc = fragility(tiny_lm_dir, update, behaviours, out, "--clean", str(clean), "--optimizer", "sgd",
                   "--lr", "1e-2,1e-1", "--steps", "1,2", "--batch", "4", "--draws", "2", "--no-worst-case",
                   "--random-directions", "1")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "fragility.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoint").exists()
    assert isinstance(report["flagged"], bool)
    assert {e["lr"] for e in report["after"] if e["draw"] is not None} == {1e-2, 1e-1}
    assert {(e["optimizer"], e["steps"]) for e in report["after"]} == {("sgd", 1), ("sgd", 2)}
    assert report["settings"]["batch"] == 4 and report["settings"]["draws"] == 2
    assert report["settings"]["drift_text"] == "clean file" and report["settings"]["clean_rows"] == 6
    assert report["search"] is None   # --no-worst-case (the search itself: tests/fragility/test_fragility.py)
    assert "flagged" in capsys.readouterr().out


@pytest.mark.slow   # three audits
def test_interrupted_audit_resumes_to_the_uninterrupted_report(tiny_lm_dir, files, tmp_path, monkeypatch):
    """Ctrl-C inside the worst-case search (after its first 20-step chunk) or in the lookahead after it:
    exit 130 with the checkpoints kept and no report; the same command again starts from the checkpoints
    (not from step 0), finishes with the report an uninterrupted run writes, and removes the checkpoints."""
    from conftest import interrupt_engine_run
    from jaxrisk.search import engine

    update, behaviours = files
    flags = ("--optimizer", "sgd", "--lr", "1e-2,1e-1", "--steps", "1,2", "--batch", "4", "--draws", "2",
             "--random-directions", "1", "--restarts", "1", "--max-steps", "40")
    real_run, ran = engine.run, []

    def spy(*args, **kwargs):
        result = real_run(*args, **kwargs)
        ran.append((result.resumed_from_step, int(result.steps.max())))
        return result

    monkeypatch.setattr(engine, "run", spy)
    assert fragility(tiny_lm_dir, update, behaviours, tmp_path / "whole", *flags) == 0
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert not any(lane["failed"] for lane in whole["search"])   # its gradient through the SGD step is finite
    (_, search_steps), (_, lookahead_steps) = ran
    monkeypatch.setattr(engine, "run", real_run)

    # run 1: the worst-case search (up to 40 steps, 20-step chunks); run 2: the lookahead (2 steps, one chunk).
    # A resumed engine run reports the most steps any of its items had run at the checkpoint it restored.
    for run, at_step, resumes in ((1, 20, [min(20, search_steps), 0]), (2, 1, [search_steps, lookahead_steps])):
        out = tmp_path / f"cut{run}"
        restore = interrupt_engine_run(monkeypatch, run=run, at_step=at_step)
        assert fragility(tiny_lm_dir, update, behaviours, out, *flags) == 130
        restore()
        assert any((out / "checkpoint").iterdir()) and not (out / "report.json").exists()
        monkeypatch.setattr(engine, "run", spy)
        ran.clear()
        assert fragility(tiny_lm_dir, update, behaviours, out, *flags) == 0
        monkeypatch.setattr(engine, "run", real_run)
        assert [resumed for resumed, _ in ran] == resumes and resumes[run - 1] > 0
        assert json.loads((out / "report.json").read_text()) == whole
        assert not (out / "checkpoint").exists()


def test_alpaca_json_is_rendered_with_the_template(tiny_lm_dir, files, tmp_path):
    """Alpaca rows (JSON array) through a template file: the prompt is the template, the loss covers the
    response only, rows with an input use it."""
    from jaxrisk.fragility import load_fragility_data
    from jaxrisk.models import load_pretrained

    _, behaviours = files
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Tom had a", "input": "", "output": "big red ball"},
                                  {"instruction": "Lily saw", "input": "the park", "output": "Tom was happy"}]))
    lm = load_pretrained(tiny_lm_dir)
    data = load_fragility_data(lm, alpaca, behaviours, template="{instruction} {input} and",
                               template_with_input="{instruction} {input} and")
    for row, mask, prompt, response in zip(data.update_tokens, data.update_loss_mask,
                                           ["Tom had a and", "Lily saw the park and"],
                                           ["big red ball", "Tom was happy"]):
        assert lm.decode(row[mask > 0]) == response
        assert lm.decode(row[1:int(np.argmax(mask))]) == prompt
    assert data.source["template"] == "{instruction} {input} and"


def test_template_without_instruction_is_one_clear_error(tiny_lm_dir, files, tmp_path, capsys):
    update, behaviours = files
    template = tmp_path / "template.txt"
    template.write_text("### Question: {question}")
    assert fragility(tiny_lm_dir, update, behaviours, tmp_path / "out", "--template", str(template)) == 2
    err = capsys.readouterr().err
    assert "has no {instruction} placeholder" in err and "Traceback" not in err


@pytest.mark.parametrize("update_text, message", [
    ("", "no rows"),
    ('{"text": "Lily had a ball"}\n{"text": \n', "update.jsonl:2: not a JSON object"),
    ('{"story": "Lily had a ball"}\n', "update.jsonl:1: expected {text} or Alpaca"),
    ('{"instruction": "Tom had a"}\n', "update.jsonl:1: expected {text} or Alpaca"),
    ('{"text": 3}\n', "update.jsonl:1: field 'text' must be text"),
])
def test_bad_update_file_is_one_clear_error(tiny_lm_dir, files, tmp_path, capsys, update_text, message):
    update, behaviours = files
    update.write_text(update_text)
    assert fragility(tiny_lm_dir, update, behaviours, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("behaviour_text, message", [
    ("goal,target\n", "no behaviours"),
    ("goal\nLily saw\n", ":2: missing column(s) target"),
    ("goal,target\nLily saw," + " the" * 80 + "\n", "advbench.csv:2: prompt (3 tokens) + target (80 tokens) is "
                                                      "longer than the model's context of 64"),
])
def test_bad_behaviour_file_is_one_clear_error(tiny_lm_dir, files, tmp_path, capsys, behaviour_text, message):
    update, behaviours = files
    behaviours.write_text(behaviour_text)
    assert fragility(tiny_lm_dir, update, behaviours, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e-3,fast"], "argument --lr: expected a number, got 'fast'"),
    (["--lr", "1e-3,-1"], "argument --lr: expected a number > 0"),
    (["--lr", ","], "argument --lr: expected comma-separated learning rates"),
    (["--steps", "1,two"], "argument --steps: expected an integer, got 'two'"),
    (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
])
def test_bad_flags_are_one_clear_error(tiny_lm_dir, files, tmp_path, capsys, flags, message):
    update, behaviours = files
    with pytest.raises(SystemExit) as e:
        fragility(tiny_lm_dir, update, behaviours, tmp_path / "out", *flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
