#!/usr/bin/env bash
# The GPU checks of issues #3 and #4 in one call, sized for a 15-minute device lease.
#
# Run on a lent GPU machine (docs/GPU_CHECKS.md says how to fetch the wheels it carries):
#     bash tools/gpu_checks.sh [BUDGET_SECONDS]          (default 500)
# Each step has its own time limit, taken from what is left of the budget; a step that fails or
# runs out of time does not stop the next. Results land in $OUT (default /tmp/gpu_checks), at most
# 8 files, none deeper than $OUT itself:
#     summary.txt         machine, versions, each step's exit code and time, the benchmark tables
#     tests_kernels.log   pytest tests/kernels on CUDA (the kernels compiled and run for real)
#     bench.log           tools/bench_kernels.py and tools/bench_step.py output
#     kernels_cuda.csv/json   the kernel benchmark rows and the issue #3 target verdicts
#     sweep_cuda.json     tools/sweep_kernels.py's rows (only with the optional step "sweep")
#     bench_step.json     one GRPO step of a Qwen3-1.7B-shaped model (random weights, bf16)
#     tests_model.log     pytest tests/model + tests/train/test_step.py + test_reshard.py on CUDA
#     loop.log/json       the GRPO loop end to end at toy scale (only with the optional step "loop")
# Without a GPU it says so and runs nothing but the set-up (a dry run of the plumbing);
# GPU_CHECKS_ON_CPU=1 runs the steps anyway, on the CPU, to test the script itself.
# Environment: OUT; PYTHON (default python3); GPU_CHECKS_WHEELS, the folder of the wheels to
# install (default .whl); GPU_CHECKS_SITE, the folder they are installed into (default
# /tmp/mr_site); GPU_CHECKS_STEP_MODEL, the model of step 3 (default qwen3-1.7b; the rehearsal's
# "tiny" fits a CPU); GPU_CHECKS_STEPS, the steps to run (default all four:
# "tests_kernels bench_kernels bench_step tests_model"; "loop", tools/smoke_loop.py after the tests
# (GPU_CHECKS_LOOP_MODEL: its model folder); "sweep", tools/sweep_kernels.py before the
# benchmark; "bench_recompute", step 3 again with full
# activation recomputation, and "bench_packed", step 3's batch in groups of 4 with and without
# group packing, only when named). scripts/device_rehearsal.sh uses these to
# run the script on a CPU in a copy of the device image's Python packages. GPU_CHECKS_XDIST, the
# pytest-xdist workers of the kernel and the model tests (default "8 4"); GPU_CHECKS_BENCH_ARGS,
# more arguments of tools/bench_kernels.py (later ones win, e.g. "--no-compile --cases loss");
# GPU_CHECKS_TEST_LIMIT, one time limit (s) for both test steps instead of 170 and 200.
set -u
BUDGET=${1:-500}
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }

# step NAME LIMIT_S LOG CMD...: run CMD with min(LIMIT_S, what is left) seconds, output to LOG
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    if [[ $STEPS != *" $name "* ]]; then
        say "SKIP  $name: not in GPU_CHECKS_STEPS"
        return 0
    fi
    local left=$((BUDGET - $(elapsed)))
    local t=$((limit < left ? limit : left))
    if ((t < 30)); then
        say "SKIP  $name: ${left}s of the budget left"
        return 0
    fi
    say "START $name (limit ${t}s) at +$(elapsed)s"
    local t0
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" >>"$log" 2>&1
    local rc=$?
    local why=""
    ((rc == 124 || rc == 137)) && why=" (time limit)"
    say "END   $name rc=$rc$why in $(($(date +%s) - t0))s"
    return 0
}

# ---------------------------------------------------------------- set-up (no GPU time to speak of)
PY=${PYTHON:-python3}
SITE=${GPU_CHECKS_SITE:-/tmp/mr_site}
mkdir -p "$SITE"
WHEELS=${GPU_CHECKS_WHEELS:-.whl}
ALL_STEPS="tests_kernels bench_kernels bench_step tests_model"
OPTIONAL_STEPS="loop sweep bench_recompute bench_packed"  # only when named in GPU_CHECKS_STEPS
STEP_MODEL=${GPU_CHECKS_STEP_MODEL:-qwen3-1.7b}
STEPS=" ${GPU_CHECKS_STEPS:-$ALL_STEPS} "
for s in $STEPS; do
    if [[ " $ALL_STEPS $OPTIONAL_STEPS " != *" $s "* ]]; then
        say "ERROR: unknown step '$s' in GPU_CHECKS_STEPS (steps: $ALL_STEPS; optional: $OPTIONAL_STEPS)"
        exit 2
    fi
