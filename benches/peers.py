#!/usr/bin/env python3
"""Peers side by side, in one run on the same data: our motion stage (`mirage realign`) against
SimpleITK and ANTs on the same moved volumes (time per volume and error against the simulator's
exact motion), and our online GLM (`mirage glm`) against nilearn's FirstLevelModel refitted at a
TR (what rt-MindEye does every TR) and a NumPy incremental least-squares update on the same
series and design. Everything runs on one thread. Writes docs/benchmarks/peers.json;
`benches/benchmarks.py --only peers` renders it into BENCHMARKS.md.

usage: benches/peers.py [--volumes N] [--ants-volumes N] [--glm-volumes N] [--json OUT]
Needs target/release/mirage (or $MIRAGE), ../shared/data (or $MIRAGE_SHARED_DATA), the test
peers (tests/python/requirements.txt) and benches/requirements.txt (SimpleITK, antspyx).
"""
import os

# One thread everywhere, set before the libraries start their pools.
for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRAGE = os.environ.get("MIRAGE", os.path.join(ROOT, "target", "release", "mirage"))
DATA = os.environ.get("MIRAGE_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
ANATOMY = os.path.join(DATA, "fslpy-example-func", "example_func.nii.gz")
# LPS (ITK) <-> RAS (NIfTI) world coordinates.
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def mirage(*args):
    """Runs mirage; returns its stderr."""
    r = subprocess.run([MIRAGE, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"mirage {' '.join(args)} failed:\n{r.stderr}")
    return r.stderr


def stage_times(stderr, stage):
    """The p50 and p99 (ms) that `mirage realign` / `mirage glm` print for their stage."""
    m = re.search(stage + r" per volume p50 ([0-9.]+) ms, p99 ([0-9.]+) ms, over (\d+) volumes", stderr)
    if not m:
        raise SystemExit(f"no {stage} timing in:\n{stderr}")
    return {"p50_ms": float(m.group(1)), "p99_ms": float(m.group(2)), "volumes": int(m.group(3))}


def percentiles(seconds):
    """p50 and p99 (nearest rank, as mirage prints them) of per-volume seconds, in ms."""
    s = np.sort(np.asarray(seconds))
    at = lambda q: float(s[min(max(int(np.ceil(q * len(s))), 1), len(s)) - 1] * 1e3)  # noqa: E731
    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "volumes": len(s)}


def world_points(mask_path):
    """World (RAS, mm) coordinates of a mask's voxels."""
    img = nib.load(mask_path)
    ijk = np.argwhere(img.get_fdata() > 0.5)
    return nib.affines.apply_affine(img.affine, ijk)


def mean_displacement(a, b, points):
    """Mean distance (mm) between where two 4x4 world transforms send the points."""
    pa = points @ a[:3, :3].T + a[:3, 3]
    pb = points @ b[:3, :3].T + b[:3, 3]
    return float(np.linalg.norm(pa - pb, axis=1).mean())


def read_matrices(path):
    """`mirage realign --matrices` as 4x4 matrices, the reference volume's row left out."""
    return [np.vstack([r.reshape(3, 4), [0, 0, 0, 1]]) for r in np.loadtxt(path, ndmin=2)[1:]]


def itk_matrix(transform_point):
    """A rigid ITK transform (fixed LPS point -> moving LPS point) as a 4x4 RAS matrix, the
    convention of mirage's matrices (`out(p) = v(M p)`)."""
    o = np.asarray(transform_point((0.0, 0.0, 0.0)))
    m = np.eye(4)
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.asarray(transform_point(tuple(e))) - o
    m[:3, 3] = o
    return FLIP @ m @ FLIP


def motion(d, shape, voxel_mm, volumes, ants_volumes):
    """Realigns one moved series on grid `shape` (voxels of `voxel_mm`) with mirage, SimpleITK
    and ANTs."""
    d = os.path.join(d, f"motion-{shape.replace(',', 'x')}")
    os.makedirs(d)
    run = os.path.join(d, "run")
    mirage("simulate", "--out", run, "--seed", "1", "--volumes", str(volumes), "--anatomy", ANATOMY,
           "--shape", shape, *sum((["--set", s] for s in (
               f"voxel_mm={voxel_mm},{voxel_mm},{voxel_mm}", "motion_kind=\"random\"", "motion_mm=3", "motion_deg=3", "noise_pct=2", "ar1=0",
               "drift_pct=0", "signal_pct=0")), []))
    bold = os.path.join(run, "bold.nii.gz")
    truth = np.loadtxt(os.path.join(run, "truth", "motion_matrices.tsv"), skiprows=1).reshape(-1, 4, 4)
    points = world_points(os.path.join(run, "truth", "brain_mask.nii.gz"))

    def errors(matrices, first=1):
        return [mean_displacement(m, truth[t], points) for t, m in enumerate(matrices, start=first)]

    out = {"grid": f"{shape.replace(',', 'x')} @ {voxel_mm} mm", "volumes": volumes, "anatomy": "FSL example_func",
           "motion": "random, up to 3 mm / 3 degrees per volume, noise 2 %", "brain_points": len(points)}

    # mirage: the online stage run offline, one thread.
    mats = os.path.join(d, "mirage_matrices.tsv")
    t0 = time.perf_counter()
    err = mirage("realign", bold, "--matrices", mats)
    wall = time.perf_counter() - t0
    e = errors(read_matrices(mats))
    out["mirage"] = {**stage_times(err, "motion stage"), "process_wall_s": wall,
                     "mean_error_mm": float(np.mean(e)), "max_error_mm": float(np.max(e))}
    print(f"mirage: {out['mirage']}", flush=True)
    # The same with half the samples (motion.sample_fraction 0.1): speed for accuracy.
    cfg = os.path.join(d, "half_samples.toml")
    with open(cfg, "w") as f:
        f.write("[motion]\nsample_fraction = 0.1\n")
    err = mirage("realign", bold, "--matrices", mats, "--config", cfg)
    e = errors(read_matrices(mats))
    out["mirage_half_samples"] = {**stage_times(err, "motion stage"), "mean_error_mm": float(np.mean(e)),
                                  "max_error_mm": float(np.max(e))}
    print(f"mirage, sample_fraction 0.1: {out['mirage_half_samples']}", flush=True)

    # SimpleITK: mean squares, 5 % random sampling, regular-step gradient descent, 2 levels.
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    series = sitk.ReadImage(bold, sitk.sitkFloat32)
    fixed = series[:, :, :, 0]
    secs, mats = [], []
    for t in range(1, volumes):
        moving = series[:, :, :, t]
        t0 = time.perf_counter()
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.05, 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                     relaxationFactor=0.5)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1, 0])
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY)
        reg.SetInitialTransform(init, inPlace=False)
        tx = reg.Execute(fixed, moving)
        sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0)
        secs.append(time.perf_counter() - t0)
        mats.append(itk_matrix(tx.TransformPoint))
    e = errors(mats)
    out["simpleitk"] = {**percentiles(secs), "version": sitk.Version_VersionString(),
                        "mean_error_mm": float(np.mean(e)), "max_error_mm": float(np.max(e))}
    print(f"simpleitk: {out['simpleitk']}", flush=True)

    # ANTs (antspyx): its default rigid registration (Mattes MI, 4 levels), then the reslice.
    import ants
    img = nib.load(bold)
    data = np.asarray(img.dataobj, dtype=np.float32)
    files = []
    for t in range(ants_volumes + 1):
        f = os.path.join(d, f"vol{t}.nii.gz")
        nib.save(nib.Nifti1Image(data[..., t], img.affine), f)
        files.append(f)
    fixed = ants.image_read(files[0])
    secs, mats = [], []
    for t in range(1, ants_volumes + 1):
        moving = ants.image_read(files[t])
        t0 = time.perf_counter()
        reg = ants.registration(fixed, moving, type_of_transform="Rigid")
        ants.apply_transforms(fixed, moving, transformlist=reg["fwdtransforms"])
        secs.append(time.perf_counter() - t0)
        tx = ants.read_transform(reg["fwdtransforms"][0])
        mats.append(itk_matrix(lambda p: tx.apply_to_point(p)))
    e = errors(mats)
    out["ants"] = {**percentiles(secs), "version": ants.__version__,
                   "mean_error_mm": float(np.mean(e)), "max_error_mm": float(np.max(e))}
    print(f"ants: {out['ants']}", flush=True)
    return out


