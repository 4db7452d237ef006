#!/usr/bin/env python3
"""Calibration on the simulator: imagery 2-way identification and top-1 retrieval on stimuli
NOT used in calibration, for no adaptation, per-run z-scoring and the fitted alignment head
with 4, 8, 12 and 24 calibration trials; mean ± sd over participant seeds.

usage: benches/calibration_eval.py [--seeds 1,2,3,4,5] [--trials 4,8,12,24] [--json OUT]
       [--set KEY=VALUE ...]   (calibrate settings, e.g. --set rank=4)

Needs a release build (target/release/mirage). The simulator's imagery shift is ours, so
these figures show that the mechanism works, not that it works on NSD-Imagery.
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
HEADS = ["image", "text", "lowlevel", "retrieval", "pixels"]
CALIB_STIMULI = list(range(6))
SIM_SETS = []  # extra simulator parameters (--sim KEY=VALUE)  # the other six stimuli are only ever evaluated


def run(*args):
    r = subprocess.run([MIRAGE, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"mirage {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stderr


def simulate(d, seed, name, condition, run_seed, volumes):
    out = os.path.join(d, name)
    run("simulate", "--seed", seed, "--shape", "32,32,20", "--condition", condition,
        "--volumes", volumes, "--set", f"run_seed={run_seed}", "--set", "motion_mm=0",
        "--set", "motion_deg=0", *sum((["--set", x] for x in SIM_SETS), []), "--out", out)
    run("glm", f"{out}/bold.nii.gz", "--events", f"{out}/events.tsv",
        "--mask", f"{out}/truth/roi_mask.nii.gz", "--out", f"{out}-glm")
    stim = [int(l.split("\t")[3]) for l in open(f"{out}/events.tsv").read().splitlines()[1:]]
    return out, f"{out}-glm/trial_betas.npy", stim


def calibration_rows(stim, n):
    """Round-robin over the calibration stimuli: n=12 is six stimuli twice."""
    per = {s: [i for i, x in enumerate(stim) if x == s] for s in CALIB_STIMULI}
    rows, rep = [], 0
    while len(rows) < n:
        for s in CALIB_STIMULI:
            if rep < len(per[s]) and len(rows) < n:
                rows.append(per[s][rep])
        rep += 1
        if rep > 100:
            sys.exit("not enough calibration trials in the simulated run")
    return rows


def scores(d, tag, model, betas, truth_dir, rows, align):
    pred = os.path.join(d, f"pred-{tag}")
    run("decode", "--device", "cpu", "--model", model, "--betas", betas, "--out", pred, "--align", align)
    sub_p, sub_t = os.path.join(d, f"sub-{tag}-p"), os.path.join(d, f"sub-{tag}-t")
    for folder, src in [(sub_p, pred), (sub_t, truth_dir)]:
        os.makedirs(folder, exist_ok=True)
        for h in HEADS:
            np.save(os.path.join(folder, f"{h}.npy"), np.load(os.path.join(src, f"{h}.npy"))[rows])
    report = os.path.join(d, f"{tag}.json")
    run("eval", "--pred", sub_p, "--truth", sub_t, "--out", report)
    r = json.load(open(report))["all"]["heads"]
    return {
        "two_way": statistics.mean(r[h]["two_way"] for h in HEADS),
        "top1": statistics.mean(r[h]["top1"] for h in HEADS),
        "per_head": {h: {"two_way": r[h]["two_way"], "top1": r[h]["top1"]} for h in HEADS},
    }


def one_seed(seed, trial_counts, sets):
    d = tempfile.mkdtemp(prefix=f"calib-{seed}-")
    train, train_betas, _ = simulate(d, seed, "train", "seen", 1, 900)
    seen, seen_betas, _ = simulate(d, seed, "seen", "seen", 2, 300)
    cal, cal_betas, cal_stim = simulate(d, seed, "cal", "imagery", 3, 600)
    ev, ev_betas, ev_stim = simulate(d, seed, "eval", "imagery", 4, 600)
    model = os.path.join(d, "model")
    run("train", "--alpha", "1000", "--betas", train_betas, "--targets", f"{train}/truth/targets/trials",
        "--mask", f"{train}/truth/roi_mask.nii.gz", "--out", model)
    held = [i for i, s in enumerate(ev_stim) if s not in CALIB_STIMULI]
    seen_rows = list(range(len(np.load(seen_betas))))
    out = {
        "none": scores(d, "none", model, ev_betas, f"{ev}/truth/targets/trials", held, "none"),
        "zscore-run": scores(d, "zs", model, ev_betas, f"{ev}/truth/targets/trials", held, "zscore-run"),
        "seen": scores(d, "seen", model, seen_betas, f"{seen}/truth/targets/trials", seen_rows, "none"),
    }
    for n in trial_counts:
        head = os.path.join(d, f"head-{n}.safetensors")
        rows = calibration_rows(cal_stim, n)
        t0 = time.perf_counter()
        rep = os.path.join(d, f"fit-{n}.json")
        run("calibrate", "--device", "cpu", "--model", model, "--betas", cal_betas,
            "--targets", f"{cal}/truth/targets/trials", "--trials", ",".join(map(str, rows)),
            "--out", head, "--report", rep, *sum((["--set", s] for s in sets), []))
        wall = time.perf_counter() - t0
        fit = json.load(open(rep))
        out[f"head-{n}"] = scores(d, f"h{n}", model, ev_betas, f"{ev}/truth/targets/trials", held, head)
        out[f"head-{n}"]["fit_seconds"] = fit["seconds"]
        out[f"head-{n}"]["wall_seconds"] = wall
        out[f"seen-head-{n}"] = scores(d, f"sh{n}", model, seen_betas, f"{seen}/truth/targets/trials",
                                       seen_rows, head)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--trials", default="4,8,12,24")
    ap.add_argument("--json")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--sim", action="append", default=[])
    a = ap.parse_args()
    SIM_SETS.extend(a.sim)
    seeds = [int(s) for s in a.seeds.split(",")]
    counts = [int(n) for n in a.trials.split(",")]
    results = {s: one_seed(s, counts, a.set) for s in seeds}
    rows = ["none", "zscore-run"] + [f"head-{n}" for n in counts] + ["seen"] + [f"seen-head-{n}" for n in counts]

    def ms(key, metric):
        v = [results[s][key][metric] for s in seeds]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    print(f"imagery on held-out stimuli (mean over heads), {len(seeds)} seeds; seen rows: seen test run")
    print(f"{'adapter':<16}{'2-way':>16}{'top-1':>16}{'fit s':>10}")
    summary = {}
    for k in rows:
        (m2, s2), (m1, s1) = ms(k, "two_way"), ms(k, "top1")
        fit = [results[s][k].get("fit_seconds") for s in seeds]
        fs = f"{statistics.mean(fit):.2f}" if fit[0] is not None else "-"
        print(f"{k:<16}{m2:>9.3f} ± {s2:.3f}{m1:>9.3f} ± {s1:.3f}{fs:>10}")
        summary[k] = {"two_way": [m2, s2], "top1": [m1, s1]}
    if a.json:
        json.dump({"seeds": seeds, "summary": summary, "per_seed": results}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
