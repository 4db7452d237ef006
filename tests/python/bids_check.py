"""Checks `mirage export` against the session it came from, with nibabel and the csv module.

usage: bids_check.py SESSION_DIR BIDS_DIR STEM [SENT_NIFTI]
  STEM: the run's path below BIDS_DIR without the suffix, e.g. sub-01/func/sub-01_task-rt_run-1
  SENT_NIFTI: the series the sender sent, whose values the raw bold must equal

Checks: the raw bold read by nibabel is bit-equal to the recorded volumes (sender index order,
first arrival of each index) in the dtype they arrived in,
equal to what was sent when given, its TR and affine match the sidecar and the recording; the
confounds equal the live `motion` messages (fMRIPrep columns, derivatives as backward
differences, n/a first); the events are the live `betas` messages' trials. Prints a JSON summary.
"""
import csv
import json
import os
import sys

import nibabel as nib
import numpy as np


def main():
    session, bids, stem = sys.argv[1:4]
    sent = sys.argv[4] if len(sys.argv) > 4 else None
    entries, seen = [], set()
    for line in open(os.path.join(session, "volumes.jsonl")):
        e = json.loads(line)
        if e["index"] not in seen:
            seen.add(e["index"])
            entries.append(e)
    entries.sort(key=lambda e: e["index"])
    raw = np.fromfile(os.path.join(session, "volumes.f32"), dtype="<f4")
    recorded = [raw[e["offset"] // 4:(e["offset"] + e["nbytes"]) // 4].reshape(e["dims"][::-1]).T for e in entries]

    img = nib.load(os.path.join(bids, stem + "_bold.nii.gz"))
    data = np.asarray(img.dataobj)
    received = {e.get("dtype", "float32") for e in entries}
    want_dtype = received.pop() if len(received) == 1 else "float32"
    assert data.dtype == np.dtype(want_dtype), (data.dtype, want_dtype)
    assert data.shape == tuple(entries[0]["dims"]) + (len(entries),), data.shape
    for t, vol in enumerate(recorded):
        if data.dtype == np.float32:
            assert np.array_equal(data[..., t].view(np.uint32), vol.view(np.uint32)), f"volume {t} differs"
        else:
            assert np.array_equal(data[..., t].astype(np.float32), vol), f"volume {t} differs"
    if sent:
        values = nib.load(sent).get_fdata()
        assert np.array_equal(data.astype(np.float64), values), "the raw bold differs from what was sent"
    sidecar = json.load(open(os.path.join(bids, stem + "_bold.json")))
    assert abs(img.header.get_zooms()[3] - sidecar["RepetitionTime"]) < 1e-6, (img.header.get_zooms(), sidecar)
    assert np.allclose(img.affine, np.array(entries[0]["affine"]), atol=1e-4), (img.affine, entries[0]["affine"])

    messages = [json.loads(l) for l in open(os.path.join(session, "messages.jsonl"))]
    motion = {m["header"]["index"]: m["header"] for m in messages if m["topic"] == "motion"}
    deriv = os.path.join(bids, "derivatives", "mirage-rt", stem + "_desc-confounds_timeseries.tsv")
    rows = list(csv.DictReader(open(deriv), delimiter="\t"))
    assert len(rows) == len(entries), (len(rows), len(entries))
    params = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    for i, (row, e) in enumerate(zip(rows, entries)):
        live = motion[e["index"]]
        for p in params:
            assert float(row[p]) == live[p], (i, p, row[p], live[p])
            if i == 0:
                assert row[p + "_derivative1"] == "n/a"
            else:
                before = motion[entries[i - 1]["index"]][p]
                assert abs(float(row[p + "_derivative1"]) - (live[p] - before)) < 1e-12
        fd = row["framewise_displacement"]
        assert (fd == "n/a") if i == 0 else float(fd) == live["framewise_displacement"], (i, fd)

    trials = {}
    for m in messages:
        if m["topic"] == "betas":
            h = m["header"]
            if h["trial"] not in trials or (trials[h["trial"]]["at_run_end"] and not h["at_run_end"]):
                trials[h["trial"]] = h
    events = list(csv.DictReader(open(os.path.join(bids, stem + "_events.tsv")), delimiter="\t"))
    want = sorted(trials.values(), key=lambda h: h["onset"])
    assert len(events) == len(want), (len(events), len(want))
    for ev, h in zip(events, want):
        assert float(ev["onset"]) == h["onset"] and float(ev["duration"]) == h["duration"], (ev, h)
        assert ev["trial_type"] == h["condition"] and int(ev["trial"]) == h["trial"], (ev, h)
        assert ev["stimulus"] == ("n/a" if h.get("stim") is None else str(h["stim"])), (ev, h)
    print(json.dumps({"volumes": len(entries), "trials": len(events), "motion_rows": len(rows),
                      "dtype": str(data.dtype)}))


if __name__ == "__main__":
    main()
