#!/usr/bin/env bash
# Second device call of the 2026-12-01 afternoon session: the GPU tests other than the
# pytest-benchmark regression cases (tests/bench, which spend minutes in FLA's autotuning), and
# the span summary's accuracy at 8 and 16 emulated ranks (its timing came from the first call).
#   bash lab/device/device_gpu_recheck2.sh OUT_DIR   (carry .whl: fla-core, flash-linear-attention)
set -uo pipefail
OUT=${1:?usage: lab/device/device_gpu_recheck2.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
start=$(date +%s)
timeout 250 python3 -m pytest -v -m gpu -p no:cacheprovider -rfE --ignore=tests/bench \
  --durations=8 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|s call"
echo "gpu tests done at $(( $(date +%s) - start )) s"
left=$(( 540 - ($(date +%s) - start) ))
timeout "$left" python3 lab/device_cp_summary.py "$OUT" --seconds=$(( left - 60 )) \
  --parts=accuracy 2>&1 | tail -30
echo "done at $(( $(date +%s) - start )) s"
