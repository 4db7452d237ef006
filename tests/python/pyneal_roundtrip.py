"""A pyneal-scanner stand-in: sends volumes over pyneal's PAIR protocol and checks, on a SUB
socket, that mirage-rt publishes every one with exactly the values sent, in order.

The sender side mirrors pyneal_scanner: greeting echoed back, then per volume a JSON header
(volIdx, dtype, shape, affine and TR as strings) and the C-order buffer, then wait for the
"received volIdx N" reply.

usage: pyneal_roundtrip.py --pyneal tcp://127.0.0.1:P --sub tcp://127.0.0.1:Q
           [--nifti FILE] [--float64 N] [--float32 N --shape X,Y,Z] [--rate HZ] [--report OUT.json]
"""
import argparse
import json
import sys
import threading
import time

import numpy as np
import zmq

from mirage_sub import collect, percentiles, subscribe


def volumes(args):
    """(array[x,y,z], affine, tr) in sending order."""
    out = []
    if args.nifti:
        import nibabel as nib

        img = nib.load(args.nifti)
        data = np.asanyarray(img.dataobj)  # stored dtype (uint16 for the pyneal test series)
        tr = float(img.header.get_zooms()[3]) if data.ndim == 4 else 2.0
        for t in range(data.shape[3]):
            out.append((np.ascontiguousarray(data[..., t]), img.affine, tr))
    rng = np.random.default_rng(7)
    affine = np.array([[3.0, 0, 0, -90], [0, 3.0, 0, -100], [0, 0, 3.5, -40], [0, 0, 0, 1]])
    for _ in range(args.float64):
        out.append((rng.normal(1000.0, 50.0, size=(16, 20, 12)).astype(np.float64), affine, 1.5))
    if args.float32:
        shape = tuple(int(s) for s in args.shape.split(","))
        for _ in range(args.float32):
            out.append((rng.normal(1000.0, 50.0, size=shape).astype(np.float32), affine, 2.0))
    return out


def send_all(address, vols, rate, sent_times, replies, errors):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.RCVTIMEO, 20000)
    s.connect(address)
    try:
        while True:
            msg = "hello from pyneal_scanner "
            s.send_string(msg)
            if s.recv_string() == msg:
                break
        next_t = time.monotonic()
        for idx, (arr, affine, tr) in enumerate(vols):
            if rate:
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_t += 1.0 / rate
            header = {
                "volIdx": idx,
                "dtype": str(arr.dtype),
                "shape": arr.shape,
                "affine": json.dumps(np.asarray(affine).tolist()),
                "TR": str(tr),
            }
            sent_times[idx] = time.monotonic()
            s.send_json(header, zmq.SNDMORE)
            s.send(arr, flags=0, copy=False, track=False)
            replies.append(s.recv_string())
    except Exception as e:  # reported by the main thread
        errors.append(repr(e))
    finally:
        s.close(linger=1000)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pyneal", required=True)
    p.add_argument("--sub", required=True)
    p.add_argument("--nifti")
    p.add_argument("--float64", type=int, default=0)
    p.add_argument("--float32", type=int, default=0)
    p.add_argument("--shape", default="64,64,36")
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--report")
    args = p.parse_args()

    vols = volumes(args)
    sub = subscribe(args.sub)
    time.sleep(0.5)  # let the subscription reach the publisher
    sent_times, replies, errors = {}, [], []
    sender = threading.Thread(target=send_all, args=(args.pyneal, vols, args.rate, sent_times, replies, errors))
    sender.start()
    got = collect(sub, len(vols), timeout_s=60 + len(vols) * 0.1)
    sender.join()

    problems = list(errors)
    if len(got) != len(vols):
        problems.append(f"received {len(got)} volume messages, sent {len(vols)}")
    latencies = []
    for i, (header, arrays, t_recv) in enumerate(got):
        arr, affine, tr = vols[i]
        if header["index"] != i:
            problems.append(f"message {i} has index {header['index']}")
            continue
        data = arrays["data"]
        if list(data.shape) != list(arr.shape):
            problems.append(f"volume {i}: shape {data.shape} != {arr.shape}")
        elif not np.array_equal(data, arr.astype(np.float32)):
            problems.append(f"volume {i}: values differ (max abs {np.abs(data - arr.astype(np.float32)).max()})")
        if not np.allclose(np.array(header["affine"]), affine, atol=1e-6):
            problems.append(f"volume {i}: affine differs")
        if abs(header["tr"] - tr) > 1e-9:
            problems.append(f"volume {i}: TR {header['tr']} != {tr}")
        latencies.append((t_recv - sent_times[i]) * 1e3)
    bad_replies = [r for r in replies if not r.startswith("received volIdx")]
    if len(replies) != len(vols) or bad_replies:
        problems.append(f"replies: {len(replies)} for {len(vols)} volumes; unexpected: {bad_replies[:3]}")
    report = {
        "sent": len(vols),
        "received": len(got),
        "replies": replies[:3],
        "send_to_subscriber_ms": percentiles(latencies),
        "problems": problems,
    }
    text = json.dumps(report, indent=1)
    if args.report:
        open(args.report, "w").write(text)
    print(text)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
