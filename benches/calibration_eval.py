#!/usr/bin/env python3
"""Calibration benchmark: does imagery calibration transfer, and does it ever hurt?

Families of seen→imagery shift, each over several participant seeds, with imagery stimuli that
calibration never cued. Five are written here at the level of trial betas (our own worlds,
independent of the simulator): per-voxel gain and offset fields, a rotation of 8 of the 16
latent stimulus dimensions, a rotation of all 16, pure SNR loss, and a weak global shift. The
sixth is the simulator's own imagery condition (smooth spatial modes), run end to end through
`mirage simulate` and `mirage glm`, calibrated as the default protocol cues (12 stimuli once).

For each: 2-way identification and top-1 retrieval (mean over heads) of held-out imagery
stimuli for no alignment (the model's z-scoring), per-run z-scoring (MIRAGE's baseline), the
gradient-fitted voxel head (`calibrate.method = "gradient"`) and the closed-form default,
with 4 / 8 / 12 / 24 calibration trials.

usage: benches/calibration_eval.py [--seeds 10] [--first-seed 1] [--families a,b] [--trials 4,8,12,24]
                                   [--methods gradient,closed-form] [--snr S] [--set KEY=VALUE]
                                   [--json OUT]
Needs a release build (target/release/mirage, or $MIRAGE).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRAGE = os.environ.get("MIRAGE", os.path.join(ROOT, "target", "release", "mirage"))
FAMILIES = ["gain-offset", "rotation-partial", "rotation-full", "snr", "global-shift", "simulator"]
WORLD_HEADS = {"image": 64, "text": 48, "pixels": 144}
SIM_HEADS = ["image", "text", "lowlevel", "retrieval", "pixels"]
LATENT = 16
# Extra calibrate settings (--set KEY=VALUE).
EXTRA_SETS = []
# Seen signal variance per voxel, relative to the noise.
SNR = 0.15


def run(*args):
    r = subprocess.run([MIRAGE, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"mirage {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stderr


# ----------------------------------------------------------------- metrics (MindEye's definitions)

def _rows(a):
    a = a.reshape(len(a), -1).astype(np.float64)
    return a


def two_way(pred, truth):
    """For each prediction, the fraction of other stimuli's truths less correlated with it than
    its own truth (Pearson); a stimulus repeated on several trials is one candidate."""
    p, t = _rows(pred), _rows(truth)
    pc = p - p.mean(1, keepdims=True)
    tc = t - t.mean(1, keepdims=True)
    pc /= np.linalg.norm(pc, axis=1, keepdims=True) + 1e-30
    tc /= np.linalg.norm(tc, axis=1, keepdims=True) + 1e-30
    r = pc @ tc.T
    scores = []
    for j in range(len(p)):
        rivals = [i for i in range(len(t)) if not np.array_equal(t[i], t[j])]
        if rivals:
            scores.append(np.mean(r[j, rivals] < r[j, j]))
    return float(np.mean(scores))


def top1(pred, truth):
    """The fraction of predictions whose most cosine-similar distinct truth is their own."""
    p, t = _rows(pred), _rows(truth)
    pn = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-30)
    tn = t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-30)
    c = pn @ tn.T
    hits = 0
    for j in range(len(p)):
        rivals = [i for i in range(len(t)) if not np.array_equal(t[i], t[j])]
        hits += all(c[j, i] < c[j, j] for i in rivals)
    return hits / len(p)


def scores(pred_dir, truth, rows, heads):
    out = {}
    for h in heads:
        p = np.load(os.path.join(pred_dir, f"{h}.npy"))[rows]
        out[h] = (two_way(p, truth[h]), top1(p, truth[h]))
    return {"two_way": float(np.mean([v[0] for v in out.values()])),
            "top1": float(np.mean([v[1] for v in out.values()])),
            "per_head": {h: {"two_way": v[0], "top1": v[1]} for h, v in out.items()}}


# ----------------------------------------------------------------- worlds at the level of betas

def world(seed, family, voxels=2000, n_stim=120):
    """A participant: latent stimuli, a linear encoding model, three heads' targets (one a
    picture), and the family's imagery transform."""
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    S = rng.standard_normal((n_stim, LATENT))
    E = rng.standard_normal((voxels, LATENT)) * np.sqrt(SNR / LATENT)
    base = rng.standard_normal(voxels) * 2.0
    W = {h: rng.standard_normal((LATENT, o)) / np.sqrt(LATENT) for h, o in WORLD_HEADS.items()}
    R, gain, offset, scale, noise, shift = np.eye(LATENT), np.ones(voxels), np.zeros(voxels), 1.0, 1.0, np.zeros(LATENT)
    if family == "gain-offset":
        gain, offset, scale, noise = rng.lognormal(0, 0.7, voxels), rng.standard_normal(voxels), 0.2, 1.5
    elif family.startswith("rotation"):
        k = 8 if family == "rotation-partial" else LATENT
        sub = np.linalg.qr(rng.standard_normal((LATENT, LATENT)))[0][:, :k]
        rot = np.linalg.qr(rng.standard_normal((k, k)))[0]
        R = np.eye(LATENT) - sub @ sub.T + sub @ rot @ sub.T
        scale, offset, noise = 0.6, np.full(voxels, 3.0), 1.5
    elif family == "snr":
        scale, noise = 0.2, 1.5
    elif family == "global-shift":
        shift = rng.standard_normal(LATENT)
        shift *= 1.0 / np.linalg.norm(shift)
        offset, scale, noise = np.full(voxels, 0.5), 0.2, 1.5

    def targets(s):
        out = {}
        for h, w in W.items():
            y = s @ w
            out[h] = (1 / (1 + np.exp(-y))).reshape(len(s), 1, 12, 12) if h == "pixels" else y
        return {h: v.astype(np.float32) for h, v in out.items()}

    def betas(s, imagery, noise_rng, oracle=False):
        """Trial betas; `oracle`: imagery's noise and gain, with the shift of the latent space
        (rotation, offset) undone — what knowing the shift would give."""
        e = noise_rng.standard_normal((len(s), voxels))
        if not imagery:
            x = base + s @ E.T + e
        elif oracle:
            x = base + gain * (scale * s @ E.T) + e * noise
        else:
            x = base + offset + gain * (scale * ((s + shift) @ R.T) @ E.T) + e * noise
        return x.astype(np.float32)

    return S, targets, betas


