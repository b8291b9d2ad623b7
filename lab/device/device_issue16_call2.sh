#!/usr/bin/env bash
# Issue 16, second device call: GPU tests of the changed kernels (state_bwd without R, intra_bwd
# writing dq/dk/db in the input dtype, the in-kernel g check), pipeline variants against the
# shipped profile, and the bench of the default call against cuDNN's KDA (fp32 beta) with 1x65536.
#   bash lab/device/device_issue16_call2.sh OUT_DIR      (carry .whl: fla-core, cudnn-frontend, tvm-ffi)
set -uo pipefail
OUT=${1:?usage: lab/device/device_issue16_call2.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv
timeout 200 python3 -m pytest -q -m gpu tests/kernels tests/test_ops.py tests/test_gate_check.py \
  tests/test_compile_ahead.py tests/test_segments.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
timeout 240 python3 -m gdn2_kernels.cli bench -p gdn2 -p gdn2-kda -p cudnn-kda -m fwd -m fwdbwd --long \
  --save "$OUT/bench.json" 2>&1 | grep -v "leaked" | tail -30
timeout 300 python3 lab/device_variants.py "$OUT" --shapes=8x2048,1x16384 \
  'state_bwd:{"OPERANDS": "loaded"}' 'intra_bwd:{"num_warps": 8}' 'intra_bwd:{"BK": 32}' \
  'intra_bwd:{"BV": 64}' 'intra_fwd:{"num_warps": 4}' 'intra_fwd:{"BK": 32, "BV": 32}' \
  2>&1 | cut -c1-400
ls -la "$OUT"
