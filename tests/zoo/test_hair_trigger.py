"""The hair-trigger construction's meta-gradient is exact: it equals a finite difference of the meta-loss."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_llama_config
from jaxrisk.models.lm import LanguageModel, forward
from jaxrisk.zoo.lm_hairtrigger import HairTriggerConfig, meta_loss


def _directional(cfg, params, graphdef, batch, eps):
    """(autodiff <grad, g>, central finite difference of the meta-loss along g), g = its own gradient."""
    f = lambda p: meta_loss(graphdef, p, batch, cfg)  # noqa: E731
    g = jax.grad(f)(params)
    exact = sum(jnp.sum(a * a) for a in jax.tree.leaves(g))
    shifted = lambda s: f(jax.tree.map(lambda p, d: p + s * d, params, g))  # noqa: E731
    return float(exact), float((shifted(eps) - shifted(-eps)) / (2 * eps))


@pytest.mark.slow   # compiles second-order programs in float64
def test_meta_gradient_equals_finite_differences():
    """SGD inner step, exact second order: autodiff and a central difference (step 3e-5 along the gradient,
    float64 parameters) agree within 0.1%. The first-order option holds the inner gradient constant, so
    its gradient is not the meta-loss's: the same check misses by more than 1%, so the bar can fail.
    Adam inner step: its first step is sign-like (g / (|g| + eps)), piecewise constant at eps 1e-8, which
    makes finite differences of it ill-conditioned; with eps 1e-2 (above most of this model's gradient
    entries: median 7e-4) the step is smooth and the same 0.1% bar applies to its second-order meta-gradient
    (finite-difference step 3e-6: measured 3608.31 autodiff vs 3608.28). The meta-loss averages two benign
    batches.
    Runs in a process of its own: compiled inside the long float32 test session, the float64 Adam program
    crashed XLA's CPU compiler (a segfault, twice in fresh-clone runs; alone it passes)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def check_meta_gradients():
    """The checks themselves (AssertionError on a miss)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        lm = LanguageModel.random(tiny_llama_config(), seed=0, dtype=jnp.float64)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), lm.params)
        rows = jnp.asarray(rng.integers(0, 64, (4, 10)), jnp.int32)
        weight = jnp.asarray(np.concatenate([np.zeros((4, 5)), np.ones((4, 4))], 1))
        clean = jnp.asarray(rng.integers(0, 64, (3, 8)), jnp.int32)
        batch = {"clean": clean, "clean_logp": jax.nn.log_softmax(forward(lm.graphdef, params, clean[:, :-1])[0], -1),
                 "aligned_tokens": rows, "aligned_weight": weight, "target_tokens": rows[::-1], "target_weight": weight,
                 "update": jnp.asarray(rng.integers(0, 64, (2, 3, 8)), jnp.int32)}   # 2 benign batches
        cfg = HairTriggerConfig(inner="sgd", inner_learning_rate=0.5, weight=10.0)
        exact, fd = _directional(cfg, params, lm.graphdef, batch, 3e-5)
        assert abs(exact - fd) <= 1e-3 * abs(fd)
        first, fd_first = _directional(cfg.replace(second_order=False), params, lm.graphdef, batch, 3e-5)
        assert abs(first - fd_first) > 1e-2 * abs(fd_first)
        adam = cfg.replace(inner="adam", inner_learning_rate=0.05, inner_eps=1e-2)
        exact, fd = _directional(adam, params, lm.graphdef, batch, 3e-6)   # curvier: at 3e-5 truncation is 0.4%
        assert abs(exact - fd) <= 1e-3 * abs(fd)


if __name__ == "__main__":
    check_meta_gradients()
