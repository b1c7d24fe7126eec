"""MM-BD's maximum-margin statistic: the ascent reaches the exact optimum where it is known (a linear
classifier: a linear programme), a planted direction is the outlier, and the Gamma p-value is calibrated
under its null."""

import numpy as np
import pytest
from flax import nnx

from jaxrisk.errors import InputError
from jaxrisk.models.classifiers import build, pure_apply
from jaxrisk.scan.margin import MarginConfig, gamma_p_value, max_margins

SHAPE = (1, 6, 6)
K = 10


def linear_model(seed: int, planted: int | None = None):
    """logits = W x + b on 6x6 images; `planted`: that class also gets a strong weight on a 2x2 corner."""
    model = build("mlp", seed=seed, input_shape=SHAPE, hidden=())
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (36, K)).astype(np.float32)
    if planted is not None:
        corner = np.zeros(SHAPE, np.float32)
        corner[0, -2:, -2:] = 1.0
        w[:, planted] += 4.0 * corner.reshape(-1)
    model.fc1.kernel = nnx.Param(w)
    model.fc1.bias = nnx.Param(rng.normal(0, 0.1, K).astype(np.float32))
    return model, w, np.asarray(model.fc1.bias[...])


def lp_max_margin(w, b, c):
    """max over x in [0, 1]^D of min_k (w_c - w_k) x + b_c - b_k: a linear programme in (x, t)."""
    from scipy.optimize import linprog

    d = w.shape[0]
    others = [k for k in range(w.shape[1]) if k != c]
    a_ub = np.array([np.concatenate([-(w[:, c] - w[:, k]), [1.0]]) for k in others])
    b_ub = np.array([b[c] - b[k] for k in others])
    res = linprog(np.concatenate([np.zeros(d), [-1.0]]), A_ub=a_ub, b_ub=b_ub,
                  bounds=[(0, 1)] * d + [(None, None)], method="highs")
    assert res.success
    return -res.fun


def test_ascent_reaches_the_linear_programme_optimum_for_every_class():
    model, w, b = linear_model(0, planted=3)
    graphdef, params = pure_apply(model)
    margins, images = max_margins(graphdef, params, SHAPE, K, MarginConfig(starts=4, steps=300, learning_rate=0.05))
    exact = np.array([lp_max_margin(w, b, c) for c in range(K)])
    assert images.shape == (K, *SHAPE) and images.min() >= 0 and images.max() <= 1
    assert (margins <= exact + 1e-4).all()            # the box holds: never past the true optimum
    # fixed-step projected subgradient ascent zig-zags at the objective's kinks (where two rival classes
    # tie): measured 97.3-99.9% of the optimum at these settings, 97.7-99.9% at 3x the steps and a fifth the step
    assert (margins >= 0.96 * exact).all(), margins / exact
    assert int(np.argmax(margins)) == 3


def test_planted_class_is_the_outlier_and_the_clean_model_is_not():
    for planted, expect_flag in ((3, True), (None, False)):
        model, _, _ = linear_model(1, planted=planted)
        graphdef, params = pure_apply(model)
        margins, _ = max_margins(graphdef, params, SHAPE, K, MarginConfig(starts=4, steps=300, learning_rate=0.05))
        top, p = gamma_p_value(margins)
        assert (p <= 0.05) == expect_flag, (planted, margins.round(2), p)
        if planted is not None:
            assert top == planted and p < 1e-3


@pytest.mark.slow
def test_gamma_p_value_is_calibrated_under_its_null_and_small_for_an_outlier():
    rng = np.random.default_rng(0)
    nulls = [rng.gamma(4.0, 1.5, K) for _ in range(300)]
    fpr = np.mean([gamma_p_value(r)[1] <= 0.05 for r in nulls])
    # 9 points per fit: maximum likelihood is biased at that size, so the nominal 5% is not exact (measured
    # 8-12% over shapes 1-20; the reference's uncensored fit: 22-53%); the scan's threshold is set on a zoo
    assert fpr <= 0.125, fpr
    r = rng.gamma(4.0, 1.5, K)
    r[7] = 4 * r.max()
    top, p = gamma_p_value(r)
    assert top == 7 and p < 1e-3


def test_gamma_p_value_refuses_what_it_cannot_test():
    with pytest.raises(InputError, match="at least 3 finite"):
        gamma_p_value(np.array([1.0, 2.0]))
    with pytest.raises(InputError, match="at least 3 finite"):
        gamma_p_value(np.array([1.0, np.nan, 2.0, 3.0]))
    assert gamma_p_value(np.array([1.0, 1.0, 1.0, 5.0])) == (3, 0.0)
