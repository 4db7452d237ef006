"""A pyzmq peer of a daemon with CURVE, its keys read by pyzmq's own zmq.auth from the certificate
files `mirage keygen` wrote.

usage: curve_peer.py sub ADDRESS SECONDS [SERVER.key OWN.key_secret]
         subscribes to every topic for SECONDS (with CURVE when keys are given); prints
         {"topics": {topic: count}} as JSON
       curve_peer.py push ADDRESS SERVER.key OWN.key_secret
         offers one native volume header to a zmq:// ingest over CURVE for 3 s; prints
         {"sent": true} once a connection took it, {"sent": false} if none ever did
"""
import json
import sys
import time

import zmq
import zmq.auth


def secure(sock, server, own):
    server_public, _ = zmq.auth.load_certificate(server)
    public, secret = zmq.auth.load_certificate(own)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def main():
    mode, address = sys.argv[1], sys.argv[2]
    ctx = zmq.Context.instance()
    if mode == "sub":
        seconds, keys = float(sys.argv[3]), sys.argv[4:6]
        sub = ctx.socket(zmq.SUB)
        if keys:
            secure(sub, *keys)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(address)
        counts = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sub.poll(100):
                topic = sub.recv_multipart()[0].decode("ascii", "replace")
                counts[topic] = counts.get(topic, 0) + 1
        print(json.dumps({"topics": counts}), flush=True)
    elif mode == "push":
        push = ctx.socket(zmq.PUSH)
        secure(push, sys.argv[3], sys.argv[4])
        push.sndtimeo = 3000
        # Queue only to a connection whose handshake completed, so "sent" means let in.
        push.immediate = True
        push.connect(address)
        header = {"index": 0, "shape": [2, 2, 2], "dtype": "float32", "tr": 1.0}
        try:
            push.send_multipart([json.dumps(header).encode(), b"\0" * 32])
            sent = True
        except zmq.Again:
            sent = False
        push.close(linger=0)
        print(json.dumps({"sent": sent}), flush=True)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
