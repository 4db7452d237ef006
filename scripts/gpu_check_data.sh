#!/usr/bin/env bash
# Makes the small data set scripts/gpu_check.sh compares devices on: a model trained on a
# simulated seen session, and an imagery session's betas and targets (32×32×20 grid).
# Usage: scripts/gpu_check_data.sh MIRAGE_BINARY DATA_DIR
set -eu
BIN=$1
D=$2
mkdir -p "$D"
sim() {
  "$BIN" simulate --seed 1 --shape 32,32,20 --condition "$1" --volumes "$2" --set "run_seed=$3" \
    --set motion_mm=0 --set motion_deg=0 --out "$D/$1" >/dev/null
  "$BIN" glm "$D/$1/bold.nii.gz" --events "$D/$1/events.tsv" --mask "$D/$1/truth/roi_mask.nii.gz" \
    --out "$D/$1-glm" >/dev/null
}
sim seen 600 1
sim imagery 400 2
"$BIN" train --alpha 1000 --betas "$D/seen-glm/trial_betas.npy" --targets "$D/seen/truth/targets/trials" \
  --mask "$D/seen/truth/roi_mask.nii.gz" --out "$D/model" >/dev/null
# Only what the checks read travels.
rm -rf "$D/seen" "$D/seen-glm" "$D/imagery/bold.nii.gz"
