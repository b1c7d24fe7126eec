"""Mechanistic anomaly detection: flag the inputs on which a model runs an anomalous mechanism.

    from jaxrisk.anomaly import DetectConfig, classifier_task, run
    acts = classifier_task(graphdef, params, trusted_images, inputs, layers=("fc1", "fc2"), labels=labels)
    result = run(acts, DetectConfig(detector="que"))      # result.scores, .flagged, .metrics; .write(out)
"""

from jaxrisk.anomaly.config import DetectConfig, DistillConfig
from jaxrisk.anomaly.data import classifier_task, lm_task, read_images, read_texts
from jaxrisk.anomaly.report import DetectResult
from jaxrisk.anomaly.run import Activations, run

__all__ = ["Activations", "DetectConfig", "DetectResult", "DistillConfig", "classifier_task", "lm_task",
           "read_images", "read_texts", "run"]
