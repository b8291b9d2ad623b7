#!/usr/bin/env bash
# First device call after issue 18's refactor (2026-12-01, second session): every GPU test, the
# span summary's device run for issue 19, the default call's bench at two shapes (to compare with
# bench/results/2026-12-01_NVIDIA_H200_default_call_after_merges.json) and the stage breakdown.
#   bash lab/device/device_gpu_recheck.sh OUT_DIR   (carry .whl: fla-core, flash-linear-attention)
set -uo pipefail
OUT=${1:?usage: lab/device/device_gpu_recheck.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
echo "gpu tests done at $(( $(date +%s) - start )) s"
timeout 110 python3 lab/device_cp_summary.py "$OUT" --seconds=95 2>&1 | tail -30
echo "cp summary done at $(( $(date +%s) - start )) s"
timeout 80 python3 -m gdn2_kernels.cli bench -p gdn2 -m fwd -m fwdbwd --shapes 8x2048,1x16384 \
  --save "$OUT/bench_default_call.json" 2>&1 | tail -14
left=$(( 560 - ($(date +%s) - start) ))
echo "stages with ${left}s left"
[ "$left" -gt 30 ] && timeout "$left" python3 -m gdn2_kernels.cli stages --shape 8x2048 --json \
  > "$OUT/stages_8x2048.json"
tail -c 3000 "$OUT/stages_8x2048.json"
ls -la "$OUT"
