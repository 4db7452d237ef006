"""Writes what nibabel reads from a NIfTI: data as float32 (x fastest, volume after volume) and
the affine, shape and TR as JSON. The outside reference for mirage-rt's reader and file replay.

usage: nibabel_dump.py IN.nii[.gz] OUT_PREFIX   -> OUT_PREFIX.f32, OUT_PREFIX.json
"""
import json
import sys

import nibabel as nib
import numpy as np

img = nib.load(sys.argv[1])
data = np.asarray(img.get_fdata(dtype=np.float32))
if data.ndim == 3:
    data = data[..., None]
data.astype("<f4").ravel(order="F").tofile(sys.argv[2] + ".f32")
json.dump(
    {
        "shape": list(data.shape),
        "affine": img.affine.tolist(),
        "zooms": [float(z) for z in img.header.get_zooms()],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
    },
    open(sys.argv[2] + ".json", "w"),
)
