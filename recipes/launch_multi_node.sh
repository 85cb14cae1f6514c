#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   MASTER_ADDR=node0 NNODES=4 recipes/launch_multi_node.sh RECIPE.yaml [key=value ...]
# The rendezvous numbers the nodes (no NODE_RANK needed); global rank 0 owns the pool, logs and
# writes metrics, so run.output_dir (checkpoints) must be on a file system every node sees.
# Tested as two one-process nodes on 127.0.0.1 (tests/train/test_loop.py).
# Environment: MASTER_ADDR (rendezvous host, required), MASTER_PORT (29500), NNODES (required),
# NPROC (GPUs per node, default 8), RDZV_ID (job id, default megatron-recycle), COMMAND (train | sft).
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [key=value ...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}" "${NNODES:?set NNODES}"
export HF_HUB_OFFLINE=1
exec torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-megatron-recycle}" \
  -m megatron_recycle.cli "${COMMAND:-train}" --config "$RECIPE" "$@"
