"""Side by side: jaxrisk's scan vs the published Neural Cleanse loop in PyTorch, same weights, same data.

    python benchmarks/scan_vs_torch.py --mnist ../shared/assets/data/mnist --zoo runs/zoo \
        --models trojan00-patch clean00 --out runs/bench_scan.json

For each model it runs, in this one process:
  * torch-reference : class by class, the paper's hyperparameters (31 steps/epoch, patience 5/25);
  * torch-batched   : the fast straightforward PyTorch version: all ten classes in one batch, 400 steps;
  * jaxrisk-same    : the same algorithm and hyperparameters, one restart per class, all classes in one program;
  * jaxrisk-default : jaxrisk's default scan (inversion with 2 restarts per class, 8 steps/epoch, patience
                      3/20; MM-BD's maximum margin; the symmetry search of a suspect) and its verdict.
It reports wall time, the ratios to the reference, and whether the verdicts agree with the ground truth.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from neural_cleanse_torch import ReferenceConfig, load_torch_cnn, scan as torch_scan, scan_batched  # noqa: E402

from jaxrisk.data import load_mnist  # noqa: E402
from jaxrisk.io import write_json  # noqa: E402
from jaxrisk.models import load_classifier  # noqa: E402
from jaxrisk.scan import DecisionConfig, InversionConfig, ScanConfig, run as scan  # noqa: E402
from jaxrisk.search import RunConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", required=True)
    ap.add_argument("--zoo", required=True, help="directory written by `jaxrisk zoo`")
    ap.add_argument("--models", nargs="+", required=True, help="zoo model names")
    ap.add_argument("--max-epochs", type=int, default=200, help="epoch cap for the reference and jaxrisk-same")
    ap.add_argument("--skip-reference", action="store_true", help="skip the class-by-class PyTorch reference")
    ap.add_argument("--skip-same", action="store_true", help="skip jaxrisk with the reference's hyperparameters")
    ap.add_argument("--torch-device", default="cpu", help="where the PyTorch side runs (e.g. cuda)")
    ap.add_argument("--out", default="runs/bench_scan.json")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_mnist(args.mnist, "test")
    pool = data.take(len(data.labels) - 500)  # the same optimisation pool jaxrisk uses (it holds out 500)
    ref_cfg = ReferenceConfig(max_epochs=args.max_epochs)
    same = ScanConfig(run=RunConfig(restarts=1, max_steps=args.max_epochs * 31, chunk_steps=40, devices=1,
                                    progress=False),
                      inversion=InversionConfig(steps_per_epoch=31, patience=5, early_stop_patience=25,
                                                early_stop_threshold=1.0),
                      margin=None, decision=DecisionConfig(symmetry=False))   # Neural Cleanse alone
    default = ScanConfig(run=ScanConfig().run.replace(devices=1, progress=False))
    rows = []
    for name in args.models:
        weights = Path(args.zoo) / f"{name}.safetensors"
        truth = json.loads(weights.with_suffix(".json").read_text())
        expected = [truth["target"]] if truth.get("trojaned") else []
        row = {"model": name, "expected_flagged": expected, "kind": truth.get("kind")}
        model = load_classifier(weights, "mnist_cnn")
        t = time.perf_counter()
        batched = scan_batched(load_torch_cnn(str(weights)), pool.images, pool.labels, device=args.torch_device)
        row["torch-batched"] = {"seconds": time.perf_counter() - t, "flagged": batched["flagged"],
                                "l1_norms": batched["l1_norms"], "steps": batched["steps"]}
        print(name, "torch-batched", json.dumps({k: row["torch-batched"][k] for k in ("seconds", "flagged")}),
              flush=True)
        for label, cfg in (("jaxrisk-same", same), ("jaxrisk-default", default))[int(args.skip_same):]:
            t = time.perf_counter()  # includes jaxrisk's compilation: each engine run compiles its program once
            rep = scan(model, data, cfg).report
            row[label] = {"seconds": time.perf_counter() - t, "flagged": rep["flagged"],
                          "l1_norms": [e["l1_norm"] for e in rep["classes"]], "steps": rep["steps_run"]}
            row[label]["speedup_vs_batched"] = row["torch-batched"]["seconds"] / row[label]["seconds"]
            print(name, label, json.dumps({k: v for k, v in row[label].items() if k != "l1_norms"}), flush=True)
        if not args.skip_reference:
            ref = torch_scan(load_torch_cnn(str(weights)), pool.images, pool.labels, ref_cfg)
            ref.pop("masks")
            row["torch-reference"] = ref
            for label in ("jaxrisk-same", "jaxrisk-default")[int(args.skip_same):]:
                row[label]["speedup_vs_reference"] = ref["seconds"] / row[label]["seconds"]
            print(name, "torch-reference", json.dumps({k: ref[k] for k in ("seconds", "flagged", "epochs")}),
                  flush=True)
        rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads", "torch": torch.__version__, "command": " ".join(sys.argv)}
    write_json(args.out, {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
