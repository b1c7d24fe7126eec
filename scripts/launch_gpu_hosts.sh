#!/usr/bin/env bash
# Run one jaxrisk command as one job over several GPU hosts (ssh), process 0 on the first host, which also
# coordinates. Every host needs the same checkout (at $JAXRISK_DIR, default ~/jaxrisk, with its .venv) and
# storage shared by all hosts for --model and --out.
#
#   scripts/launch_gpu_hosts.sh host1,host2 -- scan --weights /shared/m.safetensors --arch mnist_cnn \
#       --mnist /shared/mnist --out /shared/scan1
#
# PORT (default 1234) is the coordinator's port on the first host. Under SLURM use `srun .venv/bin/jaxrisk ...`
# instead: JAX reads the job from SLURM's environment and no flags are needed.
set -euo pipefail
if [ $# -lt 2 ] || [ "$2" != "--" ]; then
  echo "usage: $0 HOST1,HOST2,... -- JAXRISK_ARGS..." >&2
  exit 2
fi
IFS=, read -r -a hosts <<< "$1"
shift 2
port=${PORT:-1234}
coordinator="${hosts[0]}:$port"
quoted=$(printf '%q ' "$@")
pids=()
for i in "${!hosts[@]}"; do
  ssh "${hosts[$i]}" "cd \${JAXRISK_DIR:-\$HOME/jaxrisk} && .venv/bin/jaxrisk $quoted --coordinator $coordinator \
--num-processes ${#hosts[@]} --process-id $i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
