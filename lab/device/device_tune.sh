#!/usr/bin/env bash
# Full default tune on a GPU machine, then a cold-start check with the profile it made.
#
#   OUT=/some/folder bash lab/device/device_tune.sh [extra `gdn2 tune` options, e.g. --devices all]
#
# Writes under $OUT (default ./out):
#   info.json                  `gdn2 info --json` before the tune (GPU/NVML, software, spaces)
#   trials.jsonl               the trial log (every trial, appended as it finished; resumable)
#   <GPU>.json                 the profile (cache schema) -> commit it as profiles/<GPU>.json
#   tune.json.gz               `gdn2 tune --json` (searches, per-BT pipelines, speed-up, counts),
#                              gzipped as it is committed to profiles/logs/
#   cold_start.json            fresh process, empty Triton cache, first fwd+bwd with the profile
#   cold_start_serial.json     the same with GDN2_COMPILE_AHEAD=0 (kernels compiled one by one)
#   verify.json                `gdn2 verify --backward --json` with the profile
#   timing.txt                 wall-clock seconds of the tune and the cold start
# The user cache goes to a temporary folder so the machine's ~/.cache/gdn2 is not touched, and
# the writer's lock file is removed at the end: $OUT holds only the eight files above (the device
# tool brings back at most eight).
set -euo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export GDN2_CACHE_DIR="$(mktemp -d)"
trap 'rm -rf "$GDN2_CACHE_DIR" "$OUT"/*.lock' EXIT
PY="${PYTHON:-python}"

$PY -m gdn2_kernels.cli info --json > "$OUT/info.json"
PROFILE="$OUT/$($PY -c 'from gdn2_kernels import _device, config_files; print(config_files.profile_filename(_device.gpu_name()))' 2>/dev/null)"

start=$(date +%s)
$PY -m gdn2_kernels.cli tune --max-minutes 9 --log "$OUT/trials.jsonl" --output "$PROFILE" --json "$@" \
    > "$OUT/tune.json"
gzip -9 -n "$OUT/tune.json"
tune_s=$(( $(date +%s) - start ))

cold_cache="$(mktemp -d)"
start=$(date +%s)
TRITON_CACHE_DIR="$cold_cache" GDN2_CONFIG_FILE="$PROFILE" $PY -m gdn2_kernels.tuner.cold_start --json \
    > "$OUT/cold_start.json"
cold_s=$(( $(date +%s) - start ))
rm -rf "$cold_cache"
# The same with every kernel compiled at its first launch, one after another (for comparison).
cold_cache="$(mktemp -d)"
TRITON_CACHE_DIR="$cold_cache" GDN2_CONFIG_FILE="$PROFILE" GDN2_COMPILE_AHEAD=0 \
    $PY -m gdn2_kernels.tuner.cold_start --json > "$OUT/cold_start_serial.json"
rm -rf "$cold_cache"

GDN2_CONFIG_FILE="$PROFILE" $PY -m gdn2_kernels.cli verify --backward --json > "$OUT/verify.json" \
    || { echo "verify reported failures:"; $PY - "$OUT/verify.json" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
for res in report["results"]:
    label = "-".join(str(res["case"][k]) for k in ("B", "T", "H", "K", "V", "dtype", "decay"))
    if res.get("error"):
        print(" ", label, res["error"][:300])
    for e in res["errors"]:
        if e["rel_rms"] is None or e["rel_rms"] > e["tolerance"]:
            print(" ", label, e["name"], e["rel_rms"], ">", e["tolerance"])
PYEOF
}
printf 'tune_s %s\ncold_start_process_s %s\nprofile %s\n' "$tune_s" "$cold_s" "$PROFILE" \
    | tee "$OUT/timing.txt"
