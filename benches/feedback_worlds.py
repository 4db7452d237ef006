#!/usr/bin/env python3
"""Neurofeedback on worlds built to break it: every feedback signal mirage-rt offers, against the
true response, on real anatomy: a real EPI (FSL's example_func, 64x64x21 @ 4x4x6 mm) and the MNI
template in nilearn's wheel (resampled to 3 mm, its white-matter map as the nuisance ROI).

usage: benches/feedback_worlds.py [--mirage target/debug/mirage] [--json docs/benchmarks/feedback_worlds.json]

Each world: 200 volumes at TR 1 s, 20 s baseline and 20 s regulation blocks alternating; a 1 %
response (the canonical HRF over each regulation block) in a 9 mm sphere of the brain; noise;
and its confound. The series goes through `mirage run` (file replay, motion correction on, the
sphere as the ROI, a nuisance ROI beside it) once per recipe: OpenNFT's with and without motion
regressors, and variants of the `steps` recipe. Reported per signal:
the correlation with the true response over regulation and baseline volumes, the lowest value in
regulation blocks and the change at spike volumes, each in units of the response's amplitude in
that signal (its mean in regulation minus its mean in baseline); each the mean over three
seeds of the noise and motion, with the lowest correlation, the worst regulation value and the
largest spike change over them beside it.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
from scipy.ndimage import affine_transform, binary_erosion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import opennft_reference as onft  # noqa: E402

ANAT = os.path.join(os.environ.get("MIRAGE_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
                    "fslpy-example-func", "example_func.nii.gz")
T, TR, BLOCK = 200, 1.0, 20
SEEDS = [11, 12, 13]
WORLDS = {
    "task-correlated motion": dict(motion="task", noise=1.0),
    "large motion, not task-locked": dict(motion="random", noise=1.0),
    "spikes": dict(spikes=(37, 75, 113, 151), noise=1.0),
    "slow drift": dict(drift=3.0, noise=1.0),
    "low SNR": dict(noise=3.0),
    "task-correlated motion, MNI": dict(motion="task", noise=1.0, anatomy="mni"),
    "spikes and drift, MNI": dict(spikes=(37, 75, 113, 151), drift=3.0, noise=1.0, anatomy="mni"),
}
# The recipes run on every world: `--set` values beside `feedback.recipe`. The `steps` grid is
# what the default is chosen from (benches/benchmarks.py states the rule); the ablations take one
# step off (or add one) from the default.
STEPS = {"feedback.recipe": '"steps"', "feedback.full_scale": "0", "feedback.despike": "3"}
RECIPES = {
    "opennft, motion regressors": {"feedback.recipe": '"opennft"', "feedback.motion_regressors": "true"},
    "opennft, no motion regressors": {"feedback.recipe": '"opennft"', "feedback.motion_regressors": "false"},
}
GRID = []
for smooth in ("1.5", "2"):
    for trend in ("true", "false"):
        for motion in ("false", "true"):
            label = (f"steps: smooth {smooth} s" + ("" if trend == "true" else ", no trend")
                     + (", motion regressors" if motion == "true" else ""))
            GRID.append(label)
            RECIPES[label] = {**STEPS, "feedback.smooth_s": smooth, "feedback.trend": trend,
                              "feedback.motion_regressors": motion}
# The ablations start from the grid's choice on record (trend, motion regressors, smoothing 2 s).
BASE = {**STEPS, "feedback.smooth_s": "2", "feedback.trend": "true", "feedback.motion_regressors": "true"}
RECIPES.update({
    "the default, no smoothing": {**BASE, "feedback.smooth_s": "0"},
    "the default, no despiking": {**BASE, "feedback.despike": "0"},
    "the default, no task regressor": {**BASE, "feedback.task_regressors": "false"},
    "the default, no motion regressors, no task regressor": {**BASE, "feedback.task_regressors": "false",
                                                             "feedback.motion_regressors": "false"},
    "the default + nuisance ROI": {**BASE, "feedback.nuisance": '"nuisance"'},
    "the default, no motion regressors + nuisance ROI": {**BASE, "feedback.motion_regressors": "false",
                                                         "feedback.nuisance": '"nuisance"'},
})


def regulation_blocks():
    return [(on, on + BLOCK - 1) for on in range(BLOCK + 1, T + 1, 2 * BLOCK)]


def true_response():
    box = np.zeros(T)
    for on, off in regulation_blocks():
        box[on - 1:off] = 1.0
    h = onft.spm_hrf(TR)
    r = np.convolve(box, h)[:T]
    return r / r.max()


def rotation(rx, ry, rz):
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    return (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))


def anatomy(kind):
    """The image, its brain mask and the nuisance ROI's source (MNI: white matter; the EPI: the brain
    eroded by two voxels, away from its edges, where resampling moves the mean most); the nuisance
    ROI is that outside 20 mm of the ROI's centre."""
    if kind == "mni":
        from nilearn.datasets import load_mni152_template, load_mni152_wm_mask
        from nilearn.image import resample_img
        target = np.diag([3.0, 3.0, 3.0, 1.0])
        target[:3, 3] = [-90, -126, -72]
        img = resample_img(load_mni152_template(resolution=2), target_affine=target, target_shape=(61, 73, 61),
                           interpolation="continuous")
        wm = resample_img(load_mni152_wm_mask(resolution=2), target_affine=target, target_shape=(61, 73, 61),
                          interpolation="nearest")
        anat = np.asanyarray(img.dataobj).astype(np.float64)
        return img, anat, anat > 0.3 * np.percentile(anat, 99), np.asanyarray(wm.dataobj) > 0.5
    img = nib.load(ANAT)
    anat = np.asanyarray(img.dataobj).astype(np.float64)
    if anat.ndim == 4:
        anat = anat[..., 0]
    brain = anat > 0.3 * np.percentile(anat, 99)
    return img, anat, brain, binary_erosion(brain, iterations=2)


