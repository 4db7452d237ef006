"""An LSL scanner stand-in: streams volumes from a pylsl outlet (one sample per volume, geometry
in desc/volume), reads mirage-rt's `mirage-feedback` outlet with a pylsl inlet, and checks the
published volumes on a SUB socket.

usage: lsl_roundtrip.py --name STREAM --sub tcp://127.0.0.1:Q [--feedback mirage-feedback]
           [--n N] [--shape X,Y,Z] [--format float32|int16] [--rate HZ] [--report OUT.json]
"""
import argparse
import json
import sys
import threading
import time

import numpy as np
import pylsl

from mirage_sub import collect, percentiles, subscribe


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--sub", required=True)
    p.add_argument("--feedback", default="mirage-feedback")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--shape", default="20,24,16")
    p.add_argument("--format", default="float32", choices=["float32", "int16"])
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--report")
    args = p.parse_args()

    shape = tuple(int(s) for s in args.shape.split(","))
    n_ch = int(np.prod(shape))
    affine = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -40], [0, 0, 2.5, -20], [0, 0, 0, 1]])
    tr = 1.0 / args.rate
    fmt = pylsl.cf_float32 if args.format == "float32" else pylsl.cf_int16
    info = pylsl.StreamInfo(args.name, "fMRI", n_ch, 1.0 / tr, fmt, "lsl-roundtrip-" + args.name)
    vol = info.desc().append_child("volume")
    vol.append_child_value("dims", " ".join(str(s) for s in shape))
    vol.append_child_value("affine", " ".join(repr(float(x)) for x in affine.ravel()))
    vol.append_child_value("tr", repr(tr))
    vol.append_child_value("run", "lsl-run")
    outlet = pylsl.StreamOutlet(info, 0, 30)

    rng = np.random.default_rng(11)
    if args.format == "float32":
        vols = [rng.normal(800.0, 40.0, size=shape).astype(np.float32) for _ in range(args.n)]
    else:
        vols = [rng.integers(-3000, 3000, size=shape).astype(np.int16) for _ in range(args.n)]

    problems = []
    feedback = pylsl.resolve_byprop("name", args.feedback, 1, 20.0)
    if not feedback:
        print(json.dumps({"problems": [f"no LSL stream named {args.feedback}"]}))
        sys.exit(1)
    fb_inlet = pylsl.StreamInlet(feedback[0], max_buflen=60)
    fb_inlet.open_stream(10.0)
    sub = subscribe(args.sub)
    if not outlet.wait_for_consumers(30.0):
        print(json.dumps({"problems": ["the daemon never connected an inlet"]}))
        sys.exit(1)
    time.sleep(0.5)

    stamps = []
    # One sample = one volume, x fastest; flattened before timing so the clock starts when the
    # scanner would hand the volume over, not while numpy reorders it.
    flat = [np.ascontiguousarray(v.ravel(order="F")) for v in vols]

    def send():
        next_t = pylsl.local_clock()
        for v in flat:
            delay = next_t - pylsl.local_clock()
            if delay > 0:
                time.sleep(delay)
            next_t += tr
            ts = pylsl.local_clock()
            stamps.append(ts)
            outlet.push_chunk(v, ts, True)

    fb = []

    def read_feedback():
        deadline = time.monotonic() + 30 + len(vols) * tr
        while len(fb) < len(vols) and time.monotonic() < deadline:
            sample, ts = fb_inlet.pull_sample(timeout=0.2)
            if sample is not None:
                fb.append((sample, ts, pylsl.local_clock()))

    sender = threading.Thread(target=send)
    reader = threading.Thread(target=read_feedback)
    reader.start()
    sender.start()
    got = collect(sub, len(vols), timeout_s=30 + len(vols) * tr)
    sender.join()
    reader.join()

    if len(got) != len(vols):
        problems.append(f"received {len(got)} volume messages, sent {len(vols)}")
    latencies = []
    for i, (header, arrays, t_recv) in enumerate(got):
        if header["index"] != i:
            problems.append(f"message {i} has index {header['index']}")
            continue
        if not np.array_equal(arrays["data"], vols[i].astype(np.float32)):
            problems.append(f"volume {i}: values differ")
        if not np.allclose(np.array(header["affine"]), affine):
            problems.append(f"volume {i}: affine differs")
        if header["acq_time"] is None or abs(header["acq_time"] - stamps[i]) > 1e-3:
            problems.append(f"volume {i}: acq_time {header['acq_time']} != sample timestamp {stamps[i]}")
        latencies.append((t_recv - stamps[i]) * 1e3)
    fb_index = [int(s[0]) for s, _, _ in fb]
    if fb_index != list(range(len(vols))):
        problems.append(f"feedback indices {fb_index}")
    fb_latency = [(t_local - ts) * 1e3 for _, ts, t_local in fb]
    report = {
        "sent": len(vols),
        "received": len(got),
        "feedback_samples": len(fb),
        "feedback_first": fb[0][0] if fb else None,
        "acquisition_to_subscriber_ms": percentiles(latencies),
        "acquisition_to_feedback_inlet_ms": percentiles(fb_latency),
        "problems": problems,
    }
    text = json.dumps(report, indent=1)
    if args.report:
        open(args.report, "w").write(text)
    print(text)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
