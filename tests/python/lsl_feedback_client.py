"""A stock pylsl client, as a PsychoPy experiment would write it: resolves mirage-rt's feedback
outlet by name, reads its description (channel labels, units, types; nominal rate) and every
sample until N have arrived.

usage: lsl_feedback_client.py NAME N
Prints a JSON report.
"""
import json
import math
import sys
import time

import pylsl

name, n = sys.argv[1], int(sys.argv[2])
streams = pylsl.resolve_byprop("name", name, 1, 30.0)
if not streams:
    print(json.dumps({"problems": [f"no LSL stream named {name}"]}))
    sys.exit(1)
inlet = pylsl.StreamInlet(streams[0], max_buflen=60)
info = inlet.info(timeout=10.0)
channels = []
ch = info.desc().child("channels").child("channel")
while not ch.empty():
    channels.append({k: ch.child_value(k) for k in ("label", "unit", "type")})
    ch = ch.next_sibling("channel")
samples = []
deadline = time.time() + 60
while len(samples) < n and time.time() < deadline:
    s, _ = inlet.pull_sample(timeout=1.0)
    if s is not None:
        samples.append([None if math.isnan(x) else x for x in s])
print(json.dumps({
    "channel_count": info.channel_count(),
    "nominal_srate": info.nominal_srate(),
    "type": info.type(),
    "channels": channels,
    "indices": [int(s[0]) for s in samples],
    "first": samples[0] if samples else None,
}))
