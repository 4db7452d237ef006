"""Checks the trial-level derivatives of `mirage export` against what live subscribers received.

usage: trials_check.py DERIV_STEM LIVE_DIR
  DERIV_STEM: the run's derivative path without its suffix
              (…/derivatives/mirage-rt/sub-S/func/sub-S_task-T_run-R)
  LIVE_DIR:   betas.npy [trials, voxels] and voxels.npy [voxels] (grid indices, x fastest) of the
              trials the export keeps, decode-HEAD.npy [decodes, shape…] per head, live.json
              (trials, top1 ids, volumes, heads) — as the subscribers received them

Read with nibabel, NumPy and csv: the trial betas equal the live payloads bit for bit on the mask
(0 elsewhere), the mask is exactly the voxels, the trials TSV lists the trials in order, each
head's array equals the live outputs, the results TSV's top-1 ids are the live ones, and the ROI
time series has a row per volume. Prints a JSON summary.
"""
import csv
import json
import os
import sys

import nibabel as nib
import numpy as np


def tsv(path):
    return list(csv.DictReader(open(path), delimiter="\t"))


def main():
    stem, live_dir = sys.argv[1:3]
    live = json.load(open(os.path.join(live_dir, "live.json")))
    betas = np.load(os.path.join(live_dir, "betas.npy"))
    voxels = np.load(os.path.join(live_dir, "voxels.npy")).astype(np.int64)

    img = nib.load(stem + "_desc-trials_betas.nii.gz")
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32 and data.shape[3] == len(betas), (data.dtype, data.shape, betas.shape)
    flat = data.reshape(-1, data.shape[3], order="F")
    outside = np.setdiff1d(np.arange(flat.shape[0]), voxels)
    for k in range(len(betas)):
        assert np.array_equal(flat[voxels, k].view(np.uint32), betas[k].view(np.uint32)), f"trial row {k} differs"
        assert not flat[outside, k].any(), f"trial row {k}: nonzero outside the mask"
    mask = nib.load(stem + "_desc-glm_mask.nii.gz")
    m = np.asarray(mask.dataobj)
    assert m.dtype == np.uint8 and m.shape == data.shape[:3], (m.dtype, m.shape)
    assert np.array_equal(np.flatnonzero(m.reshape(-1, order="F")), np.sort(voxels)), "mask differs from the voxels"
    assert np.allclose(mask.affine, img.affine)
    rows = tsv(stem + "_desc-trials_betas.tsv")
    assert [int(r["trial"]) for r in rows] == live["trials"], ([r["trial"] for r in rows], live["trials"])
    assert [int(r["volume"]) for r in rows] == list(range(len(rows)))

    results = tsv(stem + "_desc-decode_results.tsv")
    assert [r["top1_id"] for r in results] == live["top1"], ([r["top1_id"] for r in results], live["top1"])
    for head, name in live["heads"].items():
        want = np.load(os.path.join(live_dir, name))
        got = np.load(f"{stem}_desc-{head}_decoding.npy")
        assert got.shape == want.shape and np.array_equal(got, want), (head, got.shape, want.shape)
    roi = tsv(stem + "_desc-roi_timeseries.tsv")
    assert len(roi) == live["volumes"], len(roi)
    assert roi and all(c.endswith(("_mean", "_psc")) for c in roi[0]), list(roi[0])
    print(json.dumps({"trials": len(rows), "mask_voxels": int(m.sum()), "decodes": len(results),
                      "heads": sorted(live["heads"]), "roi_columns": list(roi[0])}))


if __name__ == "__main__":
    main()
