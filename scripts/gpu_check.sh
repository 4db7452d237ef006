#!/usr/bin/env bash
# Decoder check on an NVIDIA GPU: CUDA outputs against the CPU's (tolerance 1e-4 for float32
# weights), per-trial decode times of low-rank (r = 512) and full-size MIRAGE heads in float32
# and bf16, of a full-size MindEye2 network (bf16 and float32), the same on this machine's CPU, the pipeline bench with decode on the GPU and on the
# CPU, and, given DATA from scripts/gpu_check_data.sh, a trained model's decode and a
# calibration fit on both devices.
# Usage: scripts/gpu_check.sh MIRAGE_BINARY OUT_DIR [DATA]   (a binary built with --features cuda)
# Writes OUT_DIR/log.txt and one JSON report per timed step. ONLY=REGEX runs only the steps
# whose names match (e.g. ONLY=latent).
set -u
BIN=$1
OUT=$2
DATA=${3:-}
mkdir -p "$OUT"
LOG=$OUT/log.txt
# cudarc opens the CUDA libraries at run time: the driver's, the toolkit's, and pip's.
LIBS=/usr/local/nvidia/lib64:/usr/local/cuda/lib64
for d in $(python3 -c "import nvidia, os; print(' '.join(os.path.join(p, x, 'lib') for p in nvidia.__path__ for x in os.listdir(p)))" 2>/dev/null); do
  [ -d "$d" ] && LIBS=$LIBS:$d
done
export LD_LIBRARY_PATH=$LIBS:${LD_LIBRARY_PATH:-}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } | tee "$LOG"
step() {
  local name=$1 limit=$2
  shift 2
  [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return 0
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -e '^\s*$' -e ' INFO ' | tee -a "$LOG"
  echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
B="$BIN bench-decode --device cuda:0"
step smoke 45 $B --voxels 1000 --rank 64 --trials 5 --compare-cpu 2 --tolerance 1e-4
step lowrank_f32 60 $B --trials 300 --compare-cpu 3 --tolerance 1e-4 --json "$OUT/lowrank_f32.json"
step full_f32 150 $B --rank full --trials 100 --compare-cpu 1 --tolerance 1e-4 --json "$OUT/full_f32.json"
step full_bf16 90 $B --rank full --dtype bf16 --trials 100 --json "$OUT/full_bf16.json"
step lowrank_bf16 45 $B --dtype bf16 --trials 300 --compare-cpu 3 --json "$OUT/lowrank_bf16.json"
step lowrank_cpu 45 "$BIN" bench-decode --device cpu --trials 50 --json "$OUT/lowrank_cpu.json"
# Heads stopped at their latents, 1,000 gallery items ranked from them; 8-bit weights are refused
# on a GPU and timed on that machine's CPU.
# MindEye2 at the published shapes (h = 4096, 256 x 1664 tokens): backbone, clip_proj and the
# blurry latent per trial, then 20 SD-VAE pictures (224 x 224).
step mindeye2_bf16 150 $B --mindeye2 4096 --dtype bf16 --trials 100 --pictures 20 --json "$OUT/mindeye2_bf16.json"
step mindeye2_f32 150 $B --mindeye2 4096 --trials 100 --pictures 20 --json "$OUT/mindeye2_f32.json"
G="--gallery 1000 --compare-cpu 5"
step latent_gallery_f32 120 $B --latent-heads all $G --trials 300 --tolerance 1e-4 --json "$OUT/latent_gallery_f32.json"
step lowrank_gallery_f32 120 $B $G --trials 300 --tolerance 1e-4 --json "$OUT/lowrank_gallery_f32.json"
step latent_q8_refused 30 $B --dtype q8_0 --trials 1
step latent_gallery_q8_cpu 150 "$BIN" bench-decode --device cpu --dtype q8_0 --latent-heads all $G --trials 100 \
  --json "$OUT/latent_gallery_q8_cpu.json"
if [ -n "$DATA" ]; then
  M=$DATA/model
  BETAS=$DATA/imagery-glm/trial_betas.npy
  T=$DATA/imagery/truth/targets/trials
  W=/tmp/gpu-check
  mkdir -p $W
  for dev in cuda:0 cpu; do
    d=${dev%%:*}
    step "decode_$d" 60 "$BIN" decode --device $dev --model $M --betas $BETAS --out $W/dec-$d
    step "calibrate_$d" 120 "$BIN" calibrate --device $dev --model $M --betas $BETAS --targets $T \
      --trials 0-11 --out $W/head-$d.safetensors --report $W/report-$d.json
    step "decode_aligned_$d" 60 "$BIN" decode --device cpu --model $M --betas $BETAS --align $W/head-$d.safetensors \
      --out $W/aligned-$d
  done
  step compare 60 python3 - $W <<'PY'
import json, os, sys
import numpy as np
w = sys.argv[1]
for what in ["dec", "aligned"]:
    for f in sorted(os.listdir(f"{w}/{what}-cuda")):
        a, b = np.load(f"{w}/{what}-cuda/{f}"), np.load(f"{w}/{what}-cpu/{f}")
        print(f"{what} {f}: max |cuda - cpu| {np.abs(a - b).max():.3e}, max |cpu| {np.abs(b).max():.3f}, "
              f"corr {np.corrcoef(a.ravel(), b.ravel())[0, 1]:.6f}")
for d in ["cuda", "cpu"]:
    print(d, json.dumps(json.load(open(f"{w}/report-{d}.json")))[:1500])
PY
fi
P="$BIN bench --shape 64,64,36 --volumes 300 --ingest pyneal --rate 10 --voxels-decoded 15724"
step pipeline_gpu 60 $P --set decode.device=cuda:0 --json "$OUT/pipeline_gpu.json"
step pipeline_cpu 60 $P --set decode.device=cpu --json "$OUT/pipeline_cpu.json"
