#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run, each side by side with its PyTorch reference on the same GPU:
# the fragility audit's cost (vs torch.func), the anomaly detectors (vs the cupbearer-style reference,
# cupbearer's MLP and a wide one), the trigger scan (vs the all-classes-at-once PyTorch Neural Cleanse) and
# the detection study over a zoo. Needs python with jax[cuda] and torch; MNIST at $MNIST (default
# ../shared/assets/data/mnist) and, for the scan steps, a zoo at $ZOO (default runs/zoo40, built by
# `jaxrisk zoo --mnist $MNIST --out runs/zoo40 --trojaned 24 --clean 16 --max-epochs 6`).
#
#     bash benchmarks/gpu_figures.sh runs/gpu                      # every step
#     bash benchmarks/gpu_figures.sh runs/gpu scan_vs_torch study  # some of them
#
# Writes OUTDIR/log.txt (the machine, every step's output) and one JSON per benchmark; a step that fails or
# runs past its limit is logged and the next one runs.
set -u
out=${1:?usage: bash benchmarks/gpu_figures.sh OUTDIR [STEP ...]}
shift
steps=${*:-fragility anomaly anomaly_wide scan_vs_torch study}
mnist=${MNIST:-../shared/assets/data/mnist}
zoo=${ZOO:-runs/zoo40}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$log"

step() {  # name, seconds, script and its flags
  local name=$1 secs=$2
  shift 2
  case " $steps " in *" $name "*) ;; *) return ;; esac
  echo "== $name ($(date -u +%T))" | tee -a "$log"
  timeout "$secs" "$py" "$@" 2>&1 | tee -a "$log" | tail -20
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}
step fragility 150 benchmarks/fragility_vs_torch.py --out "$out/bench_fragility.json"
step anomaly 150 benchmarks/anomaly_vs_reference.py --out "$out/bench_anomaly.json"
step anomaly_wide 150 benchmarks/anomaly_vs_reference.py --hidden 1024,1024 --out "$out/bench_anomaly_wide.json"
step scan_vs_torch 240 benchmarks/scan_vs_torch.py --mnist "$mnist" --zoo "$zoo" --torch-device cuda \
  --models trojan00-patch-mnist_cnn clean00-mnist_cnn --skip-reference --skip-same --out "$out/bench_scan.json"
step study "${STUDY_SECONDS:-500}" benchmarks/detection_study.py --mnist "$mnist" --zoo "$zoo" --out "$out/study"
