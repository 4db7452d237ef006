"""Subscriber side of mirage-rt's publish protocol, shared by the test peers.

frame 0 topic, frame 1 JSON header (its "payloads" describe frames 2...), frames 2... little-endian
arrays. Receive times are time.monotonic(), the same clock (CLOCK_MONOTONIC) as the daemon's stamps
and LSL's local_clock() on Linux.
"""
import json
import time

import numpy as np
import zmq


def subscribe(address, topics=(b"volume",)):
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100000)
    for t in topics:
        sub.setsockopt(zmq.SUBSCRIBE, t)
    sub.connect(address)
    return sub


def decode(frames):
    topic = frames[0].decode("ascii")
    header = json.loads(frames[1])
    arrays = {}
    for descr, buf in zip(header.get("payloads", []), frames[2:]):
        a = np.frombuffer(buf, dtype=np.dtype(descr["dtype"]).newbyteorder("<"))
        arrays[descr["name"]] = a.reshape(descr["shape"], order=descr.get("order", "C"))
    return topic, header, arrays


def collect(sub, n, timeout_s, topic="volume"):
    """Receives until n messages of `topic` arrived or timeout; returns (header, arrays, t_recv) tuples."""
    out = []
    deadline = time.monotonic() + timeout_s
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    while len(out) < n and time.monotonic() < deadline:
        if not poller.poll(100):
            continue
        frames = sub.recv_multipart()
        t = time.monotonic()
        tp, header, arrays = decode(frames)
        if tp == topic:
            out.append((header, arrays, t))
    return out


def percentiles(values_ms):
    v = np.asarray(values_ms, dtype=float)
    if v.size == 0:
        return {}
    return {
        "n": int(v.size),
        "p50": float(np.percentile(v, 50)),
        "p90": float(np.percentile(v, 90)),
        "p99": float(np.percentile(v, 99)),
        "max": float(v.max()),
    }
