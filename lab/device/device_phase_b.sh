#!/usr/bin/env bash
# intra_bwd PHASE_B="split" (2026-12-01 afternoon): GPU equality of the split phases, then the
# pipeline variants beside the shipped H200 profile, then issue 19's weak-decay CP accuracy cases.
#   bash lab/device/device_phase_b.sh OUT_DIR   (carry .whl)
set -uo pipefail
OUT=${1:?usage: lab/device/device_phase_b.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
start=$(date +%s)
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/kernels/test_intra_bwd.py \
  2>&1 | tail -6 | tee "$OUT/gpu_tests_phase_b.log"
echo "tests done at $(( $(date +%s) - start )) s"
timeout 280 python3 lab/device_variants.py "$OUT" --shapes=8x2048,1x16384 \
  'intra_bwd:{"PHASE_B": "split"}' \
  'intra_bwd:{"PHASE_B": "split", "PHASE_D": "split"}' \
  'intra_bwd:{"PHASE_B": "split", "BK": 32}' \
  'intra_bwd:{"PHASE_B": "split", "BV": 32}' \
  'intra_bwd:{"PHASE_B": "split", "num_warps": 8}' \
  'intra_bwd:{"PHASE_B": "split", "PHASE_D": "split", "num_warps": 8}' \
  'intra_bwd:{"PHASE_B": "split", "num_stages": 1}' 2>&1 | tail -40
echo "variants done at $(( $(date +%s) - start )) s"
left=$(( 520 - ($(date +%s) - start) ))
[ "$left" -gt 40 ] && timeout "$left" python3 lab/device_cp_summary.py "$OUT" \
  --seconds=$(( left - 30 )) --parts=accuracy --cases=4,5 2>&1 | tail -4
echo "done at $(( $(date +%s) - start )) s"
