"""The distillation-discrepancy detector: near zero where the student was distilled, large elsewhere (the
digits tests train a model: slow tier)."""

import numpy as np
import pytest

from jaxrisk.anomaly.config import DetectConfig, DistillConfig
from jaxrisk.anomaly.distill import classifier_discrepancy, distil_classifier, run_classifier, student_lm
from jaxrisk.data import load_digits
from jaxrisk.errors import InputError
from jaxrisk.models.classifiers import pure_apply
from jaxrisk.zoo import TrainConfig, make_trigger, train_classifier


@pytest.fixture(scope="module")
def digits_backdoor():
    """An MLP on 8x8 digits with a 2x2 corner patch -> class 3 backdoor (10% poisoning)."""
    train, test = load_digits("train"), load_digits("test")
    trigger = make_trigger("patch", train.shape, target=3, size=2, location=(0, 0))
    model = train_classifier(train, TrainConfig(arch="mlp", hidden=(64,), epochs=30, batch_size=32), trigger,
                             progress=False)
    return pure_apply(model), train, test, trigger


@pytest.mark.slow
def test_discrepancy_is_near_zero_on_trusted_data_and_large_outside_it(digits_backdoor):
    (graphdef, params), train, test, trigger = digits_backdoor
    cfg = DistillConfig(steps=1500, hidden=(32,))
    student = distil_classifier(graphdef, params, train.images, cfg)
    held_out = classifier_discrepancy(graphdef, params, student, test.images, cfg)
    noise = np.random.default_rng(0).uniform(size=test.images.shape).astype(np.float32)
    outside = classifier_discrepancy(graphdef, params, student, noise, cfg)
    others = test.images[test.labels != trigger.target]
    triggered = classifier_discrepancy(graphdef, params, student, trigger.apply(others), cfg)
    assert np.median(held_out) < 0.05                      # nats: the student agrees on unseen clean digits
    assert np.median(outside) > 20 * np.median(held_out)
    assert np.median(triggered) > 1.0                      # the model says 3, the student the digit


@pytest.mark.slow
def test_distillation_detector_flags_triggered_inputs(digits_backdoor):
    (graphdef, params), train, test, trigger = digits_backdoor
    others = np.flatnonzero(test.labels != trigger.target)
    labels = np.zeros(len(test.images), bool)
    labels[others[::2]] = True
    inputs = test.images.copy()
    inputs[labels] = trigger.apply(inputs[labels])
    config = DetectConfig(detector="distillation", fpr=0.05, distill=DistillConfig(steps=1500, hidden=(32,)))
    result = run_classifier(graphdef, params, train.images, inputs, config, labels=labels)
    assert result.metrics["aggregate"]["auroc"] > 0.95
    assert result.metrics["flagged_clean_fraction"] < 0.12
    with pytest.raises(InputError, match="too few trusted examples: 50; the distillation detector needs at least 101"):
        run_classifier(graphdef, params, train.images[:50], inputs, config)


def test_language_model_student_starts_as_the_first_blocks(tiny_lm_dir):
    import jax

    from jaxrisk.models import load_pretrained

    lm = load_pretrained(tiny_lm_dir)
    student = student_lm(lm, 1)
    assert student.cfg.n_layers == 1
    flat = dict(jax.tree_util.tree_flatten_with_path(lm.params)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(student.params)[0]:
        np.testing.assert_array_equal(leaf, flat[path])
    with pytest.raises(InputError, match="expected 1..2"):
        student_lm(lm, 3)
