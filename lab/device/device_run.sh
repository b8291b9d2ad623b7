#!/usr/bin/env bash
# Benchmarks and the per-stage breakdown on a GPU machine without internet; results land in OUT_DIR.
#
#   bash lab/device/device_run.sh OUT_DIR [all|bench|decode|stages] [extra `gdn2 bench` options]
#
# Installs the carried wheels (.whl/*.whl: fla-core) into /tmp/site; Mamba-2's Triton SSD sources
# are read from .whl/mamba_ssd (no install). Writes, per GPU (name sanitised) and UTC date:
#   <date>_<GPU>.json / .png          gdn2 bench, fwd and fwd+bwd, default token budget
#   <date>_<GPU>_decode.json / .png   gdn2 bench, decode batch sweep
#   <date>_<GPU>_stages.json          gdn2 stages (2x8192), plus bench.log / stages.log
# Copy the JSON/PNG files to bench/results/ and run `python bench/render_results.py`.
# The JSON reports are rewritten after every row and resumed (`--resume`): a run cut off by a time
# limit keeps its rows, and running the same command again on the same machine measures only the
# missing ones. TRITON_CACHE_AUTOTUNING=1 keeps FLA's autotune choices in the Triton cache, so the
# second run does not autotune again.
set -uo pipefail
OUT=${1:?usage: lab/device/device_run.sh OUT_DIR [all|bench|decode|stages] [gdn2 bench options]}
PART=${2:-all}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
source "$(dirname "$0")/setup.sh"
GDN2="python3 -m gdn2_kernels.cli"

GPU=$(python3 -c "import torch; from gdn2_kernels._device import sanitize_gpu_name; \
print(sanitize_gpu_name(torch.cuda.get_device_name(0)))") || exit 1
STEM="$(date -u +%Y-%m-%d)_${GPU}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.limit \
  --format=csv 2>/dev/null | tee "$OUT/bench.log"

rc=0
if [[ $PART == all || $PART == bench ]]; then
  $GDN2 bench -m fwd -m fwdbwd --save "$OUT/$STEM.json" --resume --plot "$OUT/$STEM.png" "$@" \
    2>&1 | tee -a "$OUT/bench.log" || rc=1
fi
if [[ $PART == all || $PART == decode ]]; then
  $GDN2 bench -m decode --save "$OUT/${STEM}_decode.json" --resume --plot "$OUT/${STEM}_decode.png" "$@" \
    2>&1 | tee -a "$OUT/bench.log" || rc=1
fi
if [[ $PART == all || $PART == stages ]]; then
  $GDN2 stages --shape 2x8192 --json > "$OUT/${STEM}_stages.json" || rc=1
  $GDN2 stages --shape 1x16384 2>&1 | tee "$OUT/stages.log" || rc=1
fi
ls -la "$OUT"
exit $rc
