#!/usr/bin/env bash
# Nsight Compute on the project's W4A16 GEMM for gate_up_proj's shape (Llama-3-8B) at 1 and 16
# tokens with the default launch configurations (choose_gemm_config on an H200), and at 1 token
# with 4 warps: where the warps wait (stall reasons per issued instruction) and how busy the
# issue slots are. Leaves the GPU clocks alone.
#   PYTHONPATH=$PWD bash bench/kernel_ncu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REASONS="long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle not_selected barrier dispatch_stall no_instruction branch_resolving membar"
METRICS="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active"
METRICS+=",smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,smsp__inst_executed.sum"
for reason in $REASONS; do METRICS+=",smsp__average_warps_issue_stalled_${reason}_per_issue_active.ratio"; done
for args in "4096 28672 1 64 5 1 2" "4096 28672 1 64 5 4 2" "4096 28672 16 64 2 4 2"; do
  echo "=== K N tokens block_n split_k warps stages: $args"
  timeout 120 ncu --clock-control none -k regex:gemm_kernel -c 1 --metrics "$METRICS" \
      python3 bench/kernel_probe.py $args 2>&1 | grep -E "^\s+(gpu__|dram__|sm__|smsp__|launch__)" || true
done
