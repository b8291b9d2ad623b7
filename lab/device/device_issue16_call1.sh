#!/usr/bin/env bash
# Issue 16, first device call: the GPU tests of the in-kernel g check, its cost, the bench of the
# default call against cuDNN's KDA (with 1x65536), and Nsight Compute on the stage kernels.
#   bash lab/device/device_issue16_call1.sh OUT_DIR      (carry .whl: fla-core, cudnn-frontend, tvm-ffi)
set -uo pipefail
OUT=${1:?usage: lab/device/device_issue16_call1.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv
timeout 150 python3 -m pytest -q -m gpu tests/test_gate_check.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
timeout 120 python3 lab/device_gate_cost.py "$OUT" 8x2048,1x16384 2>&1 | tail -20
timeout 240 python3 -m gdn2_kernels.cli bench -p gdn2 -p gdn2-kda -p cudnn-kda -m fwd -m fwdbwd --long \
  --save "$OUT/bench.json" 2>&1 | tail -40
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for shape in 8x2048 1x16384; do
  timeout 150 "$NCU" --clock-control none --kernel-name regex:'_(intra|state)_' --launch-skip 5 \
    --launch-count 5 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section LaunchStats --section Occupancy --section WarpStateStats \
    python3 lab/device_ncu.py "$shape" > "$OUT/ncu_$shape.txt" 2>&1
  grep -E "_kernel|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Compute \(SM\)|L2 Hit|Local" \
    "$OUT/ncu_$shape.txt" | head -60
done
ls -la "$OUT"
