#!/usr/bin/env bash
# One node, N processes (default: every GPU, or 2 CPU processes on gloo without a GPU).
#   recipes/launch_single_node.sh RECIPE.yaml [key=value ...]
# Environment: NPROC (processes per node), COMMAND (train | run | sft | eval; default train),
# MAX_RESTARTS (default 0): torchrun restarts the processes up to this many times after one fails;
# a restarted train / run / eval resumes as with --resume (README "Restarts after a crash").
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [key=value ...]}; shift
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "-1" ]; then
  # the GPUs this job may use, not every GPU of the node (nvidia-smi -L lists them all, and each
  # MIG partition as a line of its own)
  NPROC=${NPROC:-$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)}
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | grep -c '^GPU ')}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export HF_HUB_OFFLINE=1
if [ "${MAX_RESTARTS:-0}" != 0 ]; then
  # With the TCP store torchrun's agent shares by default, restarted workers meet the last
  # attempt's keys and hang in init_process_group (seen here; pytorch/pytorch#135712). Rank 0
  # then hosts a fresh store each attempt.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
exec torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" -m megatron_recycle.cli "${COMMAND:-train}" --config "$RECIPE" "$@"
