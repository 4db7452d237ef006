"""Compares `mirage smooth`'s output with scipy.ndimage.gaussian_filter on the same input.

usage: smooth_check.py INPUT.nii.gz OURS.nii.gz FWHM_MM
Prints one JSON line: the largest difference relative to the input's largest magnitude, per
volume's worst, and the sigmas used (in voxels, from the header's zooms).
"""
import json
import sys

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

src, ours, fwhm = sys.argv[1], sys.argv[2], float(sys.argv[3])
img = nib.load(src)
data = np.asanyarray(img.dataobj).astype(np.float64)
if data.ndim == 3:
    data = data[..., None]
zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / zooms
got = np.asanyarray(nib.load(ours).dataobj).astype(np.float64)
if got.ndim == 3:
    got = got[..., None]
assert got.shape == data.shape, (got.shape, data.shape)
scale = np.abs(data).max()
worst = 0.0
for t in range(data.shape[3]):
    want = gaussian_filter(data[..., t], sigma=sigma, mode="reflect", truncate=4.0)
    worst = max(worst, float(np.abs(got[..., t] - want).max() / scale))
print(json.dumps({"max_rel_diff": worst, "sigma": sigma.tolist(), "volumes": data.shape[3]}))
