"""Checks `mirage glm` output against outside references.

usage: check_glm.py numpy RUN_DIR GLM_DIR MASK        betas == numpy.linalg.lstsq of design.tsv (1e-4 relative)
       check_glm.py ar1 RUN_DIR GLM_DIR MASK          betas == lstsq after Prais-Winsten whitening with ar1.json's rho
       check_glm.py truth RUN_DIR GLM_DIR MASK        trial betas (as % of the intercept) vs the simulator's amplitudes
       check_glm.py nilearn RUN_DIR GLM_DIR MASK      trial betas vs nilearn FirstLevelModel (ols, spm HRF, polynomial drift 2)
Prints a JSON report; exits 1 on a failed check.
"""
import json
import sys

import nibabel as nib
import numpy as np

mode, run_dir, glm_dir, mask_path = sys.argv[1:5]
bold_img = nib.load(f"{run_dir}/bold.nii.gz")
bold = bold_img.get_fdata(dtype=np.float64)
mask = nib.load(mask_path).get_fdata() > 0
idx = np.flatnonzero(mask.ravel(order="F"))
Y = bold.reshape(-1, bold.shape[3], order="F")[idx].T  # T x V
with open(f"{glm_dir}/design.tsv") as f:
    names = f.readline().rstrip("\n").split("\t")
X = np.loadtxt(f"{glm_dir}/design.tsv", skiprows=1, ndmin=2)
betas = nib.load(f"{glm_dir}/betas.nii.gz").get_fdata(dtype=np.float64)
B = betas.reshape(-1, betas.shape[3], order="F")[idx].T  # p x V
report = {"mode": mode, "regressors": len(names), "voxels": int(idx.size), "volumes": int(Y.shape[0])}
problems = []

if mode in ("numpy", "ar1"):
    if mode == "ar1":
        # GLS with the reported AR(1) coefficient: Prais-Winsten whitening, then least squares.
        rho = json.load(open(f"{glm_dir}/ar1.json"))["rho"]
        report["rho"] = rho

        def whiten(a):
            w = a.copy()
            w[1:] = a[1:] - rho * a[:-1]
            w[0] = np.sqrt(1 - rho * rho) * a[0]
            return w

        X, Y = whiten(X), whiten(Y)
    ref, *_ = np.linalg.lstsq(X, Y, rcond=None)
    scale = np.abs(ref).max(axis=1, keepdims=True)
    rel = np.abs(B - ref) / scale
    report["max_rel_error"] = float(rel.max())
    report["worst_regressor"] = names[int(np.unravel_index(rel.argmax(), rel.shape)[0])]
    if rel.max() > 1e-4:
        problems.append(f"betas differ from numpy lstsq by {rel.max():.2e} (relative to each regressor's largest beta)")
    if mode == "ar1" and not (0.05 < report["rho"] < 0.95):
        problems.append(f"rho {report['rho']} is implausible for AR(1) noise with coefficient 0.3")

elif mode == "truth":
    amps = np.load(f"{run_dir}/truth/trial_amplitudes.npy")  # trials x ROI voxels
    roi_idx = np.flatnonzero((nib.load(f"{run_dir}/truth/roi_mask.nii.gz").get_fdata() > 0.5).ravel(order="F"))
    if not np.array_equal(roi_idx, idx):
        problems.append("the mask is not the simulator's ROI")
    trial_cols = [i for i, n in enumerate(names) if n.startswith("trial_")]
    psc = 100 * B[trial_cols] / B[names.index("intercept")]
    r_all = float(np.corrcoef(psc.ravel(), amps[: len(trial_cols)].ravel())[0, 1])
    per_trial = [float(np.corrcoef(psc[k], amps[k])[0, 1]) for k in range(len(trial_cols))]
    report.update({"correlation_all": r_all, "correlation_per_trial_median": float(np.median(per_trial)),
                   "correlation_per_trial_min": float(np.min(per_trial))})
    if r_all < 0.5:
        problems.append(f"trial betas correlate only {r_all:.3f} with the true amplitudes")

elif mode == "nilearn":
    import pandas as pd
    from nilearn.glm.first_level import FirstLevelModel

    events = pd.read_csv(f"{run_dir}/events.tsv", sep="\t")
    events["trial_type"] = [f"trial_{int(t):04d}" for t in events["trial_id"]]
    tr = float(bold_img.header.get_zooms()[3])
    model = FirstLevelModel(t_r=tr, slice_time_ref=0.0, hrf_model="spm", drift_model="polynomial", drift_order=2,
                            noise_model="ols", signal_scaling=False, standardize=False, mask_img=nib.load(mask_path),
                            minimize_memory=False)
    model.fit(bold_img, events[["onset", "duration", "trial_type"]])
    corrs = []
    for k, name in enumerate(names):
        if not name.startswith("trial_"):
            continue
        eff = model.compute_contrast(name, output_type="effect_size").get_fdata()
        ref = eff.ravel(order="F")[idx]
        corrs.append(float(np.corrcoef(ref, B[k])[0, 1]))
    report.update({"trials": len(corrs), "correlation_min": float(np.min(corrs)), "correlation_median": float(np.median(corrs))})
    if np.min(corrs) < 0.999:
        problems.append(f"a trial's betas correlate only {np.min(corrs):.5f} with nilearn's")
else:
    problems.append(f"unknown mode {mode}")

report["problems"] = problems
print(json.dumps(report, indent=1))
sys.exit(1 if problems else 0)
