"""Reference metrics for `mirage eval`: skimage SSIM (MindEye's settings), NumPy PixCorr,
2-way identification (MindEye's definition) and top-1 retrieval on random arrays.

usage: metrics_ref.py DIR      writes DIR/pred/*.npy, DIR/truth/*.npy, DIR/conditions.tsv, DIR/reference.json
"""
import json
import os
import sys

import numpy as np
from skimage.metrics import structural_similarity

d = sys.argv[1]
rng = np.random.default_rng(5)
n = 12
truth_img = rng.uniform(0, 1, size=(n, 1, 24, 20)).astype(np.float32)
pred_img = np.clip(truth_img + rng.normal(0, 0.3, size=truth_img.shape), 0, 1).astype(np.float32)
truth_vec = rng.normal(size=(n, 16)).astype(np.float32)
pred_vec = (truth_vec + rng.normal(0, 1.2, size=truth_vec.shape)).astype(np.float32)
for sub in ("pred", "truth"):
    os.makedirs(f"{d}/{sub}", exist_ok=True)
np.save(f"{d}/pred/pixels.npy", pred_img)
np.save(f"{d}/truth/pixels.npy", truth_img)
np.save(f"{d}/pred/image.npy", pred_vec)
np.save(f"{d}/truth/image.npy", truth_vec)
labels = ["seen"] * 7 + ["imagery"] * 5
with open(f"{d}/conditions.tsv", "w") as f:
    f.write("condition\n" + "\n".join(labels) + "\n")


def two_way(pred, real):
    # MindEye: r = corrcoef(reals, preds)[:n, n:]; success = r < diag; mean count / (n - 1)
    m = len(real)
    r = np.corrcoef(real.reshape(m, -1), pred.reshape(m, -1))[:m, m:]
    return float(np.mean(np.sum(r < np.diag(r), 0)) / (m - 1))


def top1(pred, real):
    p = pred.reshape(len(pred), -1)
    t = real.reshape(len(real), -1)
    sims = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    return float(np.mean(np.argmax(sims, 1) == np.arange(len(p))))


ref = {}
for cond in ("seen", "imagery"):
    idx = [i for i, l in enumerate(labels) if l == cond]
    pi, ti, pv, tv = pred_img[idx], truth_img[idx], pred_vec[idx], truth_vec[idx]
    pixcorr = float(np.mean([np.corrcoef(p.ravel(), t.ravel())[0, 1] for p, t in zip(pi, ti)]))
    ssim = float(np.mean([structural_similarity(t[0], p[0], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                data_range=1.0) for p, t in zip(pi, ti)]))
    ref[cond] = {"pixels": {"pixcorr": pixcorr, "ssim": ssim, "two_way": two_way(pi, ti), "top1": top1(pi, ti)},
                 "image": {"two_way": two_way(pv, tv), "top1": top1(pv, tv)}}
json.dump(ref, open(f"{d}/reference.json", "w"), indent=1)
print("ok")
