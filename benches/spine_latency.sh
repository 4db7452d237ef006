#!/usr/bin/env bash
# End-to-end latency of the daemon with identity stages, measured at a real subscriber:
# a Python pyneal-scanner stand-in (pyzmq) or pylsl outlet sends 64x64x36 float32 volumes at
# RATE Hz, a pyzmq SUB receives the published `volume` messages, and the latency is
# send (or LSL acquisition timestamp) -> subscriber receipt on the shared monotonic clock.
# The volumes are random (no anatomy), so processing stages are off unless STAGES is set:
# STAGES="" benches/spine_latency.sh runs them with the default configuration.
# usage: benches/spine_latency.sh [N=500] [RATE=20]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500}
RATE=${2:-20}
STAGES=${STAGES-"--set motion.enabled=false"}
cargo build --release -q
BIN=target/release/mirage
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== pyneal:// ($N volumes, 64x64x36 float32, $RATE Hz)"
PP=$(port); SP=$(port)
$BIN run --ingest "pyneal://127.0.0.1:$PP" --publish "tcp://127.0.0.1:$SP" --record "$OUT/pyneal" \
    --stop-after "$N" --no-lsl --quiet $STAGES 2> "$OUT/pyneal.log" &
(cd tests/python && python3 pyneal_roundtrip.py --pyneal "tcp://127.0.0.1:$PP" --sub "tcp://127.0.0.1:$SP" \
    --float32 "$N" --shape 64,64,36 --rate "$RATE" --report "$OUT/pyneal.json" > /dev/null)
wait
python3 -c "import json,sys; r=json.load(open('$OUT/pyneal.json')); print('send -> subscriber (ms):', json.dumps(r['send_to_subscriber_ms']))"
sed -n '/^latency/,$p' "$OUT/pyneal.log"

echo "== lsl:// ($N volumes, 64x64x36 float32, $RATE Hz)"
SP=$(port); NAME="mirage-bench-$SP"; FB="mirage-feedback-$SP"
printf '[publish]\nlsl_feedback = "%s"\n' "$FB" > "$OUT/cfg.toml"
$BIN run --config "$OUT/cfg.toml" --ingest "lsl://$NAME" --publish "tcp://127.0.0.1:$SP" --record "$OUT/lsl" \
    --stop-after "$N" --quiet $STAGES 2> "$OUT/lsl.log" &
(cd tests/python && python3 lsl_roundtrip.py --name "$NAME" --sub "tcp://127.0.0.1:$SP" --feedback "$FB" \
    --n "$N" --shape 64,64,36 --rate "$RATE" --report "$OUT/lsl.json" > /dev/null)
wait
python3 -c "import json; r=json.load(open('$OUT/lsl.json')); print('acquisition -> subscriber (ms):', json.dumps(r['acquisition_to_subscriber_ms'])); print('acquisition -> feedback inlet (ms):', json.dumps(r['acquisition_to_feedback_inlet_ms']))"
sed -n '/^latency/,$p' "$OUT/lsl.log"
