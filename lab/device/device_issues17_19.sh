#!/usr/bin/env bash
# Fourth device call of 2026-12-01 (issues 17 and 19 on one GPU, and issue 17's no-regression
# check): GPU tests of the FLA API, layer, gate check and span summaries; gdn2 verify --backward
# with the in-kernel gate cases; the default call's bench at two shapes; the span summary's cost;
# a small flash-linear-attention GDN-2 model trained both ways (FLA's kernels, then ours).
#   bash lab/device/device_issues17_19.sh OUT_DIR   (carry .whl: fla-core, flash-linear-attention,
#                                                 cudnn-frontend, tvm-ffi)
set -uo pipefail
OUT=${1:?usage: lab/device/device_issues17_19.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
start=$(date +%s)
timeout 170 python3 -m pytest -q -m gpu tests/test_fla_api.py tests/test_layer.py \
  tests/test_layer_fla.py tests/test_gate_check.py tests/test_cp_summary.py 2>&1 \
  | tail -15 | tee "$OUT/gpu_tests.log"
timeout 80 python3 -m gdn2_kernels.cli verify --backward --json > "$OUT/verify.json"
echo "verify rc=$? at $(( $(date +%s) - start )) s"
timeout 70 python3 -m gdn2_kernels.cli bench -p gdn2 -m fwd -m fwdbwd --shapes 8x2048,1x16384 \
  --save "$OUT/bench_default_call.json" 2>&1 | tail -14
timeout 70 python3 lab/device_cp_summary.py "$OUT" --seconds=55 2>&1 | tail -8
left=$(( 510 - ($(date +%s) - start) ))
echo "FLA training with ${left}s left"
[ "$left" -gt 60 ] && timeout "$left" python3 lab/device_fla_train.py "$OUT" --steps=20 \
  --dtype=bf16 --fla-configs=2 2>&1 | tail -12
ls -la "$OUT"
