#!/usr/bin/env bash
# Nsight Compute on the project's W4A16 GEMM for gate_up_proj's shape (Llama-3-8B) at 1, 16 and 64
# tokens, with the launch configurations the H200 sweep picked. Leaves the GPU clocks alone.
#   PYTHONPATH=$PWD bash bench/kernel_ncu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for args in "4096 28672 1 256 4 2 2" "4096 28672 16 128 2 4 3" "4096 28672 64 64 2 4 3"; do
  echo "=== K N tokens block_n split_k warps stages: $args"
  timeout 100 ncu --clock-control none -k regex:gemm_kernel -c 1 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section LaunchStats --section InstructionStats \
      python3 bench/kernel_probe.py $args 2>&1 \
    | grep -E "Duration|DRAM Through|L1/TEX Cache|Compute \(SM\)|Registers|Dynamic Shared|Theoretical Occ|Achieved Occ|Warp Cycles Per Issued|Executed Instructions  "
done
