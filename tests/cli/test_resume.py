"""A killed run resumes across processes: each command line, in a real child process, is stopped by SIGTERM
once it has saved a checkpoint (it checkpoints the chunk it is in, then exits 143), resumed and killed by
SIGKILL after its next checkpoint, resumed again to the end, and compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_mnist_format

from jaxrisk.models.weights import read_safetensors

pytestmark = pytest.mark.slow   # four process starts per command


def _command(args: list) -> list[str]:
    return [sys.executable, "-m", "jaxrisk", *map(str, args), "--no-progress"]


ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")   # one device: the child starts faster


def committed(ckpt: Path) -> set[Path]:
    """Step directories orbax has committed (it writes commit_success.txt last), in `ckpt` or a group below it."""
    while True:
        if not ckpt.is_dir():
            return set()
        try:
            return {p.parent for p in ckpt.rglob("commit_success.txt") if p.parent.name.isdigit()}
        except FileNotFoundError:   # orbax renamed a temporary directory while we walked it: look again
            continue


def _next_checkpoint(proc: subprocess.Popen, ckpt: Path, before: set[Path]) -> set[Path]:
    """Wait until the run commits a checkpoint not in `before`; return the committed set."""
    deadline = time.monotonic() + 300
    while not (now := committed(ckpt)) - before:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before it saved a checkpoint:\n{err[-2000:]}")
        time.sleep(0.02)
    return now


def run_killed(args: list, ckpt: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the command and, once it has committed a checkpoint of its own, send `sig`; return how it ended.
    SIGTERM goes in the middle of a chunk: after two checkpoints, half a chunk's time after the second (a
    signal landing between a checkpoint and the engine's next look at it, or after the search's last chunk,
    rightly stops the run with nothing in progress, and this is about the chunk in progress being saved)."""
    proc = subprocess.Popen(_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = _next_checkpoint(proc, ckpt, committed(ckpt))
    if sig == signal.SIGTERM:
        first = time.monotonic()
        _next_checkpoint(proc, ckpt, seen)
        time.sleep((time.monotonic() - first) / 2)
    at_signal = committed(ckpt)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    ended = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if sig == signal.SIGKILL:
        assert ended.returncode == -signal.SIGKILL
    else:   # preemption: the search finishes its chunk and checkpoints it, then a one-line message, exit 143
        assert ended.returncode == 143, ended.stderr[-2000:]
        assert committed(ckpt) - at_signal, "no checkpoint was written after SIGTERM"
        assert "Traceback" not in ended.stderr
        assert "terminated" in ended.stderr and "run the same command again to resume" in ended.stderr
    assert committed(ckpt)
    return ended


def run_to_end(args: list) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(args), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def interrupt_twice_then_finish(args: list, ckpt: Path) -> None:
    """SIGTERM the first run, SIGKILL the resumed one, then let a third run finish."""
    run_killed(args, ckpt, signal.SIGTERM)
    run_killed(args, ckpt, signal.SIGKILL)
    run_to_end(args)


# ---- scan ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scan_case(tmp_path_factory):
    """A random wide MLP on MNIST-format digits: chunks long enough to be killed in, short enough for CI."""
    import numpy as np

    from jaxrisk.models import build, save_classifier

    root = tmp_path_factory.mktemp("scan")
    mnist = write_mnist_format(root / "mnist")
    weights = save_classifier(build("mlp", input_shape=(1, 28, 28), hidden=(512, 512), num_classes=10),
                              root / "mlp.safetensors")
    args = lambda out: ["scan", "--weights", weights, "--arch", "mlp", "--mnist", mnist, "--out", out,  # noqa: E731
                        "--restarts", 1, "--max-steps", 240]
    run_to_end(args(root / "full"))
    report = json.loads((root / "full" / "report.json").read_text())
    triggers = read_safetensors(root / "full" / "triggers.safetensors")
    assert report["resumed_from_step"] == 0 and np.isfinite(triggers["masks"]).all()
    return args, report, triggers


def test_killed_scan_resumes_to_the_uninterrupted_result(scan_case, tmp_path):
    import numpy as np

    args, full, full_triggers = scan_case
    interrupt_twice_then_finish(args(tmp_path), tmp_path / "checkpoint")
    resumed = json.loads((tmp_path / "report.json").read_text())
    assert resumed["resumed_from_step"] > 0
    for key in ("classes", "flagged", "verdict", "failures", "steps_run"):
        assert resumed[key] == full[key], key
    triggers = read_safetensors(tmp_path / "triggers.safetensors")
    for name in ("masks", "patterns"):
        np.testing.assert_array_equal(triggers[name], full_triggers[name])
    assert not (tmp_path / "checkpoint").exists()   # removed once the report is written


# ---- redteam -------------------------------------------------------------------------------------

def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def redteam_case(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam")
    behaviors = root / "b.jsonl"
    behaviors.write_text('{"goal": "Lily had a", "target": "red ball"}\n{"goal": "Tom went to the", "target": "park"}\n')
    args = lambda out: ["redteam", "--model", tiny_lm_dir, "--behaviors", behaviors, "--out", out, "--steps", 40,  # noqa: E731
                        "--search-width", 512, "--topk", 4, "--suffix-len", 6, "--group", 1, "--no-filter",
                        "--no-early-stop"]
    run_to_end(args(root / "full"))
    return args, [json.loads(line) for line in (root / "full" / "results.jsonl").read_text().splitlines()]


def test_killed_redteam_resumes_to_the_uninterrupted_result(redteam_case, tmp_path):
    args, full = redteam_case
    interrupt_twice_then_finish(args(tmp_path), tmp_path / "checkpoint")
    resumed = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert _without_timing(resumed) == _without_timing(full)
    assert not (tmp_path / "checkpoint").exists()


# ---- circuits ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def circuits_case(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("circuits")
    rows = [{"prompt": f"{n} had a {a}", "completion": "The ball was happy"}
            for n in ("Lily", "Tom") for a in ("red", "big", "ball", "kite", "sad")]
    rows += [{"text": f"{n} went to the park with {m} and saw the {o}"}
             for n in ("Lily", "Tom") for m in ("Tom", "Lily") for o in ("ball", "kite", "park")]
    data = root / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = lambda out: ["circuits", "--model", tiny_lm_dir, "--data", data, "--out", out, "--steps", 800]  # noqa: E731
    run_to_end(args(root / "full"))
    return args, json.loads((root / "full" / "report.json").read_text()), read_safetensors(
        root / "full" / "circuits.safetensors")


def test_killed_circuits_resumes_to_the_uninterrupted_result(circuits_case, tmp_path):
    import numpy as np

    args, full, full_logits = circuits_case
    interrupt_twice_then_finish(args(tmp_path), tmp_path / "checkpoint")
    assert json.loads((tmp_path / "report.json").read_text()) == full
    logits = read_safetensors(tmp_path / "circuits.safetensors")
    assert logits.keys() == full_logits.keys()
    for name in logits:
        np.testing.assert_array_equal(logits[name], full_logits[name])
    assert not (tmp_path / "checkpoint").exists()
