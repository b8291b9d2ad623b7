#!/usr/bin/env bash
# One device call for what v5 built without a GPU (docs/performance.md): checks, then timings.
#
#   bash lab/device/device_v5_check.sh OUT_DIR
#
# Writes under OUT_DIR:
#   pytest_gpu.log            the GPU tests of compile-ahead, the segmented scans, split phase D
#                             and the device guard (the last needs 2 GPUs, else it is skipped)
#   cold_start.json           fresh process, empty Triton cache, shipped profile, compile ahead on
#   cold_start_serial.json    the same with GDN2_COMPILE_AHEAD=0
#   variants.json             lab/device_variants.py: split phase D, BK = 128 (one value loop
#                             for phases A and B), both, and the segmented state scans
set -uo pipefail
OUT=${1:?usage: lab/device/device_v5_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

timeout 180 $PY -m pytest -q -m gpu tests/test_compile_ahead.py tests/test_segments.py \
    tests/kernels/test_intra_bwd.py tests/test_ops.py -k "gpu or not_the_current or compile" \
    > "$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log"

for mode in ahead serial; do
  cache=$(mktemp -d)
  flag=$([[ $mode == serial ]] && echo 0 || echo 1)
  name=$([[ $mode == serial ]] && echo cold_start_serial || echo cold_start)
  TRITON_CACHE_DIR=$cache GDN2_COMPILE_AHEAD=$flag timeout 60 $PY -m gdn2_kernels.tuner.cold_start --json \
      > "$OUT/$name.json"
  rm -rf "$cache"
  grep -E '"first_call_s"|"compile_ahead"' "$OUT/$name.json"
done

$PY -c "from gdn2_kernels import dispatch; from gdn2_kernels.configs import ProblemKey; \
print('base pipeline:', dispatch.resolve(ProblemKey(128, 128, 'bfloat16')).source)"
timeout 300 $PY lab/device_variants.py "$OUT" \
    'intra_bwd:{"PHASE_D": "split"}' \
    'intra_bwd:{"BK": 128}' \
    'intra_bwd:{"BK": 128, "num_warps": 8}' \
    'intra_bwd:{"BK": 128, "num_warps": 8, "PHASE_D": "split"}' \
    'state_fwd:{"SCAN": "segmented"}+state_bwd:{"SCAN": "segmented"}' \
    2>&1 | tail -12
ls "$OUT"
