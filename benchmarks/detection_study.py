"""Detection study: scan every model of a zoo and measure how well the scan separates trojaned from clean.

    jaxrisk zoo --mnist ../shared/assets/data/mnist --out runs/zoo40 --trojaned 27 --clean 16 --max-epochs 6
    python benchmarks/detection_study.py --mnist ../shared/assets/data/mnist --zoo runs/zoo40 --out runs/study40

Every model meeting the zoo's bar (clean accuracy >= 98%, attack success >= 95%) is scanned once with the
default statistics (Neural Cleanse inversion, MM-BD maximum margin, symmetry search); the symmetry search
is run for the 3 largest size statistics of every model (the default runs it for those at or above the
flagging cut only), which changes no verdict but lets the study report the asymmetry of clean models too.
From the same searches it scores seven rules: Neural Cleanse's rule (MAD index > 2), the size statistic
alone, size and symmetry, MM-BD alone, the combined verdict (the default), a candidate (the combined
verdict with a size-ratio cut of 0.25, chosen after the study: unvalidated) and the clean-reference verdict
(`jaxrisk scan --reference`: each model against the other clean models of its architecture in the zoo,
leave one out; reference p-value <= 0.01, or MM-BD); per rule: AUROC of its score, true-positive rate at
5% false positives, false-positive rate at its default threshold, detection on the true target
(all-to-all models: any flag), target-label accuracy, per trigger kind and architecture. Each model's
result is written as soon as it is done, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from jaxrisk.data import load_mnist
from jaxrisk.evals.metrics import auroc
from jaxrisk.io import write_json
from jaxrisk.models import load_classifier
from jaxrisk.scan import DecisionConfig, MarginConfig, ScanConfig, run as scan
from jaxrisk.scan.decide import reference_statistics

DEFAULT = DecisionConfig()
RATIO_CUT = 0.25   # a candidate extra cut on the size ratio, chosen after the whole study: not yet validated


def rule_scores(row: dict) -> dict[str, np.ndarray]:
    """Per rule, a score per class that reaches 1 exactly where the rule flags the class."""
    classes = row["classes"]
    index = np.array([c["anomaly_index"] for c in classes])
    norms = np.array([c["l1_norm"] for c in classes])
    nc = np.where(norms < np.median(norms), index / 2.0, 0.0)                 # flagged above 2, smaller half only
    size = np.array([c["size_z"] / DEFAULT.size_z for c in classes])
    symmetric = np.array([min(c["size_z"] / DEFAULT.size_z, c["asymmetry"] / DEFAULT.asymmetry)
                          if "asymmetry" in c else 0.0 for c in classes])
    ratio = np.array([RATIO_CUT / c["size_ratio"] for c in classes])          # 1 at the cut
    margin = np.zeros(len(classes))
    m = row["max_margin"]
    margin[m["target"]] = np.log(max(m["p_value"], 1e-300)) / np.log(m["alpha"])   # 1 at p = alpha
    scores = {"neural_cleanse": nc, "size": size, "size_and_symmetry": symmetric, "max_margin": margin,
              "combined": np.maximum(symmetric, margin),
              f"combined_ratio_{RATIO_CUT}": np.maximum(np.minimum(symmetric, ratio), margin)}
    if "reference_p" in classes[0]:   # 1 at p = alpha
        p = np.maximum([c["reference_p"] for c in classes], 1e-300)
        scores["clean_reference"] = np.maximum(np.log(p) / np.log(DEFAULT.reference_alpha), margin)
    return scores


def with_reference(rows: list[dict]) -> list[dict]:
    """Each row with `classes[].reference_z / reference_p` against the other clean models of its
    architecture (leave one out: a clean model is never its own reference), as `jaxrisk scan --reference`
    would compute them."""
    out = []
    for r in rows:
        refs = [[c["l1_norm"] for c in q["classes"]] for q in rows
                if not q["trojaned"] and q["arch"] == r["arch"] and q["model"] != r["model"]]
        r = json.loads(json.dumps(r))
        if len(refs) >= 2:
            against = reference_statistics([c["l1_norm"] for c in r["classes"]], refs)
            for k, c in enumerate(r["classes"]):
                c.update({name: float(values[k]) for name, values in against.items()})
        out.append(r)
    return out


def summarise(rows: list[dict]) -> dict:
    rows = with_reference(rows)
    troj = [r for r in rows if r["trojaned"]]
    clean = [r for r in rows if not r["trojaned"]]
    out = {}
    rules = ["neural_cleanse", "size", "size_and_symmetry", "max_margin", "combined", f"combined_ratio_{RATIO_CUT}"]
    if all("reference_p" in r["classes"][0] for r in rows):
        rules.append("clean_reference")
    every = [rule_scores(r) for r in troj + clean]
    for rule in rules:
        scores = [s[rule] for s in every]
        top = [float(s.max()) for s in scores]
        flags = [set(np.flatnonzero(s >= 1.0).tolist()) for s in scores]
        hit = [bool(f) if r["target"] < 0 else r["target"] in f for r, f in zip(troj, flags)]
        guess = [int(np.argmax(s)) for s in scores[:len(troj)]]
        clean_top = sorted(top[len(troj):])
        cut = clean_top[int(np.ceil(0.95 * len(clean_top))) - 1] if clean_top else np.inf   # 5% FPR threshold
        out[rule] = {
            "auroc": auroc(top, [True] * len(troj) + [False] * len(clean)) if troj and clean else None,
            "tpr_at_5pct_fpr": float(np.mean([t > cut for t in top[:len(troj)]])) if troj else None,
            "flagged_on_target": f"{sum(hit)}/{len(troj)}",
            "clean_flagged": f"{sum(bool(f) for f in flags[len(troj):])}/{len(clean)}",
            "target_label_accuracy": float(np.mean([g == r["target"] for g, r in zip(guess, troj)
                                                    if r["target"] >= 0])),
            "per_kind": _per(troj, hit, "kind"),
            "per_arch": _per(troj, hit, "arch"),
            "clean_flagged_per_arch": _per(clean, [bool(f) for f in flags[len(troj):]], "arch"),
        }
    return out


def _per(rows, hits, key) -> dict[str, str]:
    return {v: f"{sum(h for r, h in zip(rows, hits) if r[key] == v)}/{sum(r[key] == v for r in rows)}"
            for v in sorted({r[key] for r in rows})}


def study_row(info: dict, report: dict, seconds: float) -> dict:
    """What the summary needs from one model's scan (the full report is written beside it)."""
    keep = ("label", "l1_norm", "anomaly_index", "size_z", "size_ratio", "restart_spread", "attack_success",
            "min_source_success", "max_margin", "asymmetry")
    return {"model": info["name"], "trojaned": info["trojaned"], "kind": info["recipe"].get("kind") or "clean",
            "arch": info["recipe"].get("arch", "mnist_cnn"),
            "target": info["recipe"]["target"] if info["trojaned"] else None,
            "clean_accuracy": info["clean_accuracy"], "planted_attack_success": info.get("attack_success"),
            "flagged": report["flagged"], "neural_cleanse_flagged": report["decision"]["neural_cleanse_flagged"],
            "classes": [{k: c[k] for k in keep if k in c} for c in report["classes"]],
            "symmetry": report.get("symmetry", {}),
            "max_margin": {k: report["max_margin"][k] for k in ("target", "p_value", "alpha", "flagged")},
            "seconds": seconds, "seconds_by_search": report["seconds_by_search"], "device": report["devices"]}


