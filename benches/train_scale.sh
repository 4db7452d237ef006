#!/usr/bin/env bash
# `mirage train` at MIRAGE's scale: 8,000 trials x 15,724 voxels -> one 768-output head
# (ridge, alpha 1e5), time and peak memory as `mirage train` reports them, beside scikit-learn's
# Ridge on the same arrays as the outside baseline (set SKLEARN=0 to skip it). The data are a
# random linear map plus noise, so the fit is checked too: both predict held-out trials alike.
# usage: benches/train_scale.sh [TRIALS=8000] [VOXELS=15724] [OUTPUTS=768]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-8000}
V=${2:-15724}
K=${3:-768}
cargo build --release -q
BIN=$PWD/target/release/mirage
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
python3 - "$OUT" "$N" "$V" "$K" <<'PY'
import sys, os
import numpy as np
out, n, v, k = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
w = rng.normal(size=(v, k)).astype(np.float32) / np.sqrt(v)
x = rng.normal(size=(n + 200, v)).astype(np.float32)
y = x @ w + 0.5 * rng.normal(size=(n + 200, k)).astype(np.float32)
os.makedirs(f"{out}/targets")
np.save(f"{out}/X.npy", x[:n]); np.save(f"{out}/X_test.npy", x[n:])
np.save(f"{out}/targets/image.npy", y[:n])
PY
echo "== mirage train: $N trials x $V voxels -> $K outputs"
"$BIN" train --alpha 1e5 --betas "$OUT/X.npy" --targets "$OUT/targets" --out "$OUT/model" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -1
"$BIN" decode --device cpu --renorm none --model "$OUT/model" --betas "$OUT/X_test.npy" --out "$OUT/pred" 2>&1 | tail -1
if [ "${SKLEARN:-1}" = 1 ]; then
  python3 - "$OUT" <<'PY'
import sys, time, resource
import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
out = sys.argv[1]
x = np.load(f"{out}/X.npy"); y = np.load(f"{out}/targets/image.npy")
t = time.perf_counter()
scaler = StandardScaler().fit(x)
ridge = Ridge(alpha=1e5).fit(scaler.transform(x), y)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ours = np.load(f"{out}/pred/image.npy")
theirs = ridge.predict(scaler.transform(np.load(f"{out}/X_test.npy")))
err = np.abs(ours - theirs).max() / np.abs(theirs).max()
print(f"== scikit-learn Ridge (StandardScaler + Ridge(alpha=1e5)): {dt:.1f} s, peak memory {peak:.0f} MB")
print(f"   held-out predictions, mirage vs scikit-learn: max relative difference {err:.1e}")
PY
fi
