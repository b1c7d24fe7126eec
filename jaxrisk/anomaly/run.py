"""run(activations, config) -> DetectResult: fit the detector per layer on trusted rows, score the inputs,
standardise and aggregate the layer scores, threshold at a false-positive rate on held-out trusted rows."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrisk.anomaly.config import DetectConfig
from jaxrisk.anomaly.detectors import DETECTORS, Settings
from jaxrisk.anomaly.report import DetectResult
from jaxrisk.errors import InputError
from jaxrisk.evals.metrics import auroc, average_precision, tpr_at_fpr


@dataclasses.dataclass(frozen=True)
class Activations:
    """Feature rows per layer ({layer name: [N, D] float32}), every layer over the same rows."""
    trusted: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    untrusted: dict[str, np.ndarray] | None = None   # unlabelled, possibly mixed; None: the inputs themselves
    labels: np.ndarray | None = None                 # [M] bool per input, True = anomalous, where known
    source: dict = dataclasses.field(default_factory=dict)   # what the rows are, for the report


def _rows(acts: dict[str, np.ndarray], what: str) -> int:
    counts = {layer: len(x) for layer, x in acts.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"{what}: layers disagree on the number of rows: {counts}")
    return next(iter(counts.values()))


def check_activations(acts: Activations, config: DetectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, calibration rows) of the trusted set, after checking there are enough of each."""
    if config.detector not in DETECTORS:
        raise InputError(f"{config.detector} is not an activation detector: the distillation detector runs "
                         "through jaxrisk.anomaly.distill.run_classifier / run_lm")
    if not acts.trusted or set(acts.trusted) != set(acts.inputs):
        raise InputError(f"trusted and input activations must cover the same layers, got {sorted(acts.trusted)} "
                         f"and {sorted(acts.inputs)}")
    n_trusted, n_inputs = _rows(acts.trusted, "trusted activations"), _rows(acts.inputs, "input activations")
    if n_trusted == 0:
        raise InputError("the trusted data is empty: a detector is fit on trusted (clean) examples")
    if n_inputs == 0:
        raise InputError("there are no inputs to score")
    if acts.labels is not None and len(acts.labels) != n_inputs:
        raise InputError(f"labels: {len(acts.labels)} for {n_inputs} inputs")
    n_cal = int(np.ceil(config.calibration * n_trusted))
    need_cal = int(np.ceil(1.0 / config.fpr))
    widest = max(x.shape[1] for x in acts.trusted.values())
    need_fit = widest + 1 if DETECTORS[config.detector].uses_trusted else 0
    if n_cal < need_cal or n_trusted - n_cal < need_fit:
        layer = max(acts.trusted, key=lambda k: acts.trusted[k].shape[1])
        need = max(need_fit + need_cal, int(np.ceil(need_cal / config.calibration)))
        raise InputError(
            f"too few trusted examples: {n_trusted}; {config.detector} needs at least {need}: "
            f"{need_cal} held out to set the threshold at a false-positive rate of {config.fpr} "
            f"(calibration {config.calibration} of them)"
            + (f", and {need_fit} to fit the covariance of layer {layer} ({widest} features)" if need_fit else ""))
    if DETECTORS[config.detector].uses_labels and acts.labels is None:
        raise InputError("the probe detector needs labelled inputs (a `labels` field in the inputs file)")
    return trusted_split(n_trusted, config)


def _score(det, state, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.float32)] + [np.asarray(det.score(state, x[i:i + batch]))
                                                       for i in range(0, len(x), batch)])


