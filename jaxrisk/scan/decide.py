"""The scan's decision statistics and the one verdict built from them (pure functions of the searches' numbers).

Neural Cleanse flags a class whose trigger norm has a MAD anomaly index above 2 among the ten classes. On
real digit classifiers that flags natural shortcuts (class 2 of most clean MNIST CNNs, index 2.1-2.5), and
it cannot see triggers that are not small masks. The verdict here combines:

- `size_z`, a scale-free size statistic: how far below the other classes a class's log trigger norm lies,
  in units of the other classes' robust spread and of its own spread across restarts (an estimate that two
  restarts disagree on counts for less); `size_ratio`, its norm over the others' median.
- `asymmetry` (after K-Arm, Shen et al. 2021), for the suspects only: a planted all-to-one trigger flips
  every source into the target with a small mask, while getting out of the target to another class takes a
  natural-sized one; a natural feature is about as easy both ways. The median over classes s of
  log(norm of the pair search t -> s) - log(norm of t's all-to-one trigger).
- MM-BD's maximum-margin p-value (`margin.py`): no mask prior, so blended, warped and whole-image triggers.

A class is flagged when its size statistic reaches `DecisionConfig.size_z` (and its size ratio is at most
`DecisionConfig.size_ratio`, no cut by default) and, with the symmetry search on, its asymmetry reaches
`DecisionConfig.asymmetry`; or when it is MM-BD's largest class at p <= alpha.

With scans of clean models of the same architecture as a reference, `reference_statistics` replace the
size and symmetry statistics: a natural shortcut (class 2 of MNIST CNNs, class 8 of small ResNets) is
small in every clean model of the architecture too, a planted trigger only in the trojaned one.
"""

from __future__ import annotations

import numpy as np
from jax.scipy.special import betainc

from jaxrisk.scan.config import DecisionConfig

MAD_CONSISTENCY = 1.4826
ANOMALY_THRESHOLD = 2.0


def mad_anomaly_index(norms: np.ndarray) -> np.ndarray:
    """|x - median| / (1.4826 * median(|x - median|)): a robust z-score."""
    norms = np.asarray(norms, np.float64)
    med = np.median(norms)
    mad = MAD_CONSISTENCY * np.median(np.abs(norms - med))
    return np.abs(norms - med) / max(mad, 1e-12)


def flag_outliers(norms: np.ndarray) -> np.ndarray:
    """Neural Cleanse's rule: anomalously SMALL norms only."""
    norms = np.asarray(norms)
    return (norms < np.median(norms)) & (mad_anomaly_index(norms) > ANOMALY_THRESHOLD)


def size_statistics(norms, restart_norms, *, floor: float = 0.05) -> dict[str, np.ndarray]:
    """Per class: `size_z` (leave-one-out robust z of the log norm, positive = smaller than the others),
    `size_ratio` (norm over the others' median) and `restart_spread` (std of the log norms of the class's
    restarts that succeeded; 0 with fewer than two). `floor` bounds the denominator (a 5% spread) so that
    classes with near-equal norms cannot produce a huge z."""
    logs = np.log(np.maximum(np.asarray(norms, np.float64), 1e-6))
    spread = np.array([np.std(np.log(np.maximum(r, 1e-6))) if len(r) > 1 else 0.0
                       for r in (np.asarray(r, np.float64)[np.isfinite(r)] for r in restart_norms)])
    size_z, ratio = np.zeros(len(logs)), np.zeros(len(logs))
    for c in range(len(logs)):
        others = np.delete(logs, c)
        med = np.median(others)
        mad = MAD_CONSISTENCY * np.median(np.abs(others - med))
        size_z[c] = (med - logs[c]) / max(np.hypot(mad, spread[c]), floor)
        ratio[c] = np.exp(logs[c] - med)
    return {"size_z": size_z, "size_ratio": ratio, "restart_spread": spread}