def save_targets(d, t):
    os.makedirs(d, exist_ok=True)
    for h, v in t.items():
        np.save(os.path.join(d, f"{h}.npy"), v)


def world_seed(seed, family, counts, methods, d):
    """Train on 84 seen stimuli × 3, calibrate on imagery trials of 12 others, test on 24 more."""
    S, targets, betas = world(seed, family)
    rng = np.random.default_rng([seed, 77])
    order = rng.permutation(len(S))
    train, cal, test = order[:84], order[84:96], order[96:120]
    tr = np.repeat(train, 3)
    np.save(f"{d}/train.npy", betas(S[tr], False, rng))
    save_targets(f"{d}/train-targets", targets(S[tr]))
    model = f"{d}/model"
    run("train", "--alpha", "3000", "--betas", f"{d}/train.npy", "--targets", f"{d}/train-targets", "--out", model)
    ev = np.repeat(test, 2)
    state = rng.bit_generator.state
    np.save(f"{d}/eval.npy", betas(S[ev], True, rng))
    rng.bit_generator.state = state
    np.save(f"{d}/oracle.npy", betas(S[ev], True, rng, oracle=True))
    truth = targets(S[ev])
    rows = list(range(len(ev)))
    heads = list(WORLD_HEADS)
    cal_runs = {}
    for n in counts:
        stims = cal[:n] if n <= len(cal) else np.tile(cal, n // len(cal) + 1)[:n]
        np.save(f"{d}/cal-{n}.npy", betas(S[stims], True, rng))
        save_targets(f"{d}/cal-{n}-targets", targets(S[stims]))
        cal_runs[n] = (f"{d}/cal-{n}.npy", f"{d}/cal-{n}-targets", list(range(n)))
    out = evaluate(model, f"{d}/eval.npy", truth, rows, heads, cal_runs, methods, d)
    pred = os.path.join(d, "pred-oracle")
    run("decode", "--device", "cpu", "--model", model, "--betas", f"{d}/oracle.npy", "--out", pred, "--align", "zscore-run")
    out["oracle"] = scores(pred, truth, rows, heads)
    return out


def sim_seed(seed, counts, methods, d):
    """The simulator (24 stimuli): trained on a seen session, calibrated on stimuli 0–11 of an
    imagery session as the default protocol cues them (the rest of that run gives its
    statistics), evaluated on stimuli 12–23 of another."""
    def simulate(name, condition, run_seed, volumes):
        out = os.path.join(d, name)
        run("simulate", "--seed", seed, "--shape", "32,32,20", "--condition", condition, "--volumes", volumes,
            "--set", f"run_seed={run_seed}", "--set", "n_stimuli=24", "--set", "motion_mm=0", "--set", "motion_deg=0",
            "--out", out)
        run("glm", f"{out}/bold.nii.gz", "--events", f"{out}/events.tsv", "--mask", f"{out}/truth/roi_mask.nii.gz",
            "--out", f"{out}-glm")
        stim = [int(l.split("\t")[3]) for l in open(f"{out}/events.tsv").read().splitlines()[1:]]
        return out, f"{out}-glm/trial_betas.npy", stim

    train, train_betas, _ = simulate("train", "seen", 1, 900)
    cal, cal_betas, cal_stim = simulate("cal", "imagery", 3, 600)
    ev, ev_betas, ev_stim = simulate("eval", "imagery", 4, 600)
    model = os.path.join(d, "model")
    run("train", "--alpha", "1000", "--betas", train_betas, "--targets", f"{train}/truth/targets/trials",
        "--mask", f"{train}/truth/roi_mask.nii.gz", "--out", model)
    held = [i for i, s in enumerate(ev_stim) if s >= 12]
    truth = {h: np.load(f"{ev}/truth/targets/trials/{h}.npy")[held] for h in SIM_HEADS}
    per = {s: [i for i, x in enumerate(cal_stim) if x == s] for s in range(12)}
    cal_runs = {}
    for n in counts:
        rows, rep = [], 0
        while len(rows) < n:
            for s in range(12):
                if rep < len(per[s]) and len(rows) < n:
                    rows.append(per[s][rep])
            rep += 1
        cal_runs[n] = (cal_betas, f"{cal}/truth/targets/trials", rows)
    return evaluate(model, ev_betas, truth, held, SIM_HEADS, cal_runs, methods, d)


def evaluate(model, eval_betas, truth, rows, heads, cal_runs, methods, d):
    def decode(tag, align):
        pred = os.path.join(d, f"pred-{tag}")
        run("decode", "--device", "cpu", "--model", model, "--betas", eval_betas, "--out", pred, "--align", align)
        return scores(pred, truth, rows, heads)

    out = {"none": decode("none", "none"), "zscore-run": decode("zs", "zscore-run")}
    for method in methods:
        for n, (betas, targets, cal_rows) in cal_runs.items():
            head = os.path.join(d, f"{method}-{n}.safetensors")
            rep = os.path.join(d, f"{method}-{n}.json")
            t0 = time.perf_counter()
            run("calibrate", "--device", "cpu", "--model", model, "--betas", betas, "--targets", targets,
                "--trials", ",".join(map(str, cal_rows)), "--out", head, "--report", rep,
                "--set", f'method="{method}"', *sum((["--set", x] for x in EXTRA_SETS), []))
            wall = time.perf_counter() - t0
            r = decode(f"{method}-{n}", head)
            r["fit_seconds"] = json.load(open(rep))["seconds"]
            r["wall_seconds"] = wall
            if method == "closed-form":
                r["report"] = json.load(open(rep))
            out[f"{method}-{n}"] = r
    return out


def summarise(results, seeds, methods, counts):
    """Per family and adapter: mean ± sd of 2-way and top-1, and of the gain in 2-way over
    per-run z-scoring (points), with the worst seed."""
    table = {}
    for fam, per_seed in results.items():
        keys = ["none", "zscore-run"] + [f"{m}-{n}" for m in methods for n in counts]
        keys += ["oracle"] if "oracle" in per_seed[seeds[0]] else []
        table[fam] = {}
        for k in keys:
            tw = [per_seed[s][k]["two_way"] for s in seeds]
            t1 = [per_seed[s][k]["top1"] for s in seeds]
            gain = [100 * (per_seed[s][k]["two_way"] - per_seed[s]["zscore-run"]["two_way"]) for s in seeds]
            fit = [per_seed[s][k].get("fit_seconds") for s in seeds]
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
            table[fam][k] = {
                "two_way": [statistics.mean(tw), sd(tw)], "top1": [statistics.mean(t1), sd(t1)],
                "gain_points": [statistics.mean(gain), sd(gain)], "worst_gain_points": min(gain),
                "fit_seconds": statistics.mean(fit) if fit[0] is not None else None,
            }
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=1, help="seeds first-seed … first-seed + seeds − 1")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--trials", default="4,8,12,24")
    ap.add_argument("--methods", default="gradient,closed-form")
    ap.add_argument("--snr", type=float, default=SNR)
    ap.add_argument("--set", action="append", default=[], help="calibrate setting KEY=VALUE")
    ap.add_argument("--json")
    a = ap.parse_args()
    globals()["SNR"] = a.snr
    EXTRA_SETS.extend(a.set)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    counts = [int(n) for n in a.trials.split(",")]
    methods = a.methods.split(",")
    families = a.families.split(",")
    results = {}
    start = time.time()
    for fam in families:
        results[fam] = {}
        for s in seeds:
            with tempfile.TemporaryDirectory(prefix=f"calib-{fam}-{s}-") as d:
                if fam == "simulator":
                    results[fam][s] = sim_seed(s, counts, methods, d)
                else:
                    results[fam][s] = world_seed(s, fam, counts, methods, d)
            r = results[fam][s]
            line = " ".join(f"{k} {100 * (v['two_way'] - r['zscore-run']['two_way']):+.1f}"
                            for k, v in r.items() if k not in ("none", "zscore-run"))
            print(f"{fam} seed {s}: zscore-run 2-way {r['zscore-run']['two_way']:.3f}; gain {line}", flush=True)
    table = summarise(results, seeds, methods, counts)
    for fam, rows in table.items():
        print(f"\n{fam}: 2-way, top-1, gain over per-run z-scoring (points) ± sd, worst seed")
        for k, v in rows.items():
            print(f"  {k:<18}{v['two_way'][0]:.3f} ± {v['two_way'][1]:.3f}  {v['top1'][0]:.3f} ± {v['top1'][1]:.3f}"
                  f"  {v['gain_points'][0]:+6.1f} ± {v['gain_points'][1]:4.1f}  worst {v['worst_gain_points']:+6.1f}")
    if a.json:
        meta = {"seeds": seeds, "trials": counts, "methods": methods, "families": families,
                "minutes": (time.time() - start) / 60,
                "command": "benches/calibration_eval.py " + " ".join(sys.argv[1:])}
        json.dump({"meta": meta, "table": table, "per_seed": results}, open(a.json, "w"))


if __name__ == "__main__":
    main()
