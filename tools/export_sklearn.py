#!/usr/bin/env python3
"""Turns fitted sklearn Ridge models (joblib) plus voxel statistics into a mirage-rt model folder.

    export_sklearn.py --head image=ridge_image.joblib:768 --head text=ridge_text.joblib:77,1280 \
        (--scaler scaler.joblib | --mean mean.npy --std std.npy) --out MODEL [--mask mask.nii.gz]
        [--target-stats image=clip_image_train.npy ...] [--head-input retrieval=l2 ...]

Each --head is NAME=FILE:SHAPE. A Ridge's coef_ [out, voxels] and intercept_ [out] become
heads.NAME.weight / .bias; the scaler's mean_ / scale_ (or the given arrays) become input.mean /
input.std. With --target-stats NAME=train_targets.npy the head renormalises its outputs like
MIRAGE's normalize_preds, with the training predictions' statistics (from the given betas,
--betas X.npy) and the targets'; otherwise it does not renormalise. --head-input NAME=KIND says
what a head was fitted on: zscore (default: the betas z-scored with the scaler), l2 (those rows
scaled to unit L2 norm, as MIRAGE's retrieval head) or none (the betas as given).
Needs numpy and joblib (scikit-learn installs it); writes safetensors without extra packages.
"""
import argparse
import json
import os
import struct

import numpy as np


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, dtype="<f4")
        data = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", action="append", required=True, help="NAME=FILE.joblib:SHAPE")
    p.add_argument("--scaler")
    p.add_argument("--mean")
    p.add_argument("--std")
    p.add_argument("--betas", help="training betas, to compute prediction statistics for --target-stats")
    p.add_argument("--target-stats", action="append", default=[], help="NAME=train_targets.npy")
    p.add_argument("--mask", help="NIfTI mask of the voxels (needs nibabel)")
    p.add_argument("--head-input", action="append", default=[], help="NAME=zscore|l2|none")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import joblib

    if a.scaler:
        scaler = joblib.load(a.scaler)
        mean, std = scaler.mean_, scaler.scale_
    elif a.mean and a.std:
        mean, std = np.load(a.mean), np.load(a.std)
    else:
        mean = std = None
    tensors, heads = {}, []
    targets = dict(t.split("=", 1) for t in a.target_stats)
    inputs = dict(t.split("=", 1) for t in a.head_input)
    for name, kind in inputs.items():
        if kind not in ("zscore", "l2", "none"):
            raise SystemExit(f"--head-input {name}={kind}: the input is one of zscore, l2, none")
    for spec in a.head:
        name, rest = spec.split("=", 1)
        file, shape = rest.rsplit(":", 1)
        shape = [int(s) for s in shape.split(",")]
        ridge = joblib.load(file)
        coef = np.atleast_2d(ridge.coef_)
        out = int(np.prod(shape))
        if coef.shape[0] != out:
            raise SystemExit(f"{name}: coef_ has {coef.shape[0]} outputs, shape {shape} has {out}")
        tensors[f"heads.{name}.weight"] = coef
        tensors[f"heads.{name}.bias"] = np.broadcast_to(np.asarray(ridge.intercept_, dtype=np.float64), (out,))
        renorm = name in targets
        if renorm:
            if a.betas is None:
                raise SystemExit("--target-stats needs --betas (the training betas)")
            x = np.load(a.betas)
            z = (x - mean) / std if mean is not None else x
            kind = inputs.get(name, "zscore")
            if kind == "l2":
                z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
            elif kind == "none":
                z = x
            pred = z @ coef.T + ridge.intercept_
            tgt = np.load(targets[name]).reshape(len(x), -1)
            tensors[f"heads.{name}.pred_mean"] = pred.mean(0)
            tensors[f"heads.{name}.pred_std"] = pred.std(0, ddof=1)
            tensors[f"heads.{name}.target_mean"] = tgt.mean(0)
            tensors[f"heads.{name}.target_std"] = tgt.std(0, ddof=1)
        head = {"name": name, "shape": shape, "renorm": renorm}
        if inputs.get(name, "zscore") != "zscore":
            head["input"] = inputs[name]
        heads.append(head)
    if set(inputs) - {spec.split("=", 1)[0] for spec in a.head}:
        raise SystemExit(f"--head-input names heads not given with --head: {sorted(inputs)}")
    n_voxels = next(iter(tensors.values())).shape[1]
    if mean is not None:
        tensors["input.mean"], tensors["input.std"] = mean, std
    if a.mask:
        import nibabel as nib

        m = nib.load(a.mask).get_fdata()
        tensors["input.voxels"] = np.flatnonzero(m.ravel(order="F") > 0).astype(np.float32)
    os.makedirs(a.out, exist_ok=True)
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
    config = {"format": "mirage-model/1", "n_voxels": int(n_voxels), "zscore_input": mean is not None, "heads": heads,
              "provenance": {"tool": "tools/export_sklearn.py", "heads": a.head}}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


if __name__ == "__main__":
    main()