def world(name, spec, out_dir, rng):
    img, anat, brain, wm = anatomy(spec.get("anatomy"))
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    # The ROI: a 9 mm sphere around the brain voxel nearest the brain's centre of mass.
    com = np.array(np.nonzero(brain)).mean(axis=1)
    grid = np.indices(anat.shape).reshape(3, -1).T
    inside = grid[brain.ravel()]
    centre = inside[np.argmin(((inside - com) ** 2).sum(axis=1))]
    dist = np.sqrt((((grid - centre) * zooms) ** 2).sum(axis=1)).reshape(anat.shape)
    roi = (dist <= 9.0) & brain
    nuisance = wm & (dist > 20.0)
    r = true_response()
    task = np.zeros(T)
    for on, off in regulation_blocks():
        task[on - 1:off] = 1.0
    smooth_task = np.convolve(task, np.ones(4) / 4)[:T]
    vols = np.empty(anat.shape + (T,), dtype=np.float32)
    sigma = 0.01 * spec.get("noise", 1.0) * np.percentile(anat[brain], 50)
    a_drift = 0.01 * spec.get("drift", 0.0)
    centre_mm = (np.array(anat.shape) - 1) / 2 * zooms
    params = []
    for t in range(T):
        v = anat * (1.0 + 0.01 * r[t] * roi) * (1.0 + a_drift * t / T)
        if spec.get("motion") == "task":
            p = np.array([0.0, 1.0, 0.5, np.deg2rad(1.0), 0.0, 0.0]) * smooth_task[t]
        elif spec.get("motion") == "random":
            p = np.concatenate([rng.normal(0, 1.0, 3), np.deg2rad(rng.normal(0, 1.0, 3))])
        else:
            p = np.zeros(6)
        params.append(p.tolist())
        if np.any(p):
            rot = rotation(*p[3:])
            # Voxel coordinates: about the grid's centre, in mm, then back.
            m = np.diag(1 / zooms) @ rot @ np.diag(zooms)
            offset = centre_mm / zooms - m @ (centre_mm / zooms) + p[:3] / zooms
            v = affine_transform(v, m, offset=offset, order=1, mode="nearest")
        v = v + rng.normal(0, sigma, anat.shape)
        if t in spec.get("spikes", ()):
            v = v * 1.05
        vols[..., t] = v
    path = os.path.join(out_dir, "bold.nii.gz")
    out = nib.Nifti1Image(vols, img.affine)
    out.header.set_xyzt_units("mm", "sec")
    out.header["pixdim"][4] = TR
    nib.save(out, path)
    nib.save(nib.Nifti1Image(roi.astype(np.float32), img.affine), os.path.join(out_dir, "roi.nii.gz"))
    nib.save(nib.Nifti1Image(nuisance.astype(np.float32), img.affine), os.path.join(out_dir, "nuisance.nii.gz"))
    with open(os.path.join(out_dir, "protocol.tsv"), "w") as f:
        f.write("onset\tduration\ttrial_type\n")
        for on, off in regulation_blocks():
            f.write(f"{(on - 1) * TR}\t{(off - on + 1) * TR}\tregulation\n")
    return r