def reference_statistics(norms, reference_norms, *, floor: float = 0.05) -> dict[str, np.ndarray]:
    """Per class, against clean reference models' scans [n >= 2, classes]: `reference_z`, how far below the
    references' log trigger norm for the same class this model's lies (each model's log norms taken
    relative to its own median, so a model that is harder to flip overall is no suspect), in units of the
    references' pooled spread around their class means x sqrt(1 + 1/n) (the spread a new clean model
    would show); positive = smaller. `reference_p`: its one-sided Student-t p-value (n x classes - classes
    degrees of freedom: few references give wide tails), times the number of classes (Bonferroni: the
    chance that any class of a clean model lies this far out). `reference_ratio`: the norm over the
    references' (geometric) mean."""
    x = np.log(np.maximum(np.asarray(norms, np.float64), 1e-6))
    refs = np.log(np.maximum(np.asarray(reference_norms, np.float64), 1e-6))
    n, k = refs.shape
    x, refs = x - np.median(x), refs - np.median(refs, axis=1, keepdims=True)
    mean = refs.mean(0)
    dof = n * k - k
    spread = np.sqrt(((refs - mean) ** 2).sum() / dof) * np.sqrt(1 + 1 / n)
    z = (mean - x) / max(spread, floor)
    return {"reference_z": z, "reference_p": np.minimum(1.0, k * student_t_tail(z, dof)),
            "reference_ratio": np.exp(x - mean)}


def student_t_tail(t, dof: int) -> np.ndarray:
    """P(T > t) for Student's t with `dof` degrees of freedom (the regularised incomplete beta function)."""
    t = np.asarray(t, np.float64)
    half = 0.5 * np.asarray(betainc(dof / 2.0, 0.5, dof / (dof + t ** 2)), np.float64)
    return np.where(t > 0, half, 1.0 - half)


def asymmetry(forward, reverse) -> float:
    """median over classes of log(reverse norm) - log(forward norm): > 0 when getting into the class is
    easier than getting out of it."""
    forward, reverse = np.asarray(forward, np.float64), np.asarray(reverse, np.float64)
    return float(np.median(np.log(np.maximum(reverse, 1e-6)) - np.log(np.maximum(forward, 1e-6))))


def suspects(size_z: np.ndarray, cfg: DecisionConfig) -> list[int]:
    """Classes whose symmetry is worth a pair search: the largest size statistics at or above
    `cfg.suspect_z` (default: the flagging cut), at most `cfg.max_suspects` of them."""
    cut = cfg.size_z if cfg.suspect_z is None else cfg.suspect_z
    order = np.argsort(-size_z, kind="stable")
    return [int(c) for c in order[: cfg.max_suspects] if size_z[c] >= cut]


def decide(classes: list[dict], margin: dict | None, cfg: DecisionConfig) -> dict[int, list[str]]:
    """{class: the reasons it is flagged} for every flagged class of the report's `classes` entries
    (which carry `size_z` and, for suspects, `asymmetry`; or the reference statistics when clean reference
    scans were given) and MM-BD's result (or None). With the symmetry search on, a class is flagged by
    size only when its asymmetry was measured and passes."""
    reasons: dict[int, list[str]] = {}
    for e in classes:
        if "reference_p" in e:   # clean models of the architecture are the null: size and symmetry step aside
            if e["reference_p"] <= cfg.reference_alpha:
                reasons.setdefault(e["label"], []).append(
                    f"trigger {e['reference_ratio']:.2f}x the clean reference models' norm for this class "
                    f"(reference z {e['reference_z']:.1f}, p-value {e['reference_p']:.2g})")
            continue
        asym = e.get("asymmetry")
        if e["size_z"] < cfg.size_z or e["size_ratio"] > cfg.size_ratio or (
                cfg.symmetry and (asym is None or asym < cfg.asymmetry)):
            continue
        reasons.setdefault(e["label"], []).append(
            f"trigger {e['size_ratio']:.2f}x the other classes' median norm (size z {e['size_z']:.1f}"
            + ("" if asym is None else f"; {np.exp(asym):.1f}x harder to leave than to enter") + ")")
    if margin is not None and margin["flagged"]:
        reasons.setdefault(margin["target"], []).append(
            f"maximum margin {margin['statistics'][margin['target']]:.1f}, p-value {margin['p_value']:.2g}")
    return reasons
