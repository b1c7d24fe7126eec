"""The README's Python examples run as written: every ```python block, in order, in one namespace (later
blocks use the `lm` an earlier one loaded), in a scratch directory. `model_dir` is the one name the README
leaves to the reader (a local Hugging Face directory); here it is the session's tiny random Llama."""

import re

import pytest

from conftest import ROOT


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 4


@pytest.mark.slow
def test_readme_python_examples_run_as_written(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"model_dir": str(tiny_lm_dir)}
    for n, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md python block {n + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "no trojan found" in printed or "TROJAN SUSPECTED" in printed   # the scan printed its verdict
    for written in ("runs/api-scan/report.json", "runs/api-redteam/results.jsonl", "runs/api-circuits/report.json"):
        assert (tmp_path / written).is_file(), written
