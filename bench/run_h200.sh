#!/usr/bin/env bash
# The GPU benchmark of issue 5, on the H200 (vLLM 0.26 installed in /tmp/site as
# ../shared/gpu/README.md says). One command runs everything:
#
#   bash bench/run_h200.sh all            # prepare + calibrate + vllm-main + vllm-rest
#
# The device tool limits one command to 10 minutes, so there it runs in stages, in this order
# (the machine keeps /root between back-to-back calls):
#
#   bash bench/run_h200.sh prepare        # random Llama-3-8B-shaped bf16 model + correction microbenchmark
#   bash bench/run_h200.sh calibrate      # GlowQ calibration (timed) + derived variants
#   bash bench/run_h200.sh vllm-main      # vLLM: gptq, glowq, permodule, glowq_s (the target ratios)
#   bash bench/run_h200.sh vllm-rest      # vLLM: gptq again (this run's anchor), bf16, int4 through the plugin
#   bash bench/run_h200.sh vllm-issue10a  # vLLM: gptq (Machete), marlin, fp8, glowq (the plugin's choice)
#   bash bench/run_h200.sh vllm-issue10b  # vLLM: gptq again, glowq_own and int4_own (the project's kernel), lora
#   bash bench/run_h200.sh vllm NAME...   # any of: gptq glowq permodule glowq_s bf16 int4 marlin fp8
#                                         #         glowq_own int4_own glowq_vllm lora, and for the MoE model
#                                         #         glowq_int8 glowq_full (anchors: bench/vllm_bench.py)
#   bash bench/run_h200.sh kernel         # the project's W4A16 kernel vs vLLM's, per layer (+ launch sweep)
#   bash bench/run_h200.sh tune           # sweep the warpgroup-MMA launches into this GPU's launch table
#                                         # ($WORK/tuned.json, kernels/tuned.py); every later stage uses it
#   bash bench/run_h200.sh gpu-tests [TEST_FILE...]  # the GPU tests (default: every GPU test file;
#                                         # GLOWQ_GPU_TESTS_WORKERS=8 runs them in 8 processes)
#
# Mixture-of-Experts (issue 11), in $GLOWQ_BENCH_MOE_WORK (default /root/bench-moe), in this order:
#
#   bash bench/run_h200.sh moe-prepare    # random Qwen3-30B-A3B-shaped bf16 model, as many layers as the disk holds
#   bash bench/run_h200.sh moe-calibrate  # GlowQ calibration (timed) + the plain int4 variants (GPTQ, plugin)
#   bash bench/run_h200.sh moe-vllm       # vLLM: gptq (in-tree GPTQ-Marlin MoE), glowq, bf16 -> vllm_moe.json
#   bash bench/run_h200.sh moe-vllm-rest  # vLLM: gptq again, int4 (the plugin, no factors), bf16 -> vllm_moe_rest.json
#   bash bench/run_h200.sh moe-vllm-own   # vLLM: gptq again, glowq_own and int4_own (the project's MoE kernels,
#                                         # VLLM_GLOWQ_KERNEL=glowq) -> vllm_moe_own.json
#   bash bench/run_h200.sh moe-micro      # one expert layer: plain Marlin MoE vs GlowQ's grouped and fused paths
#                                         # (needs no model; GLOWQ_BENCH_SWEEP=1 times both paths at every count,
#                                         # GLOWQ_BENCH_MOE_TOKENS=1,2,4,... the token counts, GLOWQ_BENCH_BREAKDOWN=1
#                                         # each path's time per kernel, GLOWQ_BENCH_LAUNCH_SWEEP=1,4 the own
#                                         # pairs path's launch constants, GLOWQ_BENCH_GROUPED_SWEEP=16,64,256 the
#                                         # grouped path's correction launches alone with their launch constants
#                                         # varied, no vLLM needed; GLOWQ_BENCH_BESIDE_SWEEP=1,64 the whole
#                                         # grouped path, its correction beside Marlin, with the same constants
#                                         # varied; GLOWQ_BENCH_MOE_PATHS=plain,grouped,... only
#                                         # those paths) -> moe_micro.json; GLOWQ_BENCH_OWN_ONLY=1:
#                                         # the own pairs path alone, no vLLM needed -> moe_micro_own.json
#
# What needs no vLLM fits the install's first calls (vLLM arrives with the fourth part), e.g.:
#   call 1 (part 0): GLOWQ_BENCH_OWN_ONLY=1 GLOWQ_BENCH_BREAKDOWN=1 bash bench/run_h200.sh moe-micro
#   call 2 (part 1): bash bench/run_h200.sh moe-prepare
#   call 3 (part 2): GLOWQ_GPU_TESTS_SELECT="pairs or marlins" bash bench/run_h200.sh gpu-tests tests/test_moe_triton.py
#
# The moe-vllm stages skip engines that would end after GLOWQ_BENCH_BUDGET_S (default 560) seconds.
#
# GLOWQ_BENCH_MICRO=0 skips the microbenchmark in `prepare`.
# GLOWQ_BENCH_SVD=randomized calibrates with the randomized SVD for every unit (the default, auto, takes the
# exact SVD up to 1024 columns: about 60 ms a unit for the 128 experts' down projections of each MoE layer).
# GLOWQ_BENCH_BUDGET_S=N makes the vLLM stage skip engines that would end after N seconds.
#
# Results (JSON, logs) go to $OUT (default bench/results/raw); bench/report.py turns them into
# docs/benchmarks.md.
set -euo pipefail
STAGE=${1:?usage: run_h200.sh prepare|calibrate|tune|vllm-main|vllm-rest|vllm-issue10a|vllm-issue10b|vllm NAME...|kernel|gpu-tests [FILE...]|moe-prepare|moe-calibrate|moe-vllm|moe-vllm-rest|moe-vllm-own|moe-micro|all}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
WORK=${GLOWQ_BENCH_WORK:-/root/bench}
OUT=${OUT:-$REPO/bench/results/raw}
mkdir -p "$WORK" "$OUT"
# the checkout first: /tmp/site keeps the plugin's dist-info (for the entry point) from the first
# call, and its code would go stale when the checkout changes between calls
export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
# Overrides for a CPU dry run of this script with a tiny model (the defaults are the issue's).
SHAPE=${GLOWQ_BENCH_SHAPE:-llama3-8b}
SAMPLES=${GLOWQ_BENCH_SAMPLES:-32}
SEQ_LEN=${GLOWQ_BENCH_SEQ_LEN:-2048}
PROFILE=${GLOWQ_BENCH_PROFILE:-h200}
DEVICE=${GLOWQ_BENCH_DEVICE:-cuda}
GROUP=${GLOWQ_BENCH_GROUP:-128}
SVD=${GLOWQ_BENCH_SVD:-auto}  # glowq-calibrate's --svd (randomized: faster on many small units, e.g. experts)
MOE_WORK=${GLOWQ_BENCH_MOE_WORK:-/root/bench-moe}
MOE_SHAPE=${GLOWQ_BENCH_MOE_SHAPE:-qwen3-30b-a3b}
MOE_LAYERS=${GLOWQ_BENCH_MOE_LAYERS:-auto}  # or a number; auto: bench/make_model.py's disk plan
say() { echo "[$(date +%H:%M:%S)] $*"; }
# the launch table `tune` wrote, for the kernel and engine stages after it (the packaged table otherwise)
if [ -f "$WORK/tuned.json" ] && [ -z "${VLLM_GLOWQ_TUNED_CONFIGS:-}" ]; then
  export VLLM_GLOWQ_TUNED_CONFIGS=$WORK/tuned.json
