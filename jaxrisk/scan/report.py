"""The scan's result: report.json, the recovered triggers (safetensors) and their figure (PNG)."""

from __future__ import annotations

import dataclasses
import io
import textwrap
from pathlib import Path

import numpy as np

from jaxrisk.io import atomic_write, write_json


@dataclasses.dataclass(frozen=True)
class ScanResult:
    report: dict  # what report.json holds
    masks: np.ndarray  # [K, H, W] the recovered mask of each report entry (class, or pair in pair mode)
    patterns: np.ndarray  # [K, C, H, W]
    margin_images: np.ndarray | None = None  # [classes, C, H, W] each class's maximum-margin image (MM-BD), if run

    @property
    def flagged(self) -> list[int]:
        return self.report["flagged"]

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """OUT/report.json, OUT/triggers.png and OUT/triggers.safetensors (the recovered masks and
        patterns, one row per report entry), each written atomically; returns (json, png)."""
        from safetensors.numpy import save

        out_dir = Path(out_dir)
        arrays = {"masks": np.ascontiguousarray(self.masks, np.float32),
                  "patterns": np.ascontiguousarray(self.patterns, np.float32)}
        if self.margin_images is not None:
            arrays["max_margin_images"] = np.ascontiguousarray(self.margin_images, np.float32)
        atomic_write(out_dir / "triggers.safetensors", lambda f: f.write(save(arrays)), mode="wb")
        json_path = write_json(out_dir / "report.json", self.report)
        png_path = atomic_write(out_dir / "triggers.png", lambda f: f.write(_trigger_figure(self)), mode="wb")
        return json_path, png_path


def per_target(pairs: list[dict]) -> list[dict]:
    by_target: dict[int, dict] = {}
    for e in pairs:
        if e["label"] not in by_target or e["l1_norm"] < by_target[e["label"]]["l1_norm"]:
            by_target[e["label"]] = e
    return [dict(by_target[t]) for t in sorted(by_target)]


def verdict(entries: list[dict], reasons: dict[int, list[str]], pairs: bool) -> str:
    """One line: what is flagged and why (`reasons`: {class: why}; in pair mode the flagged pairs speak)."""
    if not reasons:
        return "no class stands out from the others: no trojan found"
    if pairs:
        parts = [f"{e['source']} -> {e['label']} (trigger L1 {e['l1_norm']:.1f} px, anomaly index "
                 f"{e['anomaly_index']:.1f}, attack success {100 * e['attack_success']:.0f}%)"
                 for e in entries if e["flagged"]]
    else:
        parts = [f"class {t}: " + "; ".join(why) for t, why in sorted(reasons.items())]
    return "TROJAN SUSPECTED: " + "; ".join(parts)


def _trigger_figure(result: ScanResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = result.report
    entries = report.get("pairs") or report["classes"]
    masks, patterns = result.masks, result.patterns
    if "pairs" in report:  # one column per target: its smallest pair
        pick = [min((i for i, e in enumerate(entries) if e["label"] == t), key=lambda i: entries[i]["l1_norm"])
                for t in sorted({e["label"] for e in entries})]
        entries, masks, patterns = [entries[i] for i in pick], masks[pick], patterns[pick]
    n = len(entries)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.2), squeeze=False)
    for k, e in enumerate(entries):
        shown = masks[k][None] * patterns[k]
        for row, img, cmap in ((0, masks[k], "viridis"), (1, np.moveaxis(shown, 0, -1).squeeze(-1)
                                                           if shown.shape[0] == 1 else np.moveaxis(shown, 0, -1),
                                                           "gray")):
            ax = axes[row, k]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if e["flagged"]:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red"), spine.set_linewidth(3)
        axes[0, k].set_title(f"{e['label']}{' FLAGGED' if e['flagged'] else ''}\nL1 {e['l1_norm']:.1f}",
                             fontsize=8, color="red" if e["flagged"] else "black")
        lines = [f"idx {e['anomaly_index']:.1f}"] + [f"{name} {e[key]:.1f}" for key, name in (
            ("size_z", "size z"), ("asymmetry", "asym"), ("reference_z", "ref z"), ("max_margin", "margin"))
            if key in e]
        axes[1, k].set_xlabel("\n".join(lines), fontsize=7)
    axes[0, 0].set_ylabel("mask", fontsize=8)
    axes[1, 0].set_ylabel("mask x pattern", fontsize=8)
    fig.suptitle(textwrap.fill(report["verdict"], 120), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
