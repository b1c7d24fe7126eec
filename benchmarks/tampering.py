"""Measurement tampering (a "diamond in a vault" dataset): real-vs-fake-positive AUROC per method and layer.

Builds the vault programs (`jaxrisk.zoo.vault`: 6,000 trusted programs without tampers, 12,000 untrusted
ones), trains the measurement predictor (an MLP [128, 128] on the one-hot program), and on the untrusted
positives (every measurement says "diamond") scores: the evidence probe (trusted negatives vs untrusted
examples with inconsistent measurements), the trusted-only activation detectors (fit on trusted
positives), and the cross-fitted ground-truth probe (the skyline).

    python benchmarks/tampering.py --out runs/tampering.json
"""

from __future__ import annotations

import argparse
import json

from jaxrisk.anomaly.tampering import tampering_study
from jaxrisk.evals.activations import classifier_activations
from jaxrisk.io import write_json
from jaxrisk.zoo.vault import VaultConfig, measurement_accuracy, one_hot, train_measurement_predictor, vault_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tampering.json")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = VaultConfig(seed=seed)
        data = vault_data(cfg)
        graphdef, params = train_measurement_predictor(data, cfg)
        layers = ("fc1", "fc2", "fc3")
        acts = {k: classifier_activations(graphdef, params, one_hot(data[k]["tokens"]), layers)
                for k in ("trusted", "untrusted")}
        u = data["untrusted"]
        study = tampering_study(acts["trusted"], acts["untrusted"], data["trusted"]["measurements"],
                                u["measurements"], u["diamond"], seed=seed)
        study["measurement_accuracy"] = measurement_accuracy(graphdef, params, u)
        results[f"seed{seed}"] = study
        print(json.dumps({"seed": seed, **study}), flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
