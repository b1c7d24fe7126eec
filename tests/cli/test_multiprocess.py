"""Many hosts, simulated with real processes on localhost: 2 processes x 4 CPU devices each (collectives through
gloo) run `jaxrisk scan` and `jaxrisk redteam` as one job, and end with exactly what one process with 8 devices
finds. Also: a two-process run stopped by SIGTERM, each host having written its own shards of the checkpoint,
resumes in a single process to the uninterrupted result (a change of device count on resume is checked in
tests/search/test_engine.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import write_mnist_format

from jaxrisk.models.weights import read_safetensors

pytestmark = pytest.mark.slow   # several process starts per command


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(args: list, *extra) -> list[str]:
    return [sys.executable, "-m", "jaxrisk", *map(str, args), "--no-progress", *map(str, extra)]


def start_job(args: list, processes: int = 2, devices_each: int = 4) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(_command(args, "--coordinator", f"localhost:{port}", "--num-processes", processes,
                                      "--process-id", i),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(devices_each))
            for i in range(processes)]


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Every process's output, read from all of them at once (read one by one, a process whose pipe fills
    would stall until the ones before it end, and make the whole job late)."""
    with ThreadPoolExecutor(len(procs)) as pool:
        outputs = list(pool.map(lambda proc: proc.communicate(timeout=timeout), procs))
    return [subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            for proc, (out, err) in zip(procs, outputs)]


def run_job(args: list) -> None:
    for i, done in enumerate(wait_all(start_job(args))):
        assert done.returncode == 0, f"process {i}:\n{done.stderr[-3000:]}"


def run_single(args: list, devices: int = 8) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(args), capture_output=True, text=True, env=_env(devices), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# ---- scan ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scan_args(tmp_path_factory):
    from jaxrisk.models import build, save_classifier

    root = tmp_path_factory.mktemp("mp-scan")
    mnist = write_mnist_format(root / "mnist", n=200)
    weights = save_classifier(build("mlp", input_shape=(1, 28, 28), hidden=(64,), num_classes=10),
                              root / "mlp.safetensors")
    return lambda out: ["scan", "--weights", weights, "--arch", "mlp", "--mnist", mnist, "--out", out,  # noqa: E731
                        "--restarts", 2, "--max-steps", 60]


def _scan_result(out: Path):
    report = json.loads((out / "report.json").read_text())
    return report, read_safetensors(out / "triggers.safetensors")


@pytest.fixture(scope="module")
def scan_reference(scan_args, tmp_path_factory):
    """The scan by one process with 8 devices."""
    out = tmp_path_factory.mktemp("mp-scan-one")
    run_single(scan_args(out))
    return _scan_result(out)


def _assert_same_scan(result, reference):
    (report, triggers), (ref, ref_triggers) = result, reference
    for key in ("devices", "classes", "flagged", "verdict", "failures", "steps_run"):
        assert report[key] == ref[key], key
    for name in ("masks", "patterns"):
        np.testing.assert_array_equal(triggers[name], ref_triggers[name])


def test_two_processes_scan_like_one_process_with_eight_devices(scan_args, scan_reference, tmp_path):
    run_job(scan_args(tmp_path))
    _assert_same_scan(_scan_result(tmp_path), scan_reference)
    assert not (tmp_path / "checkpoint").exists()


def test_a_preempted_two_process_scan_resumes_in_one_process(scan_args, scan_reference, tmp_path):
    procs = start_job(scan_args(tmp_path))
    deadline = time.monotonic() + 300
    while not (tmp_path / "checkpoint" / "jaxrisk-checkpoint.json").exists():   # the first search has started
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("the job ended before its first search started:\n" + procs[0].communicate()[1][-3000:])
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for i, done in enumerate(wait_all(procs, timeout=300)):   # each stops after the same chunk's checkpoint
        assert done.returncode == 143, f"process {i}:\n{done.stderr[-3000:]}"
        assert "run the same command again to resume" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "report.json").exists()
    # each host wrote the shards of the item table its own devices hold (nobody gathered the table to write it)
    assert {p.name for p in (tmp_path / "checkpoint").rglob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                                                   "ocdbt.process_1"}
    run_single(scan_args(tmp_path))   # resumed by one process (with the same 8 devices)
    resumed = _scan_result(tmp_path)
    assert resumed[0]["resumed_from_step"] > 0
    _assert_same_scan(resumed, scan_reference)


# ---- redteam ---------------------------------------------------------------------------------------

def test_two_processes_redteam_like_one_process_with_eight_devices(tiny_lm_dir, tmp_path):
    behaviors = tmp_path / "b.jsonl"
    behaviors.write_text('{"goal": "Lily had a", "target": "red ball"}\n{"goal": "Tom went to the", "target": "park"}\n'
                         '{"goal": "The cat", "target": "was happy"}\n{"goal": "Tom saw", "target": "a kite"}\n')
    args = lambda out: ["redteam", "--model", tiny_lm_dir, "--behaviors", behaviors, "--out", out,  # noqa: E731
                        "--steps", 12, "--search-width", 64, "--topk", 4, "--suffix-len", 4, "--restarts", 2]
    run_single(args(tmp_path / "one"))
    run_job(args(tmp_path / "two"))
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / d / "results.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert len(rows[0]) == 4 and rows[1] == rows[0]
