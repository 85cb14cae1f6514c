#!/usr/bin/env bash
# One node, N processes (default: every GPU, or 2 CPU processes on gloo without a GPU).
#   recipes/launch_single_node.sh RECIPE.yaml [key=value ...]
# Environment: NPROC (processes per node), COMMAND (train | sft; default train).
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [key=value ...]}; shift
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export HF_HUB_OFFLINE=1
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_recycle.cli "${COMMAND:-train}" --config "$RECIPE" "$@"
