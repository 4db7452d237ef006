#!/usr/bin/env python3
"""Latency of `mirage scanner` on Siemens mosaic DICOM: from a file's last byte written into the
watched folder to the volume received by a `mirage run` daemon (pyneal protocol, loopback).

    benches/scanner_latency.py [--volumes 60] [--tr 0.5] [--binary target/release/mirage] [--json OUT]

Makes N mosaic files from the real Siemens export in ../shared/data (pydicom: new acquisition
and instance numbers), writes them one by one at TR pace, stamps time.monotonic() after each
file is closed, and reads the daemon's receipt stamps (CLOCK_MONOTONIC, the same clock) from
the session's volumes.jsonl. Runs the watcher twice — woken by inotify close events, and polling
only (`--no-events`, a network share) — and prints p50/p90/p99/max in ms per mode as JSON.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("MIRAGE_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=60)
    ap.add_argument("--tr", type=float, default=0.5)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "mirage"))
    ap.add_argument("--json", metavar="OUT", help="also write the results here")
    args = ap.parse_args()
    runs = [measure(args, no_events) for no_events in (False, True)]
    doc = {"date": time.strftime("%Y-%m-%d"), "volumes": args.volumes, "tr_s": args.tr, "runs": runs}
    print(json.dumps(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if all(r["received"] == args.volumes for r in runs) else 1


def measure(args, no_events):
    src = os.path.join(DATA, "pyneal-scanner-formats", "Siemens_env", "funcData", "001_000013_000001.dcm")
    with tempfile.TemporaryDirectory() as tmp:
        staged, watched, session = (os.path.join(tmp, d) for d in ("staged", "export", "session"))
        os.makedirs(staged)
        os.makedirs(watched)
        ds = pydicom.dcmread(src)
        blobs = []
        for k in range(args.volumes):
            ds.AcquisitionNumber = ds.InstanceNumber = k + 1
            ds.SOPInstanceUID = generate_uid()
            path = os.path.join(staged, f"{k:05d}.dcm")
            ds.save_as(path)
            blobs.append(open(path, "rb").read())
        port = free_port()
        daemon = subprocess.Popen(
            [args.binary, "run", "--ingest", f"pyneal://127.0.0.1:{port}", "--publish", "none", "--no-lsl",
             "--quiet", "--record", session, "--console", "none"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        scanner_cmd = [args.binary, "scanner", "--watch", watched, "--vendor", "siemens",
                       "--to", f"pyneal://127.0.0.1:{port}", "--stop-after", str(args.volumes), "--poll", "0.1"]
        if no_events:
            scanner_cmd.append("--no-events")
        scanner = subprocess.Popen(scanner_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        written = []
        start = time.monotonic()
        for k, blob in enumerate(blobs):
            time.sleep(max(0.0, start + k * args.tr - time.monotonic()))
            with open(os.path.join(watched, f"MR.{k + 1:05d}.dcm"), "wb") as f:
                f.write(blob)
            written.append(time.monotonic())
        scanner.wait(timeout=60)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        recv = {}
        with open(os.path.join(session, "volumes.jsonl")) as f:
            for line in f:
                e = json.loads(line)
                recv[e["index"]] = e["recv_time"]
    lat = np.array([(recv[k] - written[k]) * 1e3 for k in range(args.volumes) if k in recv])
    return {"received": len(lat), "mode": "polling every 0.1 s, size settled 0.2 s" if no_events else "inotify close events",
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2)}


if __name__ == "__main__":
    sys.exit(main())