def run(mirage, d, recipe):
    session = os.path.join(d, "s-" + str(abs(hash(json.dumps(recipe, sort_keys=True)))))
    sets = [a for k, v in recipe.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([
        mirage, "run", "--ingest", f"file://{d}/bold.nii.gz?speed=max", "--publish", "none", "--no-lsl",
        "--quiet", "--console", "none", "--record", session,
        "--set", f'glm.rois=[{{name = "roi", path = "{d}/roi.nii.gz"}}, '
                 f'{{name = "nuisance", path = "{d}/nuisance.nii.gz"}}]',
        "--set", 'feedback.rois=["roi"]', "--set", f'feedback.protocol="{d}/protocol.tsv"',
        "--set", f"feedback.volumes={T}", "--set", "feedback.negative=true", "--set", "feedback.decimals=3",
        *sets,
    ], check=True, capture_output=True)
    rows = [json.loads(l) for l in open(os.path.join(session, "messages.jsonl"))]
    roi = [m["header"] for m in rows if m["topic"] == "roi"]
    get = lambda key: np.array([np.nan if h["rois"][0][key] is None else h["rois"][0][key] for h in roi])
    fb = np.array([np.nan if h.get("feedback") is None else h["feedback"] for h in roi])
    return get("mean"), get("psc"), fb


def corr(x, y):
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 2 and np.std(x[ok]) > 0 else float("nan")


def score(x, truth, reg, spikes):
    """Correlation with the truth over the run and within regulation blocks (where a feedback
    value is shown); the lowest regulation value below the baseline mean and the largest change
    at a spike volume, both in units of the signal's own response amplitude."""
    amp = float(np.nanmean(x[reg]) - np.nanmean(x[~reg]))
    base = float(np.nanmean(x[~reg]))
    worst = float((np.nanmin(x[reg]) - base) / amp) if amp else float("nan")
    spike = [float(abs(x[s] - np.nanmean(x[[s - 1, s + 1]])) / amp) for s in spikes] if spikes else []
    return {"corr": corr(x, truth), "corr_in_regulation": corr(x[reg], truth[reg]), "worst_in_regulation": worst,
            "spike_change": max(spike) if spike else None}


def mean_scores(scores):
    """The scores' mean over seeds, with the lowest correlation and the worst of the worst values."""
    out = {}
    for key in scores[0]:
        vals = [s[key] for s in scores if s[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    out["corr_min"] = float(min(s["corr"] for s in scores))
    out["worst_in_regulation_min"] = float(min(s["worst_in_regulation"] for s in scores))
    spikes = [s["spike_change"] for s in scores if s["spike_change"] is not None]
    out["spike_change_max"] = float(max(spikes)) if spikes else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirage", default=os.path.join(ROOT, "target", "debug", "mirage"))
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "benchmarks", "feedback_worlds.json"))
    ap.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    a = ap.parse_args()
    reg = np.zeros(T, dtype=bool)
    for on, off in regulation_blocks():
        reg[on - 1:off] = True
    results = []
    for name, spec in WORLDS.items():
        per_seed = []
        for seed in a.seeds:
            signals = {}
            with tempfile.TemporaryDirectory() as d:
                truth = world(name, spec, d, np.random.default_rng(seed))
                for label, recipe in RECIPES.items():
                    mean, psc, signals[label] = run(a.mirage, d, recipe)
            signals = {"ROI mean": mean, "psc (GLM)": psc, **signals}
            spikes = [s for s in spec.get("spikes", ())]
            per_seed.append({k: score(v, truth, reg, spikes) for k, v in signals.items()})
        row = {"world": name, "seeds": a.seeds, "signals": {k: mean_scores([p[k] for p in per_seed])
                                                             for k in per_seed[0]}}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {"command": "benches/feedback_worlds.py", "commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "volumes": T, "tr": TR, "grid": GRID, "recipes": RECIPES, "anatomy": "FSL example_func; MNI152 2009a at 3 mm", "results": results}
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