def markdown_rows(rows: list[dict]) -> str:
    """The per-model table of BENCHMARKS.md: verdict flags, Neural Cleanse's flags, the largest size
    statistic's class (z / ratio / asymmetry), MM-BD's largest class with its p-value and the
    clean-reference verdict's flags."""
    lines = ["| model | planted target | verdict flags | Neural Cleanse flags | class of largest size z: z / ratio "
             "/ asymmetry | MM-BD p (class) | clean-reference flags |", "| --- | --- | --- | --- | --- | ---: | --- |"]
    for r in sorted(with_reference(rows), key=lambda r: (not r["trojaned"], r["model"])):
        top = max(r["classes"], key=lambda c: c["size_z"])
        asym = f"{top['asymmetry']:.2f}" if "asymmetry" in top else "-"
        target = "-" if not r["trojaned"] else "all-to-all" if r["target"] < 0 else r["target"]
        scores = rule_scores(r)
        flags = np.flatnonzero(scores["combined"] >= 1.0).tolist()
        against = np.flatnonzero(scores["clean_reference"] >= 1.0).tolist() if "clean_reference" in scores else "-"
        m = r["max_margin"]
        lines.append(f"| {r['model']} | {target} | {flags} | {r['neural_cleanse_flagged']} | {top['label']}: "
                     f"{top['size_z']:.1f} / {top['size_ratio']:.2f} / {asym} | {m['p_value']:.2g} ({m['target']}) "
                     f"| {against} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", required=True)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", default="runs/study")
    default = ScanConfig()
    ap.add_argument("--restarts", type=int, default=default.run.restarts, help="inversion lanes per class")
    ap.add_argument("--max-steps", type=int, default=default.run.max_steps, help="steps per inversion lane")
    ap.add_argument("--batch-size", type=int, default=default.inversion.batch_size, help="images per inversion step")
    ap.add_argument("--margin-starts", type=int, default=default.margin.starts, help="MM-BD random starts per class")
    ap.add_argument("--margin-steps", type=int, default=default.margin.steps, help="MM-BD ascent steps")
    ap.add_argument("--summarize-only", action="store_true", help="summarise the models already scanned")
    ap.add_argument("--markdown", action="store_true", help="also print the per-model table as markdown")
    args = ap.parse_args()
    data = load_mnist(args.mnist, "test")
    out = Path(args.out)
    infos = [json.loads(p.read_text()) | {"path": p} for p in sorted(Path(args.zoo).glob("*.json"))]
    infos = [i for i in infos if "weights" in i]
    excluded = [i["name"] for i in infos if not i.get("meets_bar")]
    infos = [i for i in infos if i.get("meets_bar")]
    trojaned, clean = [i for i in infos if i["trojaned"]], [i for i in infos if not i["trojaned"]]
    interleaved = [i for pair in zip(trojaned, clean) for i in pair] + trojaned[len(clean):] + clean[len(trojaned):]
    config = ScanConfig(run=default.run.replace(restarts=args.restarts, max_steps=args.max_steps, progress=False),
                        inversion=dataclasses.replace(default.inversion, batch_size=args.batch_size),
                        margin=MarginConfig(starts=args.margin_starts, steps=args.margin_steps),
                        decision=DecisionConfig(suspect_z=-1e9))   # asymmetry of the top 3 classes, always
    rows = []
    for info in interleaved:  # alternate, so a partial study is still balanced
        result_path = out / info["name"] / "row.json"
        if not result_path.exists():
            if args.summarize_only:
                continue
            t = time.perf_counter()
            result = scan(load_classifier(info["path"].with_name(info["weights"]), info["recipe"].get("arch",
                                                                                                     "mnist_cnn")),
                          data, config, name=info["name"])
            seconds = time.perf_counter() - t
            result.write(out / info["name"])
            write_json(result_path, study_row(info, result.report, seconds))
        rows.append(json.loads(result_path.read_text()))
        r = rows[-1]
        print(json.dumps({k: r[k] for k in ("model", "target", "flagged", "neural_cleanse_flagged", "seconds")}
                         | {"p": r["max_margin"]["p_value"]}), flush=True)

    summary = {
        "models": {"trojaned": sum(r["trojaned"] for r in rows), "clean": sum(not r["trojaned"] for r in rows),
                   "excluded_below_bar": excluded},
        "rules": summarise(rows),
        "seconds_per_model": {"mean": float(np.mean([r["seconds"] for r in rows])),
                              "max": float(np.max([r["seconds"] for r in rows]))},
        "meta": {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "command": " ".join(sys.argv),
                 "budget": {k: getattr(args, k) for k in ("restarts", "max_steps", "batch_size", "margin_starts",
                                                          "margin_steps")},
                 "device": rows[0]["device"] if rows else None},
    }
    write_json(out / "summary.json", {"summary": summary, "rows": rows})
    print(json.dumps(summary, indent=2))
    if args.markdown:
        print(markdown_rows(rows))


if __name__ == "__main__":
    main()
