"""The detection result: scores.jsonl (one line per input, in input order), report.json (detector,
layers, threshold and its rule, counts, AUROC / AP where labels are known) and scores.png."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrisk.io import atomic_write, json_text, write_json


def rule_text(config) -> str:
    return (f"each layer's score is standardised by its mean and standard deviation on held-out trusted rows "
            f"({config.calibration:g} of the trusted set, not used to fit), the layers are aggregated by their "
            f"{config.aggregate}, and an input is flagged when its aggregate exceeds the {1 - config.fpr:g} "
            f"quantile of the held-out trusted aggregates (a false-positive rate of about {config.fpr:g} on "
            f"clean inputs); higher score = more anomalous")


@dataclasses.dataclass(frozen=True)
class DetectResult:
    config: object
    layers: list[str]
    scores: np.ndarray                    # [M] aggregate per input
    layer_scores: dict[str, np.ndarray]   # {layer: [M]} standardised
    flagged: np.ndarray                   # [M] bool
    threshold: float
    calibration_scores: np.ndarray        # [C] aggregate per held-out trusted row
    labels: np.ndarray | None             # [M] bool where known
    metrics: dict | None
    source: dict

    def report(self) -> dict:
        c = self.config
        return {"detector": c.detector, "layers": self.layers, "aggregate": c.aggregate,
                "threshold": self.threshold, "fpr": c.fpr, "rule": rule_text(c),
                "n_inputs": int(len(self.scores)), "n_flagged": int(self.flagged.sum()),
                "calibration_flagged_fraction": float(np.mean(self.calibration_scores > self.threshold)),
                "metrics": self.metrics, "source": self.source,
                "settings": {"shrinkage": "ledoit-wolf" if c.shrinkage is None else c.shrinkage, "alpha": c.alpha,
                             "trim": c.trim, "calibration": c.calibration, "seed": c.run.seed,
                             **({"distill": dataclasses.asdict(c.distill)} if c.detector == "distillation" else {})}}

    def rows(self) -> list[dict]:
        out = []
        for i in range(len(self.scores)):
            row = {"index": i, "score": float(self.scores[i]), "flagged": bool(self.flagged[i])}
            if self.labels is not None:
                row["label"] = bool(self.labels[i])
            row["layers"] = {k: float(v[i]) for k, v in self.layer_scores.items()}
            out.append(row)
        return out

    def write(self, out_dir: str | Path) -> tuple[Path, Path, Path]:
        """OUT/scores.jsonl, OUT/report.json and OUT/scores.png, each written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        text = "".join(json_text(r) + "\n" for r in self.rows())
        return (atomic_write(out / "scores.jsonl", lambda f: f.write(text)),
                write_json(out / "report.json", self.report()), write_figure(self, out / "scores.png"))


def write_figure(result: DetectResult, path: Path) -> Path:
    """Histograms of the aggregate score: held-out trusted rows, and the inputs (split by label where
    known), with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    groups = [("held-out trusted", result.calibration_scores)]
    if result.labels is None:
        groups.append(("inputs", result.scores))
    else:
        groups += [("inputs, clean", result.scores[~result.labels]),
                   ("inputs, anomalous", result.scores[result.labels])]
    finite = np.concatenate([g for _, g in groups if len(g)])
    finite = finite[np.isfinite(finite)]
    lo, hi = np.quantile(finite, [0.0, 0.995]) if len(finite) else (0.0, 1.0)
    bins = np.linspace(lo, max(hi, result.threshold) + 1e-6, 60)
    for name, values in groups:
        if len(values):
            ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, density=True, alpha=0.5, label=name)
    ax.axvline(result.threshold, color="black", ls="--", lw=1, label=f"threshold (fpr {result.config.fpr:g})")
    title = f"{result.config.detector}: {int(result.flagged.sum())} of {len(result.scores)} inputs flagged"
    if result.metrics is not None:
        title += f", AUROC {result.metrics['aggregate']['auroc']:.3f}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"score ({result.config.aggregate} of standardised layer scores)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path
