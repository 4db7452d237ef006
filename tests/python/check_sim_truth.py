"""Checks a `mirage simulate --out DIR` run against its written truth with independent code:
our own double-gamma HRF (numerically integrated), our own rigid matrices, scipy's cubic B-spline
for the moving head, nibabel for the files.

usage: check_sim_truth.py DIR signal   (run made with noise_pct=0 drift_pct=0 motion_mm=0 motion_deg=0)
       check_sim_truth.py DIR motion   (run made with signal_pct=0 noise_pct=0 drift_pct=0)
Prints a JSON report; exits 1 on any mismatch.
"""
import csv
import json
import math
import sys

import nibabel as nib
import numpy as np

run_dir, mode = sys.argv[1], sys.argv[2]
truth = json.load(open(f"{run_dir}/truth/truth.json"))
bold_img = nib.load(f"{run_dir}/bold.nii.gz")
bold = bold_img.get_fdata(dtype=np.float32)
anat_img = nib.load(f"{run_dir}/truth/anatomy.nii.gz")
anat = anat_img.get_fdata(dtype=np.float64)
problems = []
report = {"mode": mode, "shape": list(bold.shape)}

if not np.allclose(bold_img.affine, np.array(truth["affine"]), atol=1e-4):
    problems.append("bold affine differs from truth.json")
if abs(float(bold_img.header.get_zooms()[3]) - truth["tr"]) > 1e-6:
    problems.append("bold TR differs from truth.json")

# events.tsv matches the trials in truth.json
with open(f"{run_dir}/events.tsv") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
trials = truth["trials"]
if len(rows) != len(trials):
    problems.append(f"{len(rows)} events for {len(trials)} trials")
for r, t in zip(rows, trials):
    if (abs(float(r["onset"]) - t["onset"]) > 1e-9 or abs(float(r["duration"]) - t["duration"]) > 1e-9
            or r["trial_type"] != t["condition"] or int(r["stim_id"]) != t["stim"]):
        problems.append(f"event {r} != trial {t}")
        break


def gamma_pdf(t, k):
    out = np.zeros_like(t)
    pos = t > 0
    out[pos] = np.exp((k - 1) * np.log(t[pos]) - t[pos] - math.lgamma(k))
    return out


def hrf(t):
    # SPM canonical: peak 6 s, undershoot 16 s, ratio 6; unit area.
    return (gamma_pdf(t, 6.0) - gamma_pdf(t, 16.0) / 6.0) / (5.0 / 6.0)


def block_response(times, onset, duration, dt=0.0005):
    s = onset + (np.arange(int(round(duration / dt))) + 0.5) * dt
    return np.array([hrf(t - s).sum() * dt for t in times])


tr = truth["tr"]
times = np.arange(bold.shape[3]) * tr

if mode == "signal":
    roi = nib.load(f"{run_dir}/truth/roi_mask.nii.gz").get_fdata() > 0.5
    amps = np.load(f"{run_dir}/truth/trial_amplitudes.npy")
    roi_idx = np.flatnonzero(roi.ravel(order="F"))
    if amps.shape != (len(trials), roi_idx.size):
        problems.append(f"amplitudes {amps.shape} for {len(trials)} trials x {roi_idx.size} ROI voxels")
    resp = np.stack([block_response(times, t["onset"], t["duration"]) for t in trials])  # [trials, T]
    base = anat.ravel(order="F")
    expected = np.repeat(base[:, None], len(times), axis=1)
    expected[roi_idx, :] = base[roi_idx, None] * (1.0 + 0.01 * amps.T.astype(np.float64) @ resp)
    got = bold.reshape(-1, bold.shape[3], order="F").astype(np.float64)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    signal = np.abs(expected[roi_idx] - base[roi_idx, None]).max() / base[roi_idx].mean()
    report.update({"max_rel_error": float(rel), "peak_signal_fraction": float(signal), "roi_voxels": int(roi_idx.size)})
    if rel > 2e-6:
        problems.append(f"bold differs from anatomy*(1+0.01*sum amp*hrf): max relative error {rel}")
    if signal < 0.005:
        problems.append(f"signal too weak to test ({signal})")

elif mode == "motion":
    params = np.loadtxt(f"{run_dir}/truth/motion.tsv", skiprows=1)
    mats = np.loadtxt(f"{run_dir}/truth/motion_matrices.tsv", skiprows=1).reshape(-1, 4, 4)

    def matrix(p):
        tx, ty, tz, rx, ry, rz = p
        cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
        Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        M = np.eye(4)
        M[:3, :3] = Rx @ Ry @ Rz
        M[:3, 3] = [tx, ty, tz]
        return M

    for t, p in enumerate(params):
        if not np.allclose(matrix(p[:6]), mats[t], atol=1e-9):
            problems.append(f"volume {t}: matrix does not equal T*Rx*Ry*Rz of its parameters")
            break
    fd = np.concatenate([[0.0], np.abs(np.diff(params[:, :3], axis=0)).sum(1) + 50 * np.abs(np.diff(params[:, 3:6], axis=0)).sum(1)])
    if not np.allclose(fd, params[:, 6], atol=1e-6):
        problems.append("framewise_displacement column is not Power's FD")

    A = bold_img.affine.astype(np.float64)
    Ainv = np.linalg.inv(A)
    nx, ny, nz = anat.shape
    grid = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), 0).reshape(3, -1)
    homog = np.vstack([grid, np.ones(grid.shape[1])])

    from scipy import ndimage

    # The moving head is the cubic B-spline (mirror boundaries) through the static head on its
    # padded grid; points outside that grid are 0.
    head_img = nib.load(f"{run_dir}/truth/head.nii.gz")
    head = head_img.get_fdata(dtype=np.float64)
    Hinv = np.linalg.inv(head_img.affine.astype(np.float64))
    coeffs = ndimage.spline_filter(head, order=3, mode="mirror")

    def spline(u):
        n = np.array(head.shape)[:, None]
        inside = np.all((u >= 0) & (u <= n - 1), axis=0)
        out = ndimage.map_coordinates(coeffs, u, order=3, mode="mirror", prefilter=False)
        out[~inside] = 0.0
        return out

    worst = 0.0
    moved = 0
    for t in range(bold.shape[3]):
        K = Hinv @ np.linalg.inv(mats[t]) @ A
        u = (K @ homog)[:3]
        expected = spline(u) if np.abs(params[t, :6]).max() > 0 else anat.ravel(order="C")
        got = bold[..., t].ravel(order="C")  # meshgrid 'ij' order matches C ravel of [x,y,z]
        err = np.abs(got - expected).max() / anat.max()
        worst = max(worst, err)
        moved += int(np.abs(params[t, :6]).max() > 1e-3)
    report.update({"max_rel_error": float(worst), "moved_volumes": moved, "max_trans_mm": float(np.abs(params[:, :3]).max()),
                   "max_rot_deg": float(np.degrees(np.abs(params[:, 3:6]).max()))})
    if worst > 1e-5:
        problems.append(f"bold is not the anatomy moved by the truth matrices: max relative error {worst}")
    if moved < bold.shape[3] // 2:
        problems.append("too few volumes moved to test")
else:
    problems.append(f"unknown mode {mode}")

report["problems"] = problems
print(json.dumps(report, indent=1))
sys.exit(1 if problems else 0)
