"""Compiled programs outlive the process: a second `jaxrisk scan` of the same model loads every program the
first one compiled (nothing new is written to the cache), and `--no-compile-cache` writes none."""

import os
import subprocess
import sys

import pytest

from jaxrisk.demo import cache_dir, demo_models

pytestmark = pytest.mark.slow   # three child processes


def _scan(cache, out, *extra):
    demo_models(progress=False)
    env = dict(os.environ, JAXRISK_CACHE=str(cache), JAXRISK_COMPILE_CACHE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")   # every program, however fast it compiled
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    weights = cache_dir() / "trojaned.safetensors"
    done = subprocess.run([sys.executable, "-m", "jaxrisk", "scan", "--weights", str(weights), "--arch", "mlp",
                           "--out", str(out), "--no-progress", "--max-steps", "50", *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {p.name for p in (cache / "xla").glob("*")} if (cache / "xla").exists() else set()


def test_second_run_compiles_nothing_new(tmp_path):
    first = _scan(tmp_path / "cache", tmp_path / "a")
    assert len(first) >= 3   # the inversion's and the margin test's programs at least, and their helpers
    assert _scan(tmp_path / "cache", tmp_path / "b") == first


def test_no_compile_cache_writes_none(tmp_path):
    assert _scan(tmp_path / "cache", tmp_path / "a", "--no-compile-cache") == set()
