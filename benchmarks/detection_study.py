"""Detection study: scan every model of a zoo and measure how well the scan separates trojaned from clean.

    jaxrisk zoo --mnist ../shared/assets/data/mnist --out runs/zoo --kinds patch,sparse,checkerboard,blend \
        --archs mnist_cnn                                                  # 8 trojaned + 8 clean
    python benchmarks/detection_study.py --mnist ../shared/assets/data/mnist --zoo runs/zoo --out runs/detection

Per model it records the scan's verdict, and over the zoo: detection AUROC (the statistic is the largest
anomaly index among classes whose norm is below the median, Neural Cleanse's), target-label accuracy
(the flagged class, else the smallest-norm class, is the planted target) and mask overlap (fraction of
the recovered target mask's mass on the planted trigger's pixels). Each model's result is written as soon
as it is done, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from jaxrisk.data import load_mnist
from jaxrisk.evals.metrics import auroc
from jaxrisk.io import write_json
from jaxrisk.models import load_classifier
from jaxrisk.scan import ScanConfig, run as scan
from jaxrisk.zoo import load_trigger


def detection_statistic(classes: list[dict]) -> float:
    norms = np.array([c["l1_norm"] for c in classes])
    below = norms < np.median(norms)
    return float(max((c["anomaly_index"] for c, b in zip(classes, below) if b), default=0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", required=True)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", default="runs/detection")
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--summarize-only", action="store_true", help="summarise the models already scanned")
    args = ap.parse_args()
    data = load_mnist(args.mnist, "test")
    out = Path(args.out)
    rows = []
    infos = [p for p in sorted(Path(args.zoo).glob("*.json")) if "weights" in json.loads(p.read_text())]
    trojaned = [p for p in infos if json.loads(p.read_text())["trojaned"]]
    clean = [p for p in infos if not json.loads(p.read_text())["trojaned"]]
    interleaved = [p for pair in zip(trojaned, clean) for p in pair] + trojaned[len(clean):] + clean[len(trojaned):]
    for info_path in interleaved:  # alternate, so a partial study is still balanced
        info = json.loads(info_path.read_text())
        name = info["name"]
        result_path = out / name / "result.json"
        if args.summarize_only and not result_path.exists():
            continue
        if not result_path.exists():
            t = time.perf_counter()
            result = scan(load_classifier(info_path.with_name(info["weights"]),
                                          info["recipe"].get("arch", "mnist_cnn")), data,
                          ScanConfig(run=ScanConfig().run.replace(restarts=args.restarts, progress=False)), name=name)
            result.write(out / name)
            report = result.report
            row = {"model": name, "trojaned": info["trojaned"], "kind": info.get("kind"),
                   "target": info.get("target"), "clean_accuracy": info["clean_accuracy"],
                   "planted_attack_success": info.get("attack_success"), "flagged": report["flagged"],
                   "statistic": detection_statistic(report["classes"]),
                   "smallest_norm_class": int(np.argmin([c["l1_norm"] for c in report["classes"]])),
                   "seconds": time.perf_counter() - t}
            if info["trojaned"]:
                planted = load_trigger(info_path.with_name(info["trigger"])).mask
                mask = load_file(str(out / name / "triggers.safetensors"))["masks"][info["target"]]
                row["mask_overlap"] = float((mask * (planted > 0)).sum() / mask.sum())
                row["target_norm"] = report["classes"][info["target"]]["l1_norm"]
                row["planted_pixels"] = float((planted > 0).sum())
            write_json(result_path, row)
        rows.append(json.loads(result_path.read_text()))
        print(json.dumps(rows[-1]), flush=True)

    troj = [r for r in rows if r["trojaned"]]
    clean = [r for r in rows if not r["trojaned"]]

    def target_hit(r):
        guess = r["flagged"][0] if len(r["flagged"]) == 1 else r["smallest_norm_class"]
        return guess == r["target"]

    summary = {
        "models": {"trojaned": len(troj), "clean": len(clean)},
        "auroc": auroc([r["statistic"] for r in troj + clean], [True] * len(troj) + [False] * len(clean))
        if troj and clean else None,
        "true_positive_rate": float(np.mean([r["target"] in r["flagged"] for r in troj])) if troj else None,
        "false_positive_rate": float(np.mean([bool(r["flagged"]) for r in clean])) if clean else None,
        "target_label_accuracy": float(np.mean([target_hit(r) for r in troj])) if troj else None,
        "mean_mask_overlap": float(np.mean([r["mask_overlap"] for r in troj])) if troj else None,
        "per_kind": {k: {"detected": int(sum(r["target"] in r["flagged"] for r in troj if r["kind"] == k)),
                         "of": int(sum(r["kind"] == k for r in troj)),
                         "mean_mask_overlap": float(np.mean([r["mask_overlap"] for r in troj if r["kind"] == k]))}
                     for k in sorted({r["kind"] for r in troj})},
        "mean_scan_seconds": float(np.mean([r["seconds"] for r in rows])),
        "meta": {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "command": " ".join(sys.argv)},
    }
    write_json(out / "summary.json", {"summary": summary, "rows": rows})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
