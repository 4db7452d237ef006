#!/usr/bin/env python3
"""Soak: a pyneal stream at TR 50 ms for 30 minutes (by default) through the whole daemon
(motion, GLM, publish, recording), a real sender process (`mirage simulate --stream`) and a
pyzmq subscriber. Reports the daemon's resident memory over time, the rolling ingest→publish
percentiles of its `status` topic per interval (drift), and lost volumes (sent vs received,
recorded, published, at the subscriber). With --heaptrack the daemon runs under heaptrack (Debian's
`heaptrack`), and the report adds its heap profile: peak and leaked heap, and the call sites that
held the most at the peak, so that growth in resident memory is explained. Not in CI.

usage: benches/soak.py [--minutes 30] [--tr 0.05] [--shape 64,64,36] [--heaptrack] [--json OUT]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRAGE = os.environ.get("MIRAGE", os.path.join(ROOT, "target", "release", "mirage"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def process_of(exe, timeout=10.0):
    """The pid of the newest process running `exe` (the daemon under heaptrack's wrapper)."""
    exe = os.path.realpath(exe)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.path.realpath(f"/proc/{d}/exe") == exe:
                        pids.append(int(d))
                except OSError:
                    pass
        if pids:
            return max(pids)
        time.sleep(0.1)
    sys.exit(f"no process runs {exe}")


def heap_profile(path):
    """heaptrack_print's summary of a profile: its totals (peak heap, peak RSS, leaked) and the
    call sites that held the most heap at the peak (each with its first frames)."""
    out = subprocess.run(["heaptrack_print", "-f", path, "-n", "8", "-s", "2", "-p", "1", "-a", "0", "-T", "0",
                          "-l", "0"], capture_output=True, text=True).stdout
    lines = out.splitlines()
    summary = [l.strip() for l in lines if l.startswith(("peak heap memory", "peak RSS", "total memory leaked",
                                                           "calls to allocation", "total runtime", "temporary"))]
    start = next((i for i, l in enumerate(lines) if "PEAK MEMORY CONSUMERS" in l), None)
    peak = []
    for l in lines[start + 1:] if start is not None else []:
        if l.isupper() and peak:
            break
        if "consumed over" in l:
            peak.append({"site": l.strip().rstrip(":"), "frames": []})
        elif peak and l.startswith("    ") and not l.strip().startswith(("at ", "in ")) and "mirage" in l:
            # Our own frames (mangled names keep the crate and function names readable).
            if len(peak[-1]["frames"]) < 3:
                peak[-1]["frames"].append(l.strip()[:160])
    return {"summary": summary, "peak": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--tr", type=float, default=0.05)
    ap.add_argument("--shape", default="64,64,36")
    ap.add_argument("--interval", type=float, default=60, help="seconds per report row")
    ap.add_argument("--json")
    ap.add_argument("--heaptrack", action="store_true", help="run the daemon under heaptrack; report its heap profile")
    ap.add_argument("--keep", action="store_true", help="keep the session folder (TR 50 ms for 30 min: 21 GB)")
    a = ap.parse_args()
    volumes = int(a.minutes * 60 / a.tr)
    work = tempfile.mkdtemp(prefix="mirage-soak-")
    session = os.path.join(work, "session")
    ingest, pub = free_port(), free_port()
    profile = os.path.join(work, "daemon.heaptrack")
    wrapper = ["heaptrack", "-o", profile] if a.heaptrack else []
    launcher = subprocess.Popen(
        wrapper + [MIRAGE, "run", "--ingest", f"pyneal://127.0.0.1:{ingest}", "--publish", f"tcp://127.0.0.1:{pub}",
                   "--record", session, "--no-lsl", "--quiet", "--set", "publish.status_interval_s=1"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "daemon.log"), "w"))
    daemon_pid = process_of(MIRAGE) if a.heaptrack else launcher.pid
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100000)
    for t in (b"volume", b"status"):
        sub.setsockopt(zmq.SUBSCRIBE, t)
    sub.connect(f"tcp://127.0.0.1:{pub}")
    time.sleep(1)
    sender = subprocess.Popen(
        [MIRAGE, "simulate", "--seed", "1", "--shape", a.shape, "--tr", str(a.tr), "--volumes", str(volumes),
         "--stream", f"pyneal://127.0.0.1:{ingest}", "--speed", "tr"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "sender.log"), "w"))
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    rows, seen, last_status = [], 0, None
    start = time.monotonic()
    next_row = start + a.interval
    window = []

    def row():
        r = last_status or {}
        roll = r.get("rolling_ms", {}).get("end_to_end", {})
        rows.append({"minute": round((time.monotonic() - start) / 60, 2), "rss_mb": round(rss_mb(daemon_pid), 1),
                     "received": r.get("received"), "rolling_p50_ms": roll.get("p50"),
                     "rolling_p99_ms": roll.get("p99"), "rolling_max_ms": roll.get("max"),
                     "worst_rolling_p99_in_interval_ms": max(window) if window else None, "subscriber": seen})
        print(json.dumps(rows[-1]), file=sys.stderr)
        window.clear()

    last_volume = time.monotonic()
    # Until the sender is done and no volume came for 3 s.
    while sender.poll() is None or time.monotonic() - last_volume < 3:
        if dict(poller.poll(200)).get(sub):
            frames = sub.recv_multipart()
            if frames[0] == b"volume":
                seen += 1
                last_volume = time.monotonic()
            else:
                last_status = json.loads(frames[1])
                p99 = last_status.get("rolling_ms", {}).get("end_to_end", {}).get("p99")
                if p99 is not None:
                    window.append(p99)
        if time.monotonic() >= next_row:
            row()
            next_row += a.interval
    row()
    os.kill(daemon_pid, signal.SIGTERM)
    launcher.wait(timeout=600)
    final = None
    with open(os.path.join(session, "messages.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m["topic"] == "status":
                final = m["header"]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tr_s": a.tr, "shape": a.shape,
        "minutes": a.minutes, "sent": volumes, "sender_exit": sender.returncode,
        "received": final["received"], "recorded": final["recorded"], "published": final["published"],
        "at_subscriber": seen, "rejected": final["rejected"], "errors": final["errors"],
        "end_to_end_ms": final["end_to_end_ms"], "rows": rows,
        "session_gb": sum(os.path.getsize(os.path.join(session, f)) for f in os.listdir(session)) / 1e9,
    }
    report["lost"] = volumes - min(report["received"], report["recorded"], report["published"], seen)
    if a.heaptrack:
        files = [f for f in os.listdir(work) if f.startswith("daemon.heaptrack")]
        report["heap"] = heap_profile(os.path.join(work, files[0])) if files else {"error": "no heaptrack output"}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
