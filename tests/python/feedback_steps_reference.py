#!/usr/bin/env python3
"""Reference for mirage's `steps` feedback recipe, written for the tests from its documentation
(src/feedback/steps.rs): every volume, the explicit design over volumes 1..t solved with numpy's
lstsq (ours accumulates normal equations), then despiking, smoothing, normalisation and display.

usage: feedback_steps_reference.py --in run.json --out steps.json

run.json: {"tr": s, "n_volumes": n, "roi_means": [[...], ...], "motion": [[6], ...] | null,
           "nuisance": [...] | null, "regulation": [[on, off], ...] (1-based inclusive),
           "baseline": [[on, off], ...] | null (null: every volume outside regulation),
           "steps": {"trend", "task", "motion", "nuisance", "despike", "smooth_s", "normalise",
                     "full_scale"}, "combine": "mean" | "median" | "difference" | [weights],
           "display": {"max", "min", "decimals", "negative"}}
"""
import argparse
import json
import math

import numpy as np

from opennft_reference import spm_hrf

VOLUMES_PER_COLUMN = 3
COLLINEAR = 1e-10


def task_regressor(blocks, n, tr):
    box = np.zeros(n)
    for on, off in blocks:
        box[on - 1:off] = 1.0
    x = np.convolve(box, spm_hrf(tr))[:n]
    return x / x.max() if x.max() > 0 else x


def design(run, t):
    """Rows 1..t of the configured columns, the task column's index (or None)."""
    st, n = run["steps"], run["n_volumes"]
    cols, task_col = [np.ones(t)], None
    if st["trend"]:
        cols.append(np.arange(t) / n)
    if st["task"]:
        task_col = len(cols)
        cols.append(task_regressor(run["regulation"], n, run["tr"])[:t])
    if st["motion"]:
        m = np.zeros((t, 6)) if run["motion"] is None else np.array(run["motion"][:t], dtype=float)
        cols.extend((m - m[0]).T)
    if st["nuisance"]:
        v = np.array([np.nan if x is None else x for x in run["nuisance"][:t]], dtype=float)
        first = v[np.isfinite(v)][0] if np.isfinite(v).any() else np.nan
        cols.append(v - first)
    return np.column_stack(cols), task_col


def fit(x, y):
    """Columns entering in order (three rows per column, not collinear), their lstsq betas."""
    beta, incl = np.zeros(x.shape[1]), []
    for j in range(x.shape[1]):
        if (len(incl) + 1) * VOLUMES_PER_COLUMN > len(y):
            break
        d = float(x[:, j] @ x[:, j])
        if not d > 0:
            continue
        if incl:
            b = np.linalg.lstsq(x[:, incl], x[:, j], rcond=None)[0]
            r = x[:, j] - x[:, incl] @ b
            pivot = float(r @ r)
        else:
            pivot = d
        if pivot > COLLINEAR * d:
            incl.append(j)
    if incl:
        beta[incl] = np.linalg.lstsq(x[:, incl], y, rcond=None)[0]
    return beta


def despike(history, value, k):
    past = np.array([v for v in history if np.isfinite(v)])
    if k <= 0 or not np.isfinite(value) or len(past) < 10:
        return value
    sigma = 1.4826 * np.median(np.abs(past - np.median(past)))
    recent = np.median(past[-5:])
    if not k * sigma > 0:
        return value
    return float(np.clip(value, recent - k * sigma, recent + k * sigma))


def show(value, full_scale, d):
    if full_scale > 0:
        x = d["max"] * value / full_scale
        if not np.isfinite(x):
            return x
        v = math.copysign(math.floor(abs(x) * 10 ** d["decimals"] + 0.5), x) / 10 ** d["decimals"]
        if not d["negative"] and v < 0:
            v = 0.0
        elif d["negative"] and v < d["min"]:
            v = d["min"]
        return min(v, d["max"])
    if not np.isfinite(value):
        return value
    return math.copysign(math.floor(abs(value) * 10 ** d["decimals"] + 0.5), value) / 10 ** d["decimals"]


def combine(how, norms):
    if how == "mean":
        return float(np.mean(norms))
    if how == "median":
        return float(np.median(norms))
    if how == "difference":
        return norms[0] - norms[1]
    return float(np.dot(how, norms))


def run_steps(run):
    st, tr, n = run["steps"], run["tr"], run["n_volumes"]
    means = np.array([[np.nan if v is None else v for v in row] for row in run["roi_means"]], dtype=float)
    T, R = means.shape
    reg = np.zeros(n + 1, dtype=bool)
    for on, off in run["regulation"]:
        reg[on:off + 1] = True
    baseline, start = [], None
    for v in range(1, n + 1):
        if not reg[v] and start is None:
            start = v
        if reg[v] and start is not None:
            baseline.append((start, v - 1))
            start = None
    if start is not None:
        baseline.append((start, n))
    if run.get("baseline") is not None:
        baseline = [tuple(b) for b in run["baseline"]]
    alpha = 1 - math.exp(-tr / st["smooth_s"]) if st["smooth_s"] > 0 else 1.0
    out = {k: np.full((T, R), np.nan) for k in ("baseline", "percent", "despiked", "smoothed", "norm", "shown")}
    fb, disp = np.full(T, np.nan), np.full(T, np.nan)
    for j in range(R):
        ema = None
        for t in range(1, T + 1):
            x, task_col = design(run, t)
            ok = np.isfinite(means[:t, j]) & np.isfinite(x).all(axis=1)
            if ok[t - 1]:
                beta = fit(x[ok], means[:t, j][ok])
                keep = [k for k in range(x.shape[1]) if k != task_col]
                b = float(x[t - 1, keep] @ beta[keep])
                out["baseline"][t - 1, j] = b
                out["percent"][t - 1, j] = 100 * (means[t - 1, j] - b) / b if b > 0 else np.nan
            d = despike(out["despiked"][:t - 1, j], out["percent"][t - 1, j], st["despike"])
            out["despiked"][t - 1, j] = d
            if np.isfinite(d):
                ema = d if ema is None else ema + alpha * (d - ema)
                out["smoothed"][t - 1, j] = ema
    for t in range(1, T + 1):
        if not reg[t]:
            fb[t - 1] = disp[t - 1] = 0.0
            out["shown"][t - 1] = 0.0
            continue
        norms = []
        blk = next((on for on, off in run["regulation"] if on <= t <= off), t)
        before = [b for b in baseline if b[1] < blk]
        if st["normalise"] and not before:
            continue
        for j in range(R):
            base = 0.0
            if st["normalise"]:
                first, last = before[-1]
                delay = min(math.ceil(6.0 / tr), last - first)
                vals = out["smoothed"][first - 1 + delay:last, j]
                vals = vals[np.isfinite(vals)]
                base = float(np.median(vals)) if len(vals) else np.nan
            norm = out["smoothed"][t - 1, j] - base
            out["norm"][t - 1, j] = norm
            out["shown"][t - 1, j] = show(norm, st["full_scale"], run["display"])
            norms.append(norm)
        fb[t - 1] = combine(run["combine"], norms)
        disp[t - 1] = show(fb[t - 1], st["full_scale"], run["display"])
    return {"per_roi": {k: v.tolist() for k, v in out.items()}, "feedback": fb.tolist(), "display": disp.tolist()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(a.inp) as f:
        run = json.load(f)
    res = run_steps(run)
    text = json.dumps(res).replace("NaN", '"NaN"')
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
