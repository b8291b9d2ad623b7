#!/usr/bin/env bash
# Two profiles side by side on this GPU, one device call: `gdn2 verify --backward` of the candidate
# and lab/device_variants.py's base rows (fwd, fwd+bwd, per-stage times) at the bench shapes
# for each profile.
#
#   bash lab/device/device_compare_profiles.sh OUT_DIR CANDIDATE.json [SHAPES]
#
# Writes OUT_DIR/verify_candidate.json, OUT_DIR/candidate/variants.json (GDN2_CONFIG_FILE set to
# the candidate) and OUT_DIR/shipped/variants.json (the shipped profile of this GPU).
set -uo pipefail
OUT=${1:?usage: lab/device/device_compare_profiles.sh OUT_DIR CANDIDATE.json [SHAPES]}
CAND=$(realpath "${2:?candidate profile}")
SHAPES=${3:-8x2048,4x4096,2x8192,1x16384}
mkdir -p "$OUT/candidate" "$OUT/shipped"
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
GDN2_CONFIG_FILE=$CAND timeout 200 $PY -m gdn2_kernels.cli verify --backward --json \
    > "$OUT/verify_candidate.json"; echo "verify rc $?"
GDN2_CONFIG_FILE=$CAND timeout 180 $PY lab/device_variants.py "$OUT/candidate" \
    --shapes="$SHAPES" 2>&1 | grep '^{' | cut -c1-200
timeout 180 $PY lab/device_variants.py "$OUT/shipped" --shapes="$SHAPES" 2>&1 \
    | grep '^{' | cut -c1-200
