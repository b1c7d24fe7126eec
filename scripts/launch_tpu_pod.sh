#!/usr/bin/env bash
# Run one jaxrisk command on every worker of a TPU VM pod slice. JAX finds its peers by itself there, so no
# --coordinator flags are needed; the mesh spans every chip of the slice and only worker 0 writes OUT.
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE [PROJECT] -- redteam --model /mnt/models/llama --behaviors b.csv \
#       --out /mnt/shared/run1 --tensor 4
#
# OUT and the model must be on storage every worker sees (a shared disk or a GCS FUSE mount): the checkpoint
# under OUT is written by all workers together. To resume after a preemption, run the same line again.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- JAXRISK_ARGS..." >&2
  exit 2
fi
name=$1 zone=$2
shift 2
project=()
if [ "$1" != "--" ]; then project=(--project "$1"); shift; fi
[ "$1" = "--" ] && shift
quoted=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all \
  --command "cd \${JAXRISK_DIR:-\$HOME/jaxrisk} && .venv/bin/jaxrisk $quoted"