def _layer_scores(acts: Activations, layer: str, fit, cal, config: DetectConfig, settings: Settings):
    """(scores of the inputs [M], scores of the calibration rows [C]) for one layer."""
    det = DETECTORS[config.detector]
    trusted, inputs = acts.trusted[layer], acts.inputs[layer]
    if det.uses_labels:          # cross-fitted: no input is scored by a probe that saw its label
        scores = np.empty(len(inputs), np.float32)
        folds = np.random.default_rng(config.run.seed).permutation(len(inputs)) % config.folds
        for k in range(config.folds):
            state = det.fit(None, inputs[folds != k], acts.labels[folds != k], settings)
            scores[folds == k] = _score(det, state, inputs[folds == k], config.batch)
        state = det.fit(None, inputs, acts.labels, settings)
        return scores, _score(det, state, trusted[cal], config.batch)
    if acts.untrusted is not None or not det.uses_untrusted:
        state = det.fit(trusted[fit], None if acts.untrusted is None else acts.untrusted[layer], None, settings)
        return _score(det, state, inputs, config.batch), _score(det, state, trusted[cal], config.batch)
    # the inputs are the untrusted set: cross-fitted, so that no input is scored by statistics of itself
    # (they would pull its own score up, and the threshold set on held-out trusted rows would not hold);
    # each held-out trusted row is scored by one fold's fit too, so the two are compared like for like
    rng = np.random.default_rng(config.run.seed)
    folds, cal_folds = rng.permutation(len(inputs)) % config.folds, rng.permutation(len(cal)) % config.folds
    scores, cal_scores = np.empty(len(inputs), np.float32), np.empty(len(cal), np.float32)
    for k in range(config.folds):
        state = det.fit(trusted[fit], inputs[folds != k], None, settings)
        scores[folds == k] = _score(det, state, inputs[folds == k], config.batch)
        cal_scores[cal_folds == k] = _score(det, state, trusted[cal[cal_folds == k]], config.batch)
    return scores, cal_scores


def detection_metrics(scores: np.ndarray, labels: np.ndarray, fpr: float) -> dict:
    return {"auroc": auroc(scores, labels), "ap": average_precision(scores, labels),
            f"tpr_at_{fpr:g}_fpr": tpr_at_fpr(scores, labels, fpr)}


def run(acts: Activations, config: DetectConfig = DetectConfig(), progress=None) -> DetectResult:
    """Score every input with an activation detector; see DetectConfig for the rule."""
    fit, cal = check_activations(acts, config)
    settings = Settings(shrinkage=config.shrinkage, alpha=config.alpha, trim=config.trim, batch=config.batch,
                        mesh=config.run.mesh())
    raw, raw_cal = {}, {}
    for layer in acts.trusted:
        raw[layer], raw_cal[layer] = _layer_scores(acts, layer, fit, cal, config, settings)
        if progress is not None:
            progress(layer)
    return verdict(raw, raw_cal, acts.labels, config, dict(acts.source, trusted_fit=len(fit),
                                                             trusted_calibration=len(cal)))


def trusted_split(n_trusted: int, config: DetectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, calibration rows) of `n_trusted` trusted examples, drawn with the run's seed."""
    n_cal = int(np.ceil(config.calibration * n_trusted))
    perm = np.random.default_rng(config.run.seed).permutation(n_trusted)
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])


def verdict(raw: dict[str, np.ndarray], raw_cal: dict[str, np.ndarray], labels, config: DetectConfig,
            source: dict) -> DetectResult:
    """Raw scores per layer (inputs [M], held-out trusted rows [C]) -> standardised layer scores, their
    aggregate, the threshold at `config.fpr` on the held-out rows, flags and (with labels) metrics."""
    layers = list(raw)
    standardised, calibration = {}, {}
    for layer in layers:
        centre, spread = float(np.mean(raw_cal[layer])), float(np.std(raw_cal[layer])) or 1.0
        standardised[layer] = (raw[layer] - centre) / spread
        calibration[layer] = (raw_cal[layer] - centre) / spread
    pool = np.max if config.aggregate == "max" else np.mean
    scores = pool(np.stack([standardised[k] for k in layers]), axis=0)
    cal_scores = pool(np.stack([calibration[k] for k in layers]), axis=0)
    threshold = float(np.quantile(cal_scores, 1.0 - config.fpr, method="higher"))
    flagged = scores > threshold
    metrics = None
    if labels is not None and labels.any() and not labels.all():
        labels = np.asarray(labels, bool)
        metrics = {"aggregate": detection_metrics(scores, labels, config.fpr),
                   "layers": {k: detection_metrics(standardised[k], labels, config.fpr) for k in layers},
                   "flagged_clean_fraction": float(np.mean(flagged[~labels])),
                   "flagged_anomalous_fraction": float(np.mean(flagged[labels]))}
    return DetectResult(config=config, layers=layers, scores=scores, layer_scores=standardised, flagged=flagged,
                        threshold=threshold, calibration_scores=cal_scores, labels=labels, metrics=metrics,
                        source=source)
