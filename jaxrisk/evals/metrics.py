"""Detection metrics: AUROC, average precision, true-positive rate at a false-positive rate (higher score =
more likely positive)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from jaxrisk.errors import InputError


def _split(scores, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise InputError(f"{what}: scores {scores.shape} and labels {labels.shape} must be matching vectors")
    if labels.all() or not labels.any():
        raise InputError(f"{what}: needs both positive and negative examples")
    return scores, labels


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U from average ranks: ties count one half)."""
    scores, labels = _split(scores, labels, "auroc")
    ranks = rankdata(scores)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, labels) -> float:
    """Mean over positives of the precision at that positive's score (tied scores enter together)."""
    scores, labels = _split(scores, labels, "average_precision")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]                   # the last row of each group of tied scores
    tp, seen = np.cumsum(y)[last], np.flatnonzero(last) + 1
    new_pos = np.diff(np.r_[0, tp])
    return float(np.sum(new_pos * tp / seen) / y.sum())


def tpr_at_fpr(scores, labels, fpr: float = 0.01) -> float:
    """Fraction of positives scored above the (1 - fpr) quantile of the negatives' scores."""
    scores, labels = _split(scores, labels, "tpr_at_fpr")
    threshold = np.quantile(scores[~labels], 1.0 - fpr, method="higher")
    return float(np.mean(scores[labels] > threshold))