fi

ensure_plugin() {  # the vllm.general_plugins entry point needs installed dist-info
  # compressed-tensors 0.17 (in the shared wheelhouse) imports loguru, which the wheelhouse
  # lacks: without it every quantized checkpoint fails in vLLM 0.26 with "No module named
  # 'loguru'". Carry .whl/loguru-*.whl (pip download --no-deps loguru) with the call.
  if [ -f /tmp/site/.glowq-gpu-ready ] && ! $PY -c "import loguru" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$REPO"/.whl/loguru-*.whl
  fi
  if [ -f /tmp/site/.glowq-gpu-ready ] && ! ls /tmp/site | grep -q '^vllm_glowq-.*dist-info$'; then
    $PY -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/site "$REPO" 2>&1 | tail -2
  fi
}

prepare() {
  say "building the random $SHAPE-shaped bf16 model"
  [ -f "$WORK/bf16/config.json" ] || $PY "$HERE/make_model.py" "$WORK/bf16" --shape "$SHAPE" --device "$DEVICE"
  if [ "$DEVICE" = cuda ]; then
    ensure_plugin
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
    [ "${GLOWQ_BENCH_MICRO:-1}" = 0 ] && return
    say "correction microbenchmark"
    timeout 400 $PY "$HERE/correction_microbench.py" --sweep --out "$OUT/micro.json" 2>&1 | tee "$OUT/micro.log"
  fi
}

