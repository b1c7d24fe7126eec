"""Detectors and their statistics on data with known answers."""

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf

from jaxrisk.anomaly import stats
from jaxrisk.anomaly.detectors import DETECTORS, Settings
from jaxrisk.errors import InputError
from jaxrisk.evals.metrics import auroc, average_precision, tpr_at_fpr


def gaussian_rows(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)        # correlated features
    return (rng.normal(size=(n, d)) @ mix.T + 3.0 + shift).astype(np.float32), mix


def test_streaming_moments_equal_the_batch_ones():
    x, _ = gaussian_rows(1000, 16, 0)
    x = x + 1000.0                                   # a large offset: naive float32 sums would cancel
    m = stats.moments(stats.batches(x, 96))          # uneven last batch
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m.mean, x64.mean(0), rtol=1e-7)
    np.testing.assert_allclose(stats.covariance(m), np.cov(x64, rowvar=False), rtol=1e-4, atol=1e-5)


def test_ledoit_wolf_shrinkage_matches_scikit_learn():
    x, _ = gaussian_rows(200, 40, 1)                 # few rows for the dimension: real shrinkage
    m = stats.moments(stats.batches(x, 64))
    ours = stats.ledoit_wolf_shrinkage(m, stats.batches(x, 64))
    _, theirs = ledoit_wolf(x.astype(np.float64))
    assert 0.01 < theirs < 0.99
    assert ours == pytest.approx(theirs, rel=1e-4)


@pytest.mark.parametrize("name,shift", [("mahalanobis", 6.0), ("que", 6.0), ("spectral", 6.0), ("spectre", 6.0)])
def test_a_cluster_shifted_along_a_quiet_direction_is_found(name, shift):
    """Trusted: a correlated Gaussian. Untrusted: more of it plus 10% shifted along the data's
    least-variance direction by `shift` of its standard deviations (6: under 1 of the largest one's)."""
    rows, mix = gaussian_rows(5000, 24, 2)
    trusted, clean = rows[:4000], rows[4000:4900]
    u, s, _ = np.linalg.svd(mix)
    cluster = rows[4900:] + shift * s[-1] * u[:, -1]
    untrusted = np.concatenate([clean, cluster])
    labels = np.r_[np.zeros(900, bool), np.ones(100, bool)]
    det = DETECTORS[name]
    scores = np.asarray(det.score(det.fit(trusted, untrusted, None, Settings()), untrusted))
    assert auroc(scores, labels) > 0.95, name


def test_without_trusted_rows_spectral_signature_needs_a_cluster_that_dominates_the_variance():
    """Tran et al.'s raw form (no trusted rows to whiten by) sees only the top principal direction: the
    poison's shift must be the largest (their regime); along a quiet direction it is blind. SPECTRE without
    trusted rows, its own robust reference, needs a clearer cluster than with them."""
    rows, mix = gaussian_rows(1000, 24, 2)
    u, s, _ = np.linalg.svd(mix)
    labels = np.arange(1000) < 100
    det = DETECTORS["spectral"]
    loud, quiet = rows.copy(), rows.copy()
    loud[labels] += 4.0 * s[0] * u[:, 0]
    quiet[labels] += 6.0 * s[-1] * u[:, -1]
    assert auroc(np.asarray(det.score(det.fit(None, loud, None, Settings()), loud)), labels) > 0.95
    assert auroc(np.asarray(det.score(det.fit(None, quiet, None, Settings()), quiet)), labels) < 0.75
    spectre = DETECTORS["spectre"]
    far = rows.copy()
    far[labels] += 10.0 * s[-1] * u[:, -1]
    assert auroc(np.asarray(spectre.score(spectre.fit(None, far, None, Settings()), far)), labels) > 0.95


def test_probe_is_the_supervised_skyline():
    d = 8
    x, _ = gaussian_rows(600, d, 5)
    labels = np.arange(600) % 3 == 0
    x[labels, 0] += 2.0
    det = DETECTORS["probe"]
    state = det.fit(None, x, labels, Settings())
    assert auroc(np.asarray(det.score(state, x)), labels) > 0.9
    with pytest.raises(InputError, match="both kinds"):
        det.fit(None, x, np.zeros(600, bool), Settings())


def test_metrics_on_known_rankings():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5                 # ties count one half
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx((1 + 2 / 3) / 2)
    scores = np.r_[np.arange(100.0), 1000.0, 50.5]
    labels = np.r_[np.zeros(100, bool), True, True]
    assert tpr_at_fpr(scores, labels, 0.01) == 0.5
    with pytest.raises(InputError, match="both positive and negative"):
        auroc([1, 2], [1, 1])


def test_moments_sharded_over_8_devices_equal_one_device():
    from jaxrisk.mesh import make_mesh

    x, _ = gaussian_rows(1003, 12, 6)                # not a multiple of 8: padded rows must weigh nothing
    one = stats.moments(stats.batches(x, 500), make_mesh(1))
    eight = stats.moments(stats.batches(x, 500), make_mesh(8))
    assert one.count == eight.count == 1003
    np.testing.assert_allclose(eight.mean, one.mean, rtol=1e-6)
    np.testing.assert_allclose(eight.scatter, one.scatter, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(one.scatter, stats.moments(stats.batches(x, 500)).scatter, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["mahalanobis", "que", "spectre"])
def test_a_run_on_8_devices_scores_as_on_one(detector):
    from jaxrisk.anomaly.config import DetectConfig
    from jaxrisk.anomaly.run import Activations, run
    from jaxrisk.search.config import RunConfig

    rows, _ = gaussian_rows(3000, 10, 7)
    labels = np.arange(1000) < 100
    inputs = rows[2000:].copy()
    inputs[labels, 0] += 3.0
    acts = Activations(trusted={"a": rows[:2000], "b": rows[:2000, :5]}, inputs={"a": inputs, "b": inputs[:, :5]},
                       labels=labels)
    results = [run(acts, DetectConfig(detector=detector, batch=512, run=RunConfig(devices=n))) for n in (1, 8)]
    np.testing.assert_allclose(results[1].scores, results[0].scores, rtol=1e-4, atol=1e-4)
    assert results[0].threshold == pytest.approx(results[1].threshold, rel=1e-4)
    assert np.array_equal(results[0].flagged, results[1].flagged)
    assert results[0].metrics["aggregate"]["auroc"] > 0.9


def test_que_on_a_few_untrusted_rows_falls_back_to_mahalanobis():
    rows, _ = gaussian_rows(2005, 12, 8)
    que, maha = DETECTORS["que"], DETECTORS["mahalanobis"]
    few = rows[2000:]                                       # 5 rows, 12 features: no covariance to read
    q = np.asarray(que.score(que.fit(rows[:2000], few, None, Settings()), few))
    m = np.asarray(maha.score(maha.fit(rows[:2000], few, None, Settings()), few))
    np.testing.assert_allclose(q / q.sum(), m / m.sum(), rtol=1e-5)


def test_three_inputs_are_scored_with_the_default_detector():
    """Fewer inputs than cross-fitting folds (and than features): every input still gets a score."""
    from jaxrisk.anomaly.config import DetectConfig
    from jaxrisk.anomaly.run import Activations, run

    rows, _ = gaussian_rows(1003, 6, 9)
    inputs = rows[1000:].copy()
    inputs[0] += 40.0
    result = run(Activations(trusted={"a": rows[:1000]}, inputs={"a": inputs}), DetectConfig())
    assert result.flagged.tolist() == [True, False, False]
