#!/usr/bin/env bash
# Where intra_bwd's time goes (2026-12-01 afternoon): per-kernel CUDA time of one fwd+bwd with
# intra_bwd's phases fused and split, at 8x2048 and 1x16384, with registers and spills.
#   bash lab/device/device_kernel_times.sh OUT_DIR   (carry .whl)
set -uo pipefail
OUT=${1:?usage: lab/device/device_kernel_times.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
V=('intra_bwd:{"PHASE_D": "split"}' 'intra_bwd:{"PHASE_B": "split"}'
   'intra_bwd:{"PHASE_B": "split", "PHASE_D": "split"}')
timeout 200 python3 lab/device_kernel_times.py "$OUT" --shape=8x2048 "${V[@]}" 2>&1 | tail -8
mv "$OUT/kernel_times.json" "$OUT/kernel_times_8x2048.json"
timeout 150 python3 lab/device_kernel_times.py "$OUT" --shape=1x16384 "${V[2]}" 2>&1 | tail -4
mv "$OUT/kernel_times.json" "$OUT/kernel_times_1x16384.json"
