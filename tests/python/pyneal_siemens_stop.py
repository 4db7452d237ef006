"""pyneal's own Siemens mosaic processor (unmodified, imported from the peers folder) sends real
mosaics to the daemon one at a time, as its folder watcher would queue them, and must stop by
itself when a reply says STOP.

usage: pyneal_siemens_stop.py PEERS_PYNEAL_DIR MOSAIC_DIR PORT
Prints a JSON report: the volumes sent, the replies, and whether the thread stopped by itself.
"""
import glob
import json
import os
import sys
import time
from queue import Queue

peers, mosaics, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, os.path.join(peers, "pyneal_scanner"))
from utils import Siemens_utils  # noqa: E402
from utils.general_utils import create_pynealSocket  # noqa: E402

socket = create_pynealSocket("127.0.0.1", port)
# The handshake of Siemens_launch_rtfMRI.
msg = "hello from pyneal_scanner "
socket.send_string(msg)
assert socket.recv_string() == msg

replies = []
original_recv = socket.recv_string


def recording_recv(*a, **k):
    r = original_recv(*a, **k)
    replies.append(r)
    return r


socket.recv_string = recording_recv
queue = Queue()
processor = Siemens_utils.Siemens_processMosaic(queue, socket, interval=0.05)
processor.start()
files = sorted(glob.glob(os.path.join(mosaics, "*.dcm")))
for f in files:
    if not processor.is_alive():
        break
    queue.put(f)
    # One mosaic per "TR", as the scanner writes them.
    deadline = time.time() + 5
    while queue.unfinished_tasks and time.time() < deadline:
        time.sleep(0.02)
processor.join(timeout=10)
print(json.dumps({
    "mosaics": len(files),
    "sent": len(replies),
    "replies": replies,
    "stopped_by_itself": not processor.is_alive() and not processor.alive,
}))