done
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        >>"$SUMMARY" 2>&1 || say "WARNING: installing the carried wheels failed (see above)"
fi
# Our two import packages by name only: putting the checkout itself on the path would expose its
# top-level folder `kernels`, the import name of a Hugging Face package that transformers probes.
ln -sfn "$REPO/megatron_recycle" "$SITE/megatron_recycle"
ln -sfn "$REPO/kernels" "$SITE/megatron_recycle_kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_DEFAULT_FP_FUSION=1
export MR_REPORT_FAILURES_AT_ONCE=1  # tests/conftest.py: each failure written when it happens
unset TRITON_INTERPRET

say "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
"$PY" - >>"$SUMMARY" 2>&1 <<'EOF'
import importlib, torch
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu visible:", torch.cuda.is_available())
for m in ("triton", "megatron.core", "transformers", "liger_kernel", "megatron_recycle_kernels", "megatron_recycle"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {m}: NOT importable ({e!r})")
EOF
if [ "${GPU_CHECKS_ON_CPU:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA device visible: nothing to check here (set-up only; this is what a dry run does)"
    exit 0
fi

# ------------------------------------------ 1 and 4. the kernel and model tests on CUDA, side by side
# Both test runs go first and together (they share the GPU with each other, never with a benchmark):
# tests/kernels (issue #3: every kernel compiled and run for real against the float64 references;
# tests/kernels/test_cuda_configs.py at the real CUDA tiles) and tests/model + the step and
# resharding tests (issue #4; single-GPU: the multi-rank tests fall back to gloo on the CPU). With
# pytest-xdist (in the GPU image) each run is spread over worker processes: Triton's compiles and
# the gloo tests' processes are CPU work, and the machine has 16 cores.
# The AOT compile test is the CPU machine's stand-in for step 1 and uses Triton internals of one
# version: left out here.
# With pytest-timeout (also in the image) a test that hangs fails on its own after 90 s, with its
# traceback, instead of taking the step's whole limit and every other test's report with it. The
# limit is the test function's only (timeout_func_only): the step tests' module fixtures run whole
# multi-process trainings (each bounded by its launcher's own 300 s), which on a slow or busy machine
# take more than 90 s, and pytest-timeout would otherwise fail every test whose turn it is to build
# them (what the CPU rehearsal of session 18 showed: 10 setup timeouts). The model tests go to the
# xdist workers a module at a time (--dist loadscope), so each module fixture is built once, not
# once per worker that happens to get one of its tests.
ARGS_K=() ARGS_M=()  # extra pytest arguments of the kernel and the model tests
"$PY" -c "import pytest_timeout" 2>/dev/null && ARGS_M=(--timeout 90 -o timeout_func_only=true)
if "$PY" -c "import xdist" 2>/dev/null; then
    read -r WK WM <<<"${GPU_CHECKS_XDIST:-8 4}"  # worker processes of the kernel and model tests
    ((WK > 1)) && ARGS_K=(-n "$WK")
    ((WM > 1)) && ARGS_M+=(-n "$WM" --dist loadscope)
fi
# The multi-process launchers (tests/*/_dist.py) stop their ranks before the step's limit, so their
# own error, which carries every rank's output, is reported (MR_DIST_TIMEOUT_S caps their 300 s;
# a test stopped by pytest-timeout first reports the ranks' output too)
MODEL_LIMIT=${GPU_CHECKS_TEST_LIMIT:-200}
step tests_model "$MODEL_LIMIT" "$OUT/tests_model.log" \
    env MR_DIST_TIMEOUT_S=$((MODEL_LIMIT > 60 ? MODEL_LIMIT - 40 : 20)) "$PY" -m pytest tests/model tests/train/test_step.py tests/train/test_reshard.py -q ${ARGS_M[@]+"${ARGS_M[@]}"} \
    --tb=short --continue-on-collection-errors -m "not real_model" &
MODEL_PID=$!
step tests_kernels "${GPU_CHECKS_TEST_LIMIT:-170}" "$OUT/tests_kernels.log" \
    "$PY" -m pytest tests/kernels -q ${ARGS_K[@]+"${ARGS_K[@]}"} --continue-on-collection-errors \
    --ignore=tests/kernels/test_compile_aot.py
wait "$MODEL_PID"
for f in tests_kernels tests_model; do
    [ -f "$OUT/$f.log" ] && { echo "$f:"; tail -n 3 "$OUT/$f.log"; } | tee -a "$SUMMARY"
done

# ------------------------------------ 1b. optional: the whole GRPO loop on the GPU at toy scale (issue #4)
# tools/smoke_loop.py: `run` (evaluations, SFT, 2 GRPO steps, report), `train --resume` to step 3, and
# one more resumed step with the varlen packed attention, each its own process, on a 2-layer
# random Llama with SmolLM2's tokenizer in Megatron's bf16; the model folder is carried
# (GPU_CHECKS_LOOP_MODEL, default .gpu_assets/tiny_llama, written by
# `tools/smoke_loop.py --write-model`), and bm25s with the wheels. Output in loop.log, loop.json.
LOOP_MODEL=${GPU_CHECKS_LOOP_MODEL:-.gpu_assets/tiny_llama}
# --deadline: the three commands share 105 s (loop.json is written after each), so the step's own
# limit never cuts the results; each command's whole output comes back as loop_<command>.log
step loop 120 "$OUT/loop.log" "$PY" tools/smoke_loop.py --model "$LOOP_MODEL" --out /tmp/mr_smoke_loop --varlen \
    --json "$OUT/loop.json" --timeout 100 --deadline 105
for f in /tmp/mr_smoke_loop/logs/*.log; do [ -e "$f" ] && cp "$f" "$OUT/loop_$(basename "$f")"; done
[ -f "$OUT/loop.log" ] && { echo "loop:"; sed -n "/^GRPO loop smoke run/,\$p" "$OUT/loop.log"; } | tee -a "$SUMMARY"

# --------------------------------------- 2a. optional: launch settings of the log-prob and loss kernels
# tools/sweep_kernels.py: the log-prob statistics and gradient kernels over block widths, warps and
# stages, and grpo_loss over token blocks, warps and blocks per forward program (times, each
# kernel's device time, errors); tables in bench.log, rows in sweep_cuda.json
# (in a rehearsal on the CPU it runs in the Triton interpreter at tiny sizes, so that the hand-off
# of its choices to the benchmark below is rehearsed too)
SWEEP_ENV=() SWEEP_ARGS=()
[ "${GPU_CHECKS_ON_CPU:-0}" = 1 ] && SWEEP_ENV=(env TRITON_INTERPRET=1) SWEEP_ARGS=(--reps 2 --warmup 0)
step sweep 120 "$OUT/bench.log" ${SWEEP_ENV[@]+"${SWEEP_ENV[@]}"} "$PY" tools/sweep_kernels.py --out "$OUT/sweep" \
    ${SWEEP_ARGS[@]+"${SWEEP_ARGS[@]}"}
# the benchmark then times token_logprobs with the sweep's fastest configurations at the most tokens
# (the statistics kernel's without the entropy, as the benchmark's cases and the trainer's default
# compute it; the gradient kernel's)
SWEEP_JSON=$OUT/sweep_cuda.json
[ "${GPU_CHECKS_ON_CPU:-0}" = 1 ] && SWEEP_JSON=$OUT/sweep_cpu.json
STATS_CFG=$("$PY" - "$SWEEP_JSON" 2>/dev/null <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
for part, flag in (("stats", "--stats-config"), ("grad", "--grad-config")):
    rows = [r for r in data.get(part, []) if "ms" in r and not r.get("entropy")]
    if rows:
        top = max(r["tokens"] for r in rows)
        best = min((r for r in rows if r["tokens"] == top), key=lambda r: r["ms"])
        print(f"{flag} {best['block_v']}:{best['warps']}" + (f":{best['stages']}" if best["stages"] else ""), end=" ")
EOF
)
[ -n "$STATS_CFG" ] && say "benchmark with the sweep's choice: $STATS_CFG"

# ---------------------------------------------------------------- 2. kernel benchmarks (issue #3)
# no new case after 140 s (or 60 s before this step's limit when less is left): one case can take
# tens of seconds (torch.compile), and the rows are written after every case
LEFT=$((BUDGET - $(elapsed)))
MAXS=$(((LEFT < 200 ? LEFT : 200) - 60))
if ((MAXS < 20)) && [[ $STEPS == *" bench_kernels "* ]]; then
    say "SKIP  bench_kernels: ${LEFT}s of the budget left, too little to time a case"
    STEPS=${STEPS/ bench_kernels / }
fi
step bench_kernels 200 "$OUT/bench.log" \
    "$PY" tools/bench_kernels.py --out "$OUT/kernels" --max-seconds $((MAXS < 140 ? MAXS : 140)) --reps 20 --warmup 5 \
    --vocab 151936 49152 ${STATS_CFG:-} ${GPU_CHECKS_BENCH_ARGS:-}
grep -A12 "issue #3 targets" "$OUT/bench.log" 2>/dev/null | tee -a "$SUMMARY"

# ---------------------------------------------------------------- 3. one GRPO step at 1.7B (issue #4)
STEP_DIR=/tmp/mr_bench_step
if [[ $STEPS == *" bench_step "* || $STEPS == *" bench_recompute "* || $STEPS == *" bench_packed "* ]]; then
    rm -rf "$STEP_DIR" && mkdir -p "$STEP_DIR"
fi
step bench_step 150 "$OUT/bench.log" \
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_step.py --model "$STEP_MODEL" --bf16 --sequences 8 \
    --seq-len 1024 --mbs 2 --steps 3 --warmup 1 --out "$STEP_DIR" --tag cuda
for f in "$STEP_DIR"/*.json; do [ -e "$f" ] && cp "$f" "$OUT/bench_step.json"; done
grep -A10 "^GRPO step:" "$OUT/bench.log" 2>/dev/null | tee -a "$SUMMARY"

# ------------------------------------------- 3b. optional: the same step with full recomputation
# (model.recompute=full): its peak memory and decoder activations against step 3's, in bench.log
step bench_recompute 120 "$OUT/bench.log" \
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_step.py --model "$STEP_MODEL" --bf16 --sequences 8 \
    --seq-len 1024 --mbs 2 --steps 2 --warmup 1 --out "$STEP_DIR" --tag cuda-recompute-full --recompute full

# ------------------------------ 3c. optional: step 3's batch as 2 GRPO groups of 4, packed and padded
# (the trainer packs groups: each group's shared prompt computed once, the members' attention by
# the group plan, flash attention's bottom-right causal kernel on CUDA); tables in bench.log, with
# each run's profile (--profile: on the H200 packing was the slower of the two; the device's idle
# share and activity count say whether the host's launches set the pace)
if [[ $STEPS == *" bench_packed "* ]]; then
    ATTN=(--device cuda --members 768 1792 --heads 16 --kv-heads 8 --head-dim 128)
    [ "${GPU_CHECKS_ON_CPU:-0}" = 1 ] && ATTN=(--device cpu --members 768 --heads 4 --kv-heads 2 --head-dim 32)  # the rehearsal
    # first one layer's attention alone, the same group (4 x 1,024 tokens, a 256-token prompt) in
    # Qwen3-1.7B's heads: padded causal rows against the group plan, with each form's device
    # activities and busy time (tools/bench_packing.py --attention; seconds)
    PYTHONWARNINGS=ignore step bench_packed 45 "$OUT/bench.log" \
        "$PY" tools/bench_packing.py --attention --k 4 --prompt 256 "${ATTN[@]}" --repeats 5 --out "$STEP_DIR"
    grep -A4 "^attention of one group" "$OUT/bench.log" 2>/dev/null | grep -v "^W[0-9]" | tee -a "$SUMMARY"
    # three runs, each with its own limit: packed (the default route), packed with every segment in
    # one variable-length flash call (MEGATRON_RECYCLE_PACKED_ATTENTION=varlen), padded rows
    for mode in packed varlen nopack; do
        route=auto pack=""
        [ "$mode" = varlen ] && route=varlen
        [ "$mode" = nopack ] && pack="--no-pack"
        MEGATRON_RECYCLE_PACKED_ATTENTION=$route step bench_packed 70 "$OUT/bench.log" \
            "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_step.py --model "$STEP_MODEL" --bf16 \
            --sequences 8 --seq-len 1024 --group-size 4 --mbs 4 --steps 2 --warmup 1 --out "$STEP_DIR" \
            --tag "cuda-k4-$mode" --profile $pack
    done
    # the tables, then each run's profile: device activities, busy time, idle share, costliest kernels
    grep -A26 "in groups of 4" "$OUT/bench.log" 2>/dev/null | tee -a "$SUMMARY"
else
    step bench_packed 0 /dev/null true  # says SKIP once
fi

say "total $(elapsed)s of a ${BUDGET}s budget"
