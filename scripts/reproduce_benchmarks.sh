#!/usr/bin/env bash
# Rebuild every figure in BENCHMARKS.md on this host (CPU or GPU): the MNIST zoo, the detection study,
# jaxrisk vs the PyTorch references, the circuit and fragility studies. Each step resumes where an interrupted
# run stopped (the fragility and hair-trigger scripts start over). The GPU tables: benchmarks/gpu_figures.sh.
# Usage: scripts/reproduce_benchmarks.sh [MNIST_DIR] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${1:-../shared/assets/data/mnist}
RUNS=${2:-runs}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[bench]'
.venv/bin/jaxrisk zoo --mnist "$MNIST" --out "$RUNS/zoo" --trojaned 8 --clean 8 \
  --kinds patch,sparse,checkerboard,blend --archs mnist_cnn   # the zoo of the detection study below
.venv/bin/python benchmarks/scan_vs_torch.py --mnist "$MNIST" --zoo "$RUNS/zoo" --models trojan00-patch \
  --max-epochs 60 --out "$RUNS/bench_scan.json"
.venv/bin/jaxrisk zoo --mnist "$MNIST" --out "$RUNS/zoo40" --trojaned 27 --clean 16 --max-epochs 6   # issue 15's zoo
.venv/bin/python benchmarks/scan_vs_torch.py --mnist "$MNIST" --zoo "$RUNS/zoo40" --skip-reference --skip-same \
  --models trojan00-patch-mnist_cnn clean00-mnist_cnn --out "$RUNS/bench_scan_verdict_cpu.json"
.venv/bin/python benchmarks/detection_study.py --mnist "$MNIST" --zoo "$RUNS/zoo40" --out "$RUNS/study40"
.venv/bin/python benchmarks/lm_vs_torch.py --out "$RUNS/bench_lm.json"
.venv/bin/python benchmarks/gcg_vs_nanogcg.py --out "$RUNS/bench_gcg.json"   # needs .venv-nanogcg (see the script)
.venv/bin/python benchmarks/gcg_success.py --steps 500 --suffix-len 40 \
  --variants gcg,restart,restart_matches,probe,restart_matches_target --out "$RUNS/bench_gcg_success.json"
for seed in 0 1; do
  .venv/bin/python benchmarks/gcg_success.py --steps 500 --suffix-len 40 --seed $seed --no-nanogcg \
    --variants gcg,random_positions,restart_matches_target,defaults --out "$RUNS/bench_gcg_success_s$seed.json"
done
.venv/bin/python benchmarks/gcg_success.py --steps 500 --suffix-len 40 --no-nanogcg --variants defaults_noisy_restarts \
  --out "$RUNS/bench_gcg_success_noisy_s0.json"
.venv/bin/python benchmarks/gcg_success.py --steps 1000 --suffix-len 40 --no-nanogcg --variants defaults \
  --out "$RUNS/bench_gcg_success_1000_s0.json"
.venv/bin/python benchmarks/gcg_success.py --steps 500 --suffix-len 40 --no-nanogcg --variants defaults_margin \
  --out "$RUNS/bench_gcg_success_margin_s0.json"
.venv/bin/python benchmarks/gcg_probe_time.py --out "$RUNS/bench_gcg_probe_time.json"
.venv/bin/python benchmarks/gcg_plausibility.py --out "$RUNS/bench_gcg_plausibility.json"
.venv/bin/python benchmarks/arca_danger.py --out "$RUNS/bench_arca_danger.json"
.venv/bin/python benchmarks/circuits_vs_attribution.py --out "$RUNS/bench_circuits.json"
.venv/bin/python benchmarks/circuit_freezing.py --seeds 2 --out "$RUNS/bench_freezing.json"
.venv/bin/python benchmarks/fragility_vs_torch.py --out "$RUNS/bench_fragility.json"
.venv/bin/python benchmarks/fragility_refusal.py --out "$RUNS/fragility_refusal.json"
.venv/bin/python benchmarks/hair_trigger.py --model ../shared/assets/models/tinyllamas-stories260K --out "$RUNS/hair" \
  --steps 1000 --seeds 0,1 --audit-args "--draws 4 --max-steps 20 --pool 64"
.venv/bin/python benchmarks/anomaly_vs_reference.py --out "$RUNS/bench_anomaly.json"
.venv/bin/python benchmarks/anomaly_vs_reference.py --hidden 1024,1024 --out "$RUNS/bench_anomaly_wide.json"
.venv/bin/python benchmarks/anomaly_zoo.py --mnist "$MNIST" --model ../shared/assets/models/tinyllamas-stories260K \
  --out "$RUNS/anomaly_zoo"
.venv/bin/python benchmarks/tampering.py --out "$RUNS/tampering.json"
