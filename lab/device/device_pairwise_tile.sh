#!/usr/bin/env bash
# intra_bwd's split pairwise launch on its own key tile (BK_D), 2026-12-01 afternoon: GPU equality
# of the split phases, the pipeline variants beside the shipped H200 profile (end to end and per
# stage), and per-kernel times of two of them.
#   bash lab/device/device_pairwise_tile.sh OUT_DIR   (carry .whl)
set -uo pipefail
OUT=${1:?usage: lab/device/device_pairwise_tile.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
start=$(date +%s)
V=('intra_bwd:{"PHASE_D": "split", "BK_D": 32}'
   'intra_bwd:{"PHASE_D": "split", "BK_D": 16}'
   'intra_bwd:{"PHASE_B": "split", "PHASE_D": "split", "BK_D": 32}'
   'intra_bwd:{"PHASE_B": "split", "PHASE_D": "split", "BK_D": 16}')
timeout 150 python3 lab/device_variants.py "$OUT" --shapes=8x2048,1x16384 "${V[@]}" 2>&1 \
  | cut -c1-400
echo "variants done at $(( $(date +%s) - start )) s"
timeout 60 python3 lab/device_kernel_times.py "$OUT" --shape=8x2048 "${V[0]}" "${V[2]}" 2>&1 \
  | grep -v Warn | cut -c1-600
echo "kernel times done at $(( $(date +%s) - start )) s"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/kernels/test_intra_bwd.py \
  2>&1 | tail -6 | tee "$OUT/gpu_tests_pairwise_tile.log"
echo "done at $(( $(date +%s) - start )) s"
