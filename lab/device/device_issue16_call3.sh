#!/usr/bin/env bash
# Issue 16, third device call (the committed results): gdn2 verify --backward and the cold start
# with the shipped H200 profile, the bench of the default call beside every baseline of the issue
# (FLA chunk_gdn2 / chunk_kda, cuDNN KDA, cuDNN attention; 1x65536 for the providers linear in T),
# and gradient accuracy vs fp64 beside FLA.
#   bash lab/device/device_issue16_call3.sh OUT_DIR      (carry .whl: fla-core, cudnn-frontend, tvm-ffi)
set -uo pipefail
OUT=${1:?usage: lab/device/device_issue16_call3.sh OUT_DIR}
source "$(dirname "$0")/setup.sh"
start=$(date +%s)
timeout 110 python3 -m gdn2_kernels.cli verify --backward --json > "$OUT/verify.json"
echo "verify rc=$? ($(( $(date +%s) - start )) s)"
python3 - "$OUT/verify.json" <<'PYEOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(f"no verify report: {exc}")
worst = max(((e["rel_rms"] or float("inf")) / e["tolerance"], res["case"]["T"], e["name"])
            for res in r["results"] for e in res["errors"])
print("verify: ok" if r.get("ok", True) else "verify: FAILED", "worst rel_rms/tolerance", worst)
PYEOF
cold=$(mktemp -d)
TRITON_CACHE_DIR="$cold" timeout 60 python3 -m gdn2_kernels.tuner.cold_start --json > "$OUT/cold_start.json"
echo "cold start rc=$?"; tail -c 400 "$OUT/cold_start.json"; echo
timeout 330 bash lab/device/device_run.sh "$OUT" bench -p gdn2 -p gdn2-kda -p fla-gdn2 -p fla-kda \
  -p cudnn-kda -p sdpa-cudnn --long 2>&1 | grep -v -E "leaked|nanobind" | tail -45
left=$(( 575 - ($(date +%s) - start) ))
echo "accuracy check with ${left}s left"
[ "$left" -gt 40 ] && timeout "$left" python3 lab/device_bwd_check.py "$OUT" 2>&1 | tail -12
ls -la "$OUT"
