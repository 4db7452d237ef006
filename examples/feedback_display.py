#!/usr/bin/env python3
"""A neurofeedback display to start from: a thermometer bar fed by mirage-rt's feedback value.

    python3 examples/feedback_display.py lsl:mirage-feedback          # the LSL outlet
    python3 examples/feedback_display.py tcp://127.0.0.1:5557         # the ZMQ `roi` topic
    python3 examples/feedback_display.py lsl:mirage-feedback --psychopy
    python3 examples/feedback_display.py lsl:mirage-feedback --headless --count 80

`feedback_values(source)` is the part to reuse: it yields (volume index, value) as each volume's
feedback arrives, the value None where the recipe has none (before a baseline block). A PsychoPy
experiment calls it the same way (or `next()` on it once per frame loop) and draws its own
stimulus; `--psychopy` shows a bar in a PsychoPy window, the default a bar in the terminal, and
`--headless` one JSON line per volume (what the project's tests read).

The value is the `[feedback]` recipe's displayed value, 0..feedback.max (100 by default; with
feedback.negative from feedback.min). Needs pylsl for `lsl:` and pyzmq for `tcp://`.
"""
import argparse
import json
import math
import sys


def _lsl_values(name, timeout_s):
    import pylsl

    streams = pylsl.resolve_byprop("name", name, 1, timeout_s)
    if not streams:
        raise SystemExit(f"no LSL stream named {name} within {timeout_s} s")
    inlet = pylsl.StreamInlet(streams[0], max_buflen=60)
    labels = []
    ch = inlet.info(timeout=timeout_s).desc().child("channels").child("channel")
    while not ch.empty():
        labels.append(ch.child_value("label"))
        ch = ch.next_sibling("channel")
    if "feedback" not in labels:
        raise SystemExit(f"stream {name} has no feedback channel (channels: {labels}): set [feedback] recipe")
    at = labels.index("feedback")
    while True:
        sample, _ = inlet.pull_sample(timeout=timeout_s)
        if sample is None:
            return
        value = sample[at]
        yield int(sample[0]), None if math.isnan(value) else float(value)


def _zmq_values(address, timeout_s):
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"roi")
    sub.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sub.connect(address)
    while True:
        try:
            frames = sub.recv_multipart()
        except zmq.Again:
            return
        if frames[0] == b"roi":
            header = json.loads(frames[1])
            yield int(header["index"]), header.get("feedback")


def feedback_values(source, timeout_s=30.0):
    """Yields (volume index, feedback value or None) from `lsl:NAME` or `tcp://HOST:PORT`; ends
    when nothing has come for `timeout_s` seconds."""
    if source.startswith("lsl:"):
        return _lsl_values(source[4:], timeout_s)
    if source.startswith("tcp://"):
        return _zmq_values(source, timeout_s)
    raise SystemExit(f"source {source!r}: give lsl:NAME or tcp://HOST:PORT")


def terminal_bar(index, value, full_scale, width=50):
    """One line: the volume and a bar filled to value / full_scale."""
    if value is None:
        return f"volume {index:5d}  [{' ' * width}]   --"
    filled = max(0, min(width, round(width * value / full_scale)))
    return f"volume {index:5d}  [{'#' * filled}{' ' * (width - filled)}] {value:6.1f}"


def psychopy_display(values, full_scale):
    """A thermometer in a PsychoPy window: the bar's height follows each value."""
    from psychopy import core, visual

    win = visual.Window(size=(400, 600), color="black", units="norm")
    frame = visual.Rect(win, width=0.4, height=1.6, lineColor="white", fillColor=None)
    bar = visual.Rect(win, width=0.38, height=0.0, fillColor="orange", lineColor=None)
    for _, value in values:
        h = 0.0 if value is None else max(0.0, min(1.0, value / full_scale)) * 1.58
        bar.height, bar.pos = h, (0, -0.79 + h / 2)
        frame.draw()
        bar.draw()
        win.flip()
    win.close()
    core.quit()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="lsl:NAME or tcp://HOST:PORT")
    ap.add_argument("--max", type=float, default=100.0, help="the value of a full bar (feedback.max)")
    ap.add_argument("--count", type=int, default=0, help="stop after this many volumes (0: until the stream ends)")
    ap.add_argument("--timeout", type=float, default=30.0, help="give up after this long without a value, s")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--headless", action="store_true", help="print one JSON line per volume")
    mode.add_argument("--psychopy", action="store_true", help="draw the thermometer in a PsychoPy window")
    a = ap.parse_args(argv)
    values = feedback_values(a.source, a.timeout)
    if a.count:
        values = (v for _, v in zip(range(a.count), values))
    if a.psychopy:
        return psychopy_display(values, a.max)
    for index, value in values:
        if a.headless:
            print(json.dumps({"index": index, "feedback": value}), flush=True)
        else:
            print("\r" + terminal_bar(index, value, a.max), end="", flush=True)
    if not a.headless:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