calibrate() {
  say "GlowQ calibration: rank 64, $SAMPLES x $SEQ_LEN random tokens, symmetric int4 g128"
  $PY "$HERE/calibrate_timed.py" "$WORK/bf16" "$WORK/glowq" --json "$OUT/calibration.json" \
      --samples "$SAMPLES" --seq-len "$SEQ_LEN" --device "$DEVICE" --svd "$SVD" 2>&1 | grep -v '^calibrating layers' | tail -5
  say "deriving int4 / GlowQ-S / per-module / GPTQ checkpoints"
  $PY "$HERE/variants.py" "$WORK/glowq" "$WORK/v"
  df -h "$WORK" | tail -1
}

vllm_run() {  # vllm_run RUN WORK_DIR VARIANT...: results in $OUT/RUN.json
  local run=$1 work=$2
  shift 2
  ensure_plugin
  local args=()
  for v in "$@"; do
    case $v in
      bf16) args+=(--variant "bf16=$work/bf16") ;;
      glowq) args+=(--variant "glowq=$work/glowq") ;;
      glowq_own|glowq_vllm|glowq_int8|glowq_full) args+=(--variant "$v=$work/glowq") ;;
      int4_own) args+=(--variant "int4_own=$work/v/int4") ;;
      marlin) args+=(--variant "marlin=$work/v/gptq") ;;
      fp8) args+=(--variant "fp8=$work/bf16") ;;
      lora) args+=(--variant "lora=$work/v/gptq+$work/v/lora") ;;
      *) args+=(--variant "$v=$work/v/$v") ;;
    esac
  done
  local budget=()
  [ -n "${GLOWQ_BENCH_BUDGET_S:-}" ] && budget=(--budget-s "$GLOWQ_BENCH_BUDGET_S")
  rm -rf "$work/logs"
  $PY "$HERE/vllm_bench.py" --profile "$PROFILE" "${args[@]}" "${budget[@]}" --out "$OUT/$run.json" --logs "$work/logs"
  # keep the engine logs' interesting lines (not every file may come back from $OUT)
  local logs=$OUT/engine_logs.txt
  [ "$run" = vllm ] || logs=$OUT/engine_logs_$run.txt
  for f in "$work"/logs/*.log; do
    echo "===== $f"; grep -E "Using|took|GiB|graph|compile|Error|error|Traceback|glowq|GlowQ" "$f" | tail -60
  done > "$logs" 2>/dev/null || true
}

moe_prepare() {
  mkdir -p "$MOE_WORK"
  say "building the random $MOE_SHAPE-shaped bf16 Qwen3-MoE model ($MOE_LAYERS layers)"
  df -h "$MOE_WORK" | tee "$OUT/moe_disk.txt"
  [ -f "$MOE_WORK/bf16/config.json" ] || $PY "$HERE/make_model.py" "$MOE_WORK/bf16" --arch qwen3_moe \
      --shape "$MOE_SHAPE" --layers "$MOE_LAYERS" --work-root "$MOE_WORK" --group-size "$GROUP" --device "$DEVICE" | tee -a "$OUT/moe_disk.txt"
  cp "$MOE_WORK/bf16/config.json" "$OUT/moe_model_config.json"
  if [ "$DEVICE" = cuda ]; then
    ensure_plugin
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
  fi
}

moe_calibrate() {
  say "GlowQ calibration of the MoE model: rank 64, $SAMPLES x $SEQ_LEN random tokens, symmetric int4 g$GROUP"
  $PY "$HERE/calibrate_timed.py" "$MOE_WORK/bf16" "$MOE_WORK/glowq" --json "$OUT/calibration_moe.json" \
      --samples "$SAMPLES" --seq-len "$SEQ_LEN" --device "$DEVICE" --group-size "$GROUP" --svd "$SVD" 2>&1 \
      | grep -v '^calibrating layers' | tail -5
  say "deriving the plain int4 checkpoints (GPTQ for vLLM's in-tree MoE, and the plugin's without factors)"
  $PY "$HERE/variants.py" "$MOE_WORK/glowq" "$MOE_WORK/v" --only int4,gptq
  df -h "$MOE_WORK" | tail -1 | tee -a "$OUT/moe_disk.txt"
}

kernel() {  # GLOWQ_BENCH_SWEEP=1 (mma.sync launches) or wgmma; GLOWQ_BENCH_TOKENS=1,16,...; GLOWQ_BENCH_NO_VLLM=1
  ensure_plugin
  local args=()
  case "${GLOWQ_BENCH_SWEEP:-}" in "") ;; wgmma) args+=(--sweep-wgmma) ;; *) args+=(--sweep) ;; esac
  [ -n "${GLOWQ_BENCH_TOKENS:-}" ] && args+=(--tokens "$GLOWQ_BENCH_TOKENS")
  [ -n "${GLOWQ_BENCH_NO_VLLM:-}" ] && args+=(--no-vllm)
  timeout 540 $PY "$HERE/kernel_microbench.py" "${args[@]}" --out "$OUT/kernel_micro.json" 2>&1 \
      | tee "$OUT/kernel_micro.log" | grep -E "T=|copy"
}

tune() {  # GLOWQ_BENCH_TOKENS=8,16,...: the token counts swept (one entry each)
  ensure_plugin
  timeout 480 $PY "$HERE/kernel_microbench.py" --no-vllm --sweep-wgmma \
      --tokens "${GLOWQ_BENCH_TOKENS:-8,16,32,64,128,256,512,1024,2048}" --out "$OUT/tune.json" \
      --tuned-out "$WORK/tuned.json" 2>&1 | tee "$OUT/tune.log" | grep -E "T=|copy" | cut -c1-400 \
      || say "the sweep stopped early: the table holds the layers it finished"
  if [ -f "$WORK/tuned.json" ]; then cp "$WORK/tuned.json" "$OUT/tuned.json"; fi
}

moe_micro() {
  ensure_plugin
  local tokens=()
  [ -n "${GLOWQ_BENCH_MOE_TOKENS:-}" ] && tokens=(--tokens "$GLOWQ_BENCH_MOE_TOKENS")
  local name=moe_micro${GLOWQ_BENCH_OWN_ONLY:+_own}
  timeout "${GLOWQ_BENCH_TIMEOUT_S:-540}" $PY "$HERE/moe_microbench.py" ${GLOWQ_BENCH_SWEEP:+--threshold-sweep} \
      ${GLOWQ_BENCH_BREAKDOWN:+--breakdown} ${GLOWQ_BENCH_LAUNCH_SWEEP:+--launch-sweep "$GLOWQ_BENCH_LAUNCH_SWEEP"} \
      ${GLOWQ_BENCH_GROUPED_SWEEP:+--grouped-sweep "$GLOWQ_BENCH_GROUPED_SWEEP"} \
      ${GLOWQ_BENCH_BESIDE_SWEEP:+--beside-sweep "$GLOWQ_BENCH_BESIDE_SWEEP"} \
      ${GLOWQ_BENCH_OWN_ONLY:+--own-only} ${GLOWQ_BENCH_MOE_PATHS:+--paths "$GLOWQ_BENCH_MOE_PATHS"} "${tokens[@]}" \
      --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
}

GPU_TEST_FILES=(tests/test_kernels.py tests/test_correction.py tests/test_plugin_gpu.py tests/test_moe_marlin.py tests/test_moe_fold.py
                tests/test_moe_triton.py
                tests/test_plugin_moe_gpu.py)

gpu_tests() {  # gpu_tests [TEST_FILE...] (default: all of GPU_TEST_FILES; more than one call's worth)
  ensure_plugin
  local files=("$@")
  [ ${#files[@]} -gt 0 ] || files=("${GPU_TEST_FILES[@]}")
  local select=()
  [ -n "${GLOWQ_GPU_TESTS_SELECT:-}" ] && select=(-k "$GLOWQ_GPU_TESTS_SELECT")  # e.g. to split a file
  if [ -n "${GLOWQ_GPU_TESTS_WORKERS:-}" ]; then  # the kernels' JIT compiles are CPU-bound: run them side by side
    # pytest-xdist and execnet travel in .whl (pip download --no-deps pytest-xdist execnet)
    $PY -c "import xdist" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --target /tmp/xdist \
        "$REPO"/.whl/pytest_xdist-*.whl "$REPO"/.whl/execnet-*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/xdist
    select+=(-n "$GLOWQ_GPU_TESTS_WORKERS")
  fi
  (cd "$REPO" && timeout "${GLOWQ_GPU_TESTS_TIMEOUT_S:-540}" $PY -m pytest "${files[@]}" "${select[@]}" -m gpu -q -rA -s \
      -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -Ev "it/s]|layer/s" | tail -40)
}

case $STAGE in
  prepare) prepare ;;
  calibrate) calibrate ;;
  vllm-main) vllm_run vllm "$WORK" gptq glowq permodule glowq_s ;;
  vllm-rest) vllm_run vllm "$WORK" gptq bf16 int4 ;;  # gptq again: the anchor for this run's ratios
  vllm-issue10a) vllm_run vllm "$WORK" gptq marlin fp8 glowq ;;
  vllm-issue10b) vllm_run vllm "$WORK" gptq glowq_own int4_own lora ;;
  kernel) kernel ;;
  tune) tune ;;
  vllm) shift; vllm_run vllm "$WORK" "$@" ;;          # any list, e.g. vllm gptq glowq_s
  gpu-tests) shift; gpu_tests "$@" ;;
  moe-prepare) moe_prepare ;;
  moe-calibrate) moe_calibrate ;;
  moe-vllm) GLOWQ_BENCH_BUDGET_S=${GLOWQ_BENCH_BUDGET_S:-560} vllm_run vllm_moe "$MOE_WORK" gptq glowq bf16 ;;
  moe-micro) moe_micro ;;
  moe-vllm-rest) GLOWQ_BENCH_BUDGET_S=${GLOWQ_BENCH_BUDGET_S:-560} vllm_run vllm_moe_rest "$MOE_WORK" gptq int4 bf16 ;;
  moe-vllm-own) GLOWQ_BENCH_BUDGET_S=${GLOWQ_BENCH_BUDGET_S:-560} vllm_run vllm_moe_own "$MOE_WORK" gptq glowq_own int4_own ;;
  all) prepare; calibrate; vllm_run vllm "$WORK" gptq glowq permodule glowq_s bf16 int4 ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
say "stage $STAGE done"