def glm(d, volumes):
    """Fits one simulated run with mirage's online GLM, a NumPy incremental update of the same
    design, and nilearn refitted at the last TR."""
    run = os.path.join(d, "glm")
    mirage("simulate", "--out", run, "--seed", "2", "--volumes", str(volumes), "--shape", "64,64,36")
    bold, events = os.path.join(run, "bold.nii.gz"), os.path.join(run, "events.tsv")
    fit = os.path.join(d, "glm-fit")
    err = mirage("glm", bold, "--events", events, "--out", fit)
    img = nib.load(bold)
    tr = float(img.header.get_zooms()[3])
    betas = nib.load(os.path.join(fit, "betas.nii.gz")).get_fdata(dtype=np.float64)
    mask = betas[..., 0] != 0
    idx = np.flatnonzero(mask.ravel(order="F"))
    with open(os.path.join(fit, "design.tsv")) as f:
        names = f.readline().rstrip("\n").split("\t")
    x = np.loadtxt(os.path.join(fit, "design.tsv"), skiprows=1, ndmin=2)
    y = np.asarray(img.dataobj, dtype=np.float64).reshape(-1, volumes, order="F")[idx].T  # T x V
    out = {"grid": "64x64x36", "volumes": volumes, "voxels": int(idx.size), "regressors": len(names),
           "trials": sum(n.startswith("trial_") for n in names)}
    out["mirage"] = stage_times(err, "GLM stage")
    print(f"mirage glm: {out['mirage']}", flush=True)

    # NumPy: X'X and X'Y updated by each volume's row (the design known in advance), and one
    # solve of every beta, what a closing trial costs at most.
    p = x.shape[1]
    xtx, xty = np.zeros((p, p)), np.zeros((p, idx.size))
    secs = []
    for t in range(volumes):
        t0 = time.perf_counter()
        xtx += np.outer(x[t], x[t])
        xty += np.outer(x[t], y[t])
        secs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    b = np.linalg.solve(xtx, xty)
    solve = time.perf_counter() - t0
    ours = betas.reshape(-1, p, order="F")[idx].T
    rel = float(np.abs(b - ours).max() / np.abs(ours).max())
    out["numpy"] = {**percentiles(secs), "solve_ms": solve * 1e3, "version": np.__version__,
                    "final_betas_max_rel_diff": rel}
    print(f"numpy: {out['numpy']}", flush=True)

    # nilearn: FirstLevelModel refitted on every volume so far (one regressor per trial), at
    # a quarter, half and the end of the run.
    import nilearn
    import pandas as pd
    from nilearn.glm.first_level import FirstLevelModel
    ev = pd.read_csv(events, sep="\t")
    ev = ev[ev["trial_type"].astype(str) != "n/a"] if "trial_type" in ev else ev
    ev = pd.DataFrame({"onset": ev["onset"], "duration": ev["duration"],
                       "trial_type": [f"trial_{i:03d}" for i in range(len(ev))]})
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    refits = {}
    for t in (volumes // 4, volumes // 2, volumes):
        sub = img.slicer[..., :t]
        seen = ev[ev["onset"] < t * tr]
        t0 = time.perf_counter()
        FirstLevelModel(t_r=tr, hrf_model="spm", drift_model="polynomial", drift_order=2, noise_model="ols",
                        mask_img=mask_img, signal_scaling=False, minimize_memory=True).fit(sub, events=seen)
        refits[str(t)] = time.perf_counter() - t0
    out["nilearn_refit"] = {"seconds_at_volume": refits, "version": nilearn.__version__}
    print(f"nilearn: {out['nilearn_refit']}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=101, help="moved volumes for mirage and SimpleITK (+ reference)")
    ap.add_argument("--ants-volumes", type=int, default=20, help="moved volumes for ANTs (slow)")
    ap.add_argument("--large-volumes", type=int, default=31, help="volumes on the 96x114x96 @ 2 mm grid")
    ap.add_argument("--glm-volumes", type=int, default=200)
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "benchmarks", "peers.json"))
    a = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "benches/peers.py" + "".join(
                f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json"),
            "threads": 1,
            "motion": [motion(d, "64,64,36", 3, a.volumes, a.ants_volumes),
                       motion(d, "96,114,96", 2, a.large_volumes, max(2, a.ants_volumes // 4))],
            "glm": glm(d, a.glm_volumes),
        }
    report["minutes"] = (time.perf_counter() - started) / 60
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
