NCU=$(which ncu)
for args in "4096 28672 1 256 4 2 2" "4096 28672 16 128 2 4 3" "4096 28672 64 64 2 4 3"; do
  echo "=== $args"
  timeout 100 $NCU --clock-control none -k regex:gemm_kernel -c 1 --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section InstructionStats python3 bench/_probe.py $args 2>&1 | grep -E "Duration|DRAM Through|L1/TEX Cache|Compute \(SM\)|Registers|Dynamic Shared|Theoretical Occ|Achieved Occ|Warp Cycles Per Issued|Stall|Executed Ipc|Issue Slots|Executed Instructions  " | head -20
done
