#!/usr/bin/env python3
"""Regenerates BENCHMARKS.md: runs `mirage bench` scenarios (and, with --criterion, the
criterion benches) on this machine and writes their figures, the commands and the date.

usage: benches/benchmarks.py [--criterion] [--quick] [--render]
Numbers are never edited by hand: rerun this script (--render only re-renders the last run's
reports, keeping its date and commit line).
"""
import argparse
import datetime
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRAGE = os.path.join(ROOT, "target", "release", "mirage")
PLOTS = os.path.join(ROOT, "docs", "benchmarks")

GPU = os.path.join(PLOTS, "gpu")

# (title, arguments, target, repeats): a target scenario runs more than once, since one p99 on
# two shared cores is itself noisy.
SCENARIOS = [
    ("64x64x36, pyneal, 10 Hz, decode 15,724 voxels",
     ["--shape", "64,64,36", "--volumes", "400", "--ingest", "pyneal", "--rate", "10", "--voxels-decoded", "15724"],
     "p99 ingest→publish ≤ 10 ms", 3),
    ("64x64x36, pyneal, 10 Hz, decode 15,724 voxels, the volume path at SCHED_FIFO",
     ["--shape", "64,64,36", "--volumes", "400", "--ingest", "pyneal", "--rate", "10", "--voxels-decoded", "15724",
      "--set", "pipeline.realtime_priority=50"],
     "p99 ingest→publish ≤ 5 ms and trigger → feedback ≤ 8 ms", 3),
    ("64x64x36 latents q8_0, pyneal, 10 Hz, decode 15,724 voxels to latents with 8-bit input weights",
     ["--shape", "64,64,36", "--volumes", "400", "--ingest", "pyneal", "--rate", "10", "--voxels-decoded", "15724",
      "--set", "decode.weight_dtype=\"q8_0\"", "--set", 'decode.latent_heads=["image","text","lowlevel","retrieval"]'],
     None, 1),
    ("81x104x83, pyneal, 5 Hz, decode 15,724 voxels",
     ["--shape", "81,104,83", "--volumes", "200", "--ingest", "pyneal", "--rate", "5", "--voxels-decoded", "15724"],
     "p99 ingest→publish ≤ 60 ms", 1),
    ("64x64x36, pyneal, max rate, decode 15,724 voxels",
     ["--shape", "64,64,36", "--volumes", "1000", "--ingest", "pyneal", "--rate", "max", "--voxels-decoded", "15724"],
     "≥ 100 volumes/s, nothing lost", 1),
    ("64x64x36, LSL, 10 Hz, no decode",
     ["--shape", "64,64,36", "--volumes", "300", "--ingest", "lsl", "--rate", "10"], None, 1),
    ("64x64x36, native ZMQ, 10 Hz, no decode",
     ["--shape", "64,64,36", "--volumes", "300", "--ingest", "zmq", "--rate", "10"], None, 1),
]


def sh(cmd, **kw):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def row(name, s):
    return f"| {name} | {s['count']} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | {s['p999']:.2f} | {s['max']:.2f} |"


def scenario_md(title, args, target, r, slug, repeats=()):
    out = [f"### {title}", "", f"`mirage bench {' '.join(args)} --json … --plot docs/benchmarks/{slug}.svg`", ""]
    if r["setup"].get("date"):
        # A subsection regenerated alone (--scenario) may come from another machine than the header's.
        out += [f"Measured {r['setup']['date']} on {r['setup']['machine']}.", ""]
    if target:
        out += [f"Target: {target}.", ""]
    out += ["| latency (ms) | n | p50 | p90 | p99 | p99.9 | max |", "|---|---|---|---|---|---|---|"]
    for stage in r["stages"]:
        if stage in r["stages_ms"]:
            out.append(row(stage, r["stages_ms"][stage]))
    out.append(row("**ingest → publish**", r["ingest_to_publish_ms"]))
    out.append(row("**trigger → feedback** (at the subscriber)", r["trigger_to_feedback_ms"]))
    if r["trial_decode_ms"]["count"]:
        out.append(row("trial close → decode received", r["trial_decode_ms"]))
        out.append(row("decode compute per trial", r["decode_compute_ms"]))
    if repeats:
        p99 = ", ".join(f"{x['ingest_to_publish_ms']['p99']:.2f}" for x in [r, *repeats])
        fb = ", ".join(f"{x['trigger_to_feedback_ms']['p99']:.2f}" for x in [r, *repeats])
        out += ["", f"The same run repeated {len(repeats) + 1} times: p99 ingest → publish {p99} ms; p99 trigger → "
                f"feedback {fb} ms (the table is the first)."]
    c = r["counts"]
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cpu_ms_per_volume"].items()))
    out += [
        "",
        f"Jitter (sd of trigger→feedback) {r['jitter_ms']:.2f} ms; throughput {r['throughput_vps']:.1f} volumes/s; "
        f"deadline {r['setup']['deadline_ms']:.0f} ms missed {r['deadline_misses']}; sent {c['sent']}, received "
        f"{c['received']}, recorded {c['recorded']}, published {c['published']}, at the subscriber {c['subscriber']}, "
        f"dropped {c['dropped']}.",
        "",
        f"CPU ms per volume: {cpu}.",
        "",
        f"![{title}](docs/benchmarks/{slug}.svg)",
        "",
    ]
    return out


def criterion_md():
    """The criterion section: every bench found in `target/criterion`, and the rows on record in
    BENCHMARKS.md of benches not rerun here (each row says the day it was measured)."""
    rows = {}
    path = os.path.join(ROOT, "BENCHMARKS.md")
    if os.path.exists(path):
        old = open(path).read().splitlines()
        if "## Criterion benches" in old:
            for line in old[old.index("## Criterion benches"):]:
                cells = [c.strip() for c in line.strip("|").split("|")]
                if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("group", "---"):
                    rows[(cells[0], cells[1])] = line
    for est in sorted(glob.glob(os.path.join(ROOT, "target", "criterion", "*", "*", "*", "new", "estimates.json"))
                      + glob.glob(os.path.join(ROOT, "target", "criterion", "*", "*", "new", "estimates.json"))):
        rel = os.path.relpath(est, os.path.join(ROOT, "target", "criterion")).split(os.sep)[:-2]
        group, name = rel[0], "/".join(rel[1:])
        e = json.load(open(est))
        med = e["median"]
        ci = med["confidence_interval"]
        unit = lambda ns: f"{ns / 1e6:.3f} ms" if ns >= 1e5 else f"{ns / 1e3:.2f} µs"
        when = datetime.datetime.fromtimestamp(os.path.getmtime(est), datetime.timezone.utc).strftime("%Y-%m-%d")
        rows[(group, name)] = (f"| {group} | {name} | {unit(med['point_estimate'])} | "
                               f"{unit(ci['lower_bound'])} – {unit(ci['upper_bound'])} | {when} |")
    rows = [rows[k] for k in sorted(rows)]
    if not rows:
        return []
    return ["## Criterion benches", "",
            "`cargo bench` results found in `target/criterion` (median, its 95% confidence interval, and the day it "
            "was measured; `--criterion` reruns them; the full-size `full_*` decode heads need `MIRAGE_BENCH_FULL=1`). "
            "Each bench file's doc comment says what it does; baselines such as `baseline_*` and `reslice_*` ran in "
            "the same process.", "",
            "| group | bench | median | 95% CI | measured |", "|---|---|---|---|---|", *rows, ""]


DECODE_HEAD = ["| heads | weights | device | decoded to | gallery | n | p50 | p90 | p99 | max | max \\|Δ output\\| "
               "vs CPU f32 | top-1 as CPU f32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def decode_row(r, note=""):
    """One `mirage bench-decode` report as a row of DECODE_HEAD."""
    p = r["per_trial_ms"]
    heads = f"r = {r['rank']}" if r["rank"] else "full"
    diff = f"{max(c['max_abs_diff'] for c in r['comparison']):.1e}" if r["comparison"] else "–"
    gb = r["weights"] * (2 if r["weight_dtype"] == "bf16" else 4) / 1e9
    weights = f"{r['weight_dtype']}, {gb:.1f} GB" + (" + 8-bit copy of the input side" if r["weight_dtype"] == "q8_0" else "")
    to = "latents" if r.get("latent_heads") else "outputs"
    gallery = f"{r['gallery']} items" if r.get("gallery") else "–"
    agree = f"{100 * r['top1_agreement']:.0f} % (\\|Δ score\\| ≤ {r['max_score_diff']:.0e})" if r.get("top1_agreement") is not None else "–"
    return (f"| {heads} | {weights} | {r['device']}{note} | {to} | {gallery} | {p['count']} | {p['p50']:.2f} | {p['p90']:.2f} | "
            f"{p['p99']:.2f} | {p['max']:.2f} | {diff} | {agree} |")


LATENT = os.path.join(PLOTS, "decode_cpu")
# (report, bench-decode arguments, environment): the live decode stage on this machine's CPU.
LATENT_RUNS = [
    ("outputs_f32", [], {}),
    ("latent_f32", ["--latent-heads", "all"], {}),
    ("latent_q8_0", ["--latent-heads", "all", "--dtype", "q8_0"], {}),
    ("latent_q8_0_1thread", ["--latent-heads", "all", "--dtype", "q8_0"], {"CANDLE_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}),
]


def latent_md(quick, render):
    """`mirage bench-decode` on this CPU: every output against latents, float32 against 8-bit."""
    os.makedirs(LATENT, exist_ok=True)
    out = ["## Decode on this CPU: outputs or latents", "",
           "`mirage bench-decode --device cpu --gallery 1000 --compare-cpu 20 --trials 200 …`: the live decode stage "
           "(z-scoring, the four MIRAGE heads as random low-rank r = 512 heads over 15,724 voxels, ranking 1,000 gallery "
           "items made from the heads' outputs) one trial at a time; compared with float32 outputs ranked by plain "
           "cosine over the full outputs on the same weights. A latent head's output is compared through its float32 "
           "up-projection. The last row uses one core, as the daemon does by default (`decode.threads = 1`).", "",
           *DECODE_HEAD]
    for name, args, env in LATENT_RUNS:
        js = os.path.join(LATENT, f"{name}.json")
        trials = "40" if quick else "200"
        print(f"== bench-decode {name}", file=sys.stderr)
        if not render:
            sh([MIRAGE, "bench-decode", "--device", "cpu", "--gallery", "1000", "--compare-cpu", "20", "--trials", trials,
                *args, "--json", js], env={**os.environ, **env})
        r = json.load(open(js))
        out.append(decode_row(r, ", one core" if env else ""))
    return out + [""]


def gpu_md():
    """The decoder on a GPU: the reports `scripts/gpu_check.sh` wrote on a GPU machine, kept in
    docs/benchmarks/gpu (this machine has no GPU, so they are rendered, not rerun)."""
    log = os.path.join(GPU, "log.txt")
    if not os.path.exists(log):
        return []
    lines = open(log).read().splitlines()
    when, gpu, cores = lines[0], lines[1], lines[2]
    later = os.path.join(GPU, "latent_log.txt")
    gallery_runs = ""
    if os.path.exists(later):
        gallery_runs = (f" The rows with a gallery: `ONLY='latent|lowrank_gallery' scripts/gpu_check.sh` on "
                        f"{open(later).readline().strip()}, the same kind of machine (`latent_log.txt`); there the "
                        "timed decode is the live stage's (z-scoring, heads, ranking from the latents), and the "
                        "comparison is with float32 outputs on the CPU ranked by plain cosine.")
    out = ["## Decode on a GPU", "",
           f"Measured by `scripts/gpu_check.sh` on {when}: {gpu}, {cores} CPU cores (a lent machine, not this one); "
           "its log and reports are in `docs/benchmarks/gpu/`. `mirage bench-decode` times one trial at a time: "
           "betas up, every head, renormalisation, outputs back on the host. Random weights; 15,724 voxels."
           + gallery_runs, "",
           *DECODE_HEAD]
    for name in ["lowrank_f32", "lowrank_bf16", "lowrank_cpu", "full_f32", "full_bf16", "lowrank_gallery_f32",
                 "latent_gallery_f32", "latent_gallery_q8_cpu"]:
        f = os.path.join(GPU, f"{name}.json")
        if os.path.exists(f):
            out.append(decode_row(json.load(open(f))))
    out += ["", "The same pipeline bench (64×64×36, pyneal, 10 Hz, 300 volumes, decode of 15,724 voxels) on that "
            "machine, decode on the GPU and on its CPU:", "",
            "| decode on | ingest → publish p50 | p99 | trial close → decode p50 | p99 | decode compute p50 | p99 |",
            "|---|---|---|---|---|---|---|"]
    for name, dev in [("pipeline_gpu", "cuda:0"), ("pipeline_cpu", "cpu")]:
        f = os.path.join(GPU, f"{name}.json")
        if os.path.exists(f):
            r = json.load(open(f))
            e, t, d = r["ingest_to_publish_ms"], r["trial_decode_ms"], r["decode_compute_ms"]
            out.append(f"| {dev} | {e['p50']:.2f} | {e['p99']:.2f} | {t['p50']:.2f} | {t['p99']:.2f} | "
                       f"{d['p50']:.2f} | {d['p99']:.2f} |")
    compare = [l for l in lines if l.startswith(("dec ", "aligned ", "mirage: fitted"))]
    if compare:
        out += ["", "A model trained on the simulator (`scripts/gpu_check_data.sh`) decoded, and its alignment head "
                "fitted on 12 imagery trials, on both devices (`dec`: the model's outputs; `aligned`: outputs through "
                "each device's fitted head, decoded on the CPU):", "", "```", *compare, "```"]
    return out + [""]


def scanner_md():
    """The last `benches/scanner_latency.py --json docs/benchmarks/scanner_latency.json` run."""
    f = os.path.join(PLOTS, "scanner_latency.json")
    if not os.path.exists(f):
        return []
    r = json.load(open(f))
    out = ["## Scanner side", "",
           f"`benches/scanner_latency.py --volumes {r['volumes']} --tr {r['tr_s']:g}` on {r['date']}: Siemens mosaic "
           "DICOM files (the real export, renumbered with pydicom) written one by one at TR pace into a folder that "
           "`mirage scanner` watches, sent over pyneal to a `mirage run` daemon on loopback. Latency is the file's "
           "last byte written (the writer's close) to the daemon's receipt of the volume, on one monotonic clock.", "",
           "| watcher | volumes | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |", "|---|---|---|---|---|---|"]
    for run in r["runs"]:
        out.append(f"| {run['mode']} | {run['received']} | {run['p50_ms']:.2f} | {run['p90_ms']:.2f} | "
                   f"{run['p99_ms']:.2f} | {run['max_ms']:.2f} |")
    return out + [""]


CALIBRATION_FAMILIES = {
    "gain-offset": "per-voxel gain and offset fields",
    "rotation-partial": "rotation of 8 of 16 latent dimensions",
    "rotation-full": "rotation of all 16 latent dimensions",
    "snr": "pure SNR loss",
    "global-shift": "weak global shift",
    "simulator": "the simulator's imagery (smooth spatial modes)",
}


def calibration_md():
    """The calibration runs on record: the default's (`docs/benchmarks/calibration_default*.json`), the gradient
    head's and the fallback's (`calibration.json`, `calibration_fallback.json`)."""
    f = os.path.join(PLOTS, "calibration_default.json")
    if not os.path.exists(f):
        return []
    r = json.load(open(f))
    m, t = r["meta"], r["table"]
    old = json.load(open(os.path.join(PLOTS, "calibration.json")))
    g = old["table"] if "gradient" in old["meta"]["methods"] else {}
    pm = lambda v, d=3: f"{v[0]:.{d}f} ± {v[1]:.{d}f}"
    gain = lambda e: f"{e['gain_points'][0]:+.1f} ± {e['gain_points'][1]:.1f} (worst {e['worst_gain_points']:+.1f})"
    fam_name = lambda fam: CALIBRATION_FAMILIES.get(fam, fam)
    out = ["## Calibration", "",
           f"`{m['command']}` ({m['minutes']:.0f} minutes, {len(m['seeds'])} participant "
           "seeds per family): imagery 2-way identification and top-1 retrieval (means over the heads) of held-out imagery "
           "stimuli that calibration never cued, after calibrating on imagery trials of other stimuli. Five families are "
           "trial-beta worlds written for the benchmark (84 seen stimuli × 3 to train, 12 imagery stimuli to calibrate, 24 "
           "to test, SNR 0.15 per voxel); the sixth is the simulator end to end (24 stimuli, the default protocol's 12 cued "
           "once, 12 never cued tested). Gains are points of 2-way over per-run z-scoring (MIRAGE's baseline), mean ± sd "
           "over seeds and the worst seed; the oracle decodes the same imagery trials with the latent shift undone. The "
           "gradient voxel head's rows are from an earlier run, `benches/calibration_eval.py --seeds 20 --json "
           "docs/benchmarks/calibration.json` (66 minutes; the same seeds, worlds and trial draws; that fit has not changed "
           "since).", "",
           "With 12 calibration trials:", "",
           "| family | none | per-run z-scoring | gradient voxel head | closed-form (default) | oracle |",
           "|---|---|---|---|---|---|"]
    for fam, rows in t.items():
        cells = [pm(rows["none"]["two_way"]), pm(rows["zscore-run"]["two_way"])]
        cells.append(f"{pm(g[fam]['gradient-12']['two_way'])}; {gain(g[fam]['gradient-12'])}" if fam in g else "–")
        cells.append(f"{pm(rows['closed-form-12']['two_way'])}; {gain(rows['closed-form-12'])}")
        cells.append(f"{pm(rows['oracle']['two_way'])}; {gain(rows['oracle'])}" if "oracle" in rows else "–")
        out.append(f"| {fam_name(fam)} | " + " | ".join(cells) + " |")
    out += ["", "Top-1 (chance 1/24 for the worlds, 1/12 for the simulator), 12 calibration trials:", "",
            "| family | none | per-run z-scoring | gradient voxel head | closed-form (default) |", "|---|---|---|---|---|"]
    for fam, rows in t.items():
        cells = [pm(rows["none"]["top1"]), pm(rows["zscore-run"]["top1"]),
                 pm(g[fam]["gradient-12"]["top1"]) if fam in g else "–", pm(rows["closed-form-12"]["top1"])]
        out.append(f"| {fam_name(fam)} | " + " | ".join(cells) + " |")
    counts = [4, 8, 12, 24]
    if g:
        out += ["", "Gradient voxel head, gain over per-run z-scoring (points) by number of calibration trials:", "",
                "| family | " + " | ".join(f"{n} trials" for n in counts) + " |", "|---|" + "---|" * len(counts)]
        for fam, rows in g.items():
            out.append(f"| {fam_name(fam)} | " + " | ".join(gain(rows[f"gradient-{n}"]) for n in counts) + " |")
    fallback = json.load(open(os.path.join(PLOTS, "calibration_fallback.json")))
    both = {fam: {**fallback["table"].get(fam, {}), **rows} for fam, rows in t.items()}
    out += ["", "Closed-form (default), gain over per-run z-scoring (points) by number of calibration trials. With fewer "
            "stimuli than `calibrate.min_stimuli`, 10 (4 and 8 trials), nothing is tested and the run is z-scored: "
            f"MIRAGE's baseline exactly (those columns from `{fallback['meta']['command']}`):", "",
            "| family | " + " | ".join(f"{n} trials" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for fam, rows in both.items():
        out.append(f"| {fam_name(fam)} | " + " | ".join(gain(rows[f"closed-form-{n}"]) if f"closed-form-{n}" in rows
                                                        else "–" for n in counts) + " |")
    sets = [r["per_seed"]]
    for name, why in (("calibration_default_21_60.json", ""),
                      ("calibration_default_61_80.json", ", drawn after the guard's standard error and level were chosen: "
                       "out of sample for every choice")):
        more_f = os.path.join(PLOTS, name)
        if not os.path.exists(more_f):
            continue
        mo = json.load(open(more_f))
        sets.append(mo["per_seed"])
        out += ["", f"{len(mo['meta']['seeds'])} participants more ({mo['meta']['seeds'][0]}–{mo['meta']['seeds'][-1]}{why}) "
                f"(`{mo['meta']['command']}`):", "",
                "| family | per-run z-scoring | 12 trials | 24 trials |", "|---|---|---|---|"]
        for fam, rows in mo["table"].items():
            out.append(f"| {fam_name(fam)} | {pm(rows['zscore-run']['two_way'])} | {gain(rows['closed-form-12'])} | "
                       f"{gain(rows['closed-form-24'])} |")
    for fam in ("rotation-partial", "rotation-full"):
        v = [100 * (x["closed-form-12"]["two_way"] - x["zscore-run"]["two_way"]) for per in sets for x in per.get(fam, {}).values()]
        if len(v) > 1:
            mean = sum(v) / len(v)
            sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
            out += ["", f"The {fam_name(fam)} at 12 trials over all {len(v)} participants: {mean:+.1f} points (sd {sd:.1f}, "
                    f"standard error {sd / len(v) ** 0.5:.1f}), worst {min(v):+.1f}."]
    for null in (os.path.join(PLOTS, x) for x in ("calibration_default_null24.json", "calibration_default_null24_21_40.json")):
        if not os.path.exists(null):
            continue
        n = json.load(open(null))
        first, last = n["meta"]["seeds"][0], n["meta"]["seeds"][-1]
        kept = [(fam, seed) for fam, seeds in n["per_seed"].items() for seed, x in seeds.items()
                if any(h["kept"] for h in x["closed-form-24"]["report"]["heads"]) or x["closed-form-24"]["report"]["input"]["kept"]]
        out += ["", f"The worlds with nothing to learn at 24 trials (12 stimuli twice), participants {first}–{last} drawn for "
                f"24 trials alone (`{n['meta']['command']}`): "
                + "; ".join(f"{fam_name(f)} {gain(rows['closed-form-24'])}" for f, rows in n["table"].items())
                + f". The guard kept a correction for {len(kept)} of {sum(len(v) for v in n['per_seed'].values())} participants"
                + (" (" + "; ".join(kept_md(n["per_seed"][f][s], f, s) for f, s in kept) + ")." if kept else ".")]
    out += [""] + CALIBRATION_GUARD_HISTORY
    fits = []
    for est in sorted(glob.glob(os.path.join(ROOT, "target", "criterion", "calibrate", "*", "new", "estimates.json"))):
        med = json.load(open(est))["median"]
        ci = med["confidence_interval"]
        fits.append(f"`{est.split(os.sep)[-3]}` {med['point_estimate'] / 1e9:.2f} s "
                    f"({ci['lower_bound'] / 1e9:.2f}–{ci['upper_bound'] / 1e9:.2f} s)")
    line = ("Fit time, `cargo bench --bench calibrate` (criterion, median and 95% CI, cold, 12 trials at MIRAGE's "
            "sizes: 15,724 voxels, r = 512 heads of the full output shapes): ")
    if not fits:
        # No criterion run on this machine: the figures on record stay.
        on_record = open(os.path.join(ROOT, "BENCHMARKS.md")).read().splitlines()
        fits = [next((l[len(line):].split(". The accuracy")[0] for l in on_record if l.startswith(line)), "not run")]
    out += ["", line + "; ".join(fits) + ". The accuracy runs above shared the machine with other work."]
    return out + [""]


def kept_md(r, fam, seed):
    """A kept correction's held-out estimate against its test on held-out stimuli."""
    g = r["closed-form-24"]["report"]["two_way"]["gain"]
    test = 100 * (r["closed-form-24"]["two_way"] - r["zscore-run"]["two_way"])
    return (f"{CALIBRATION_FAMILIES.get(fam, fam)}, participant {seed}: held-out estimate {100 * g['mean']:+.1f} ± "
            f"{100 * g['se']:.1f} points over its baseline, {test:+.1f} on the test against per-run z-scoring")


# How the guard came to its standard error and level (the earlier runs' JSON is in git history).
CALIBRATION_GUARD_HISTORY = [
    "The guard's standard error and level. Until 2026-12-02 its t-test used the jackknife over held-out stimuli alone, "
    "at `guard_p` 0.15. Over participants 1–60 that gave the rotation of 8 of 16 latent dimensions +11.0 points at 12 "
    "trials, but a world with nothing to learn kept a correction now and then: the weak global shift lost 2.3 points on "
    "one participant of 40 at 24 trials and 4.7 on participant 11 of 20 drawn for 24 trials alone (its held-out "
    "estimate +3.3 ± 1.9; on 400 fresh test stimuli that correction cost 2.0). The cross-validated gain varies from one "
    "calibration draw to the next more than the jackknife says, because every fold's correction is fitted on nearly "
    "the same stimuli. Nadeau and Bengio's corrected resampled variance, (1/J + n_test/n_train) times the spread over "
    "the J held-out pairs, counts that; it came out 1.4–2.7 times the jackknife's on participants 1–60 of the partial "
    "rotation and 1–20 of the worlds with nothing to learn. No level of the jackknife test separated the two: "
    "participant 11 passes at 0.1 (t = 1.37), and 0.05 brings the partial rotation down to +9.2 over participants "
    "1–60. The guard now takes the larger of the two errors, at `guard_p` 0.2 (participant 11: t = 0.73, refused), "
    "chosen on those participants' statistics; the tables above are its runs.",
]


def soak_md():
    """The soak runs on record (`benches/soak.py --json docs/benchmarks/soak*.json`; long, not rerun here)."""
    out = ["## Soak", ""]
    for name in ("soak.json", "soak_tr05.json"):
        f = os.path.join(PLOTS, name)
        if os.path.exists(f):
            out += soak_run_md(json.load(open(f)))
    return out if len(out) > 2 else []


def soak_run_md(r):
    """One soak run: what went through, latency, memory over time and, under heaptrack, the heap."""
    e = r["end_to_end_ms"]
    flags = " --heaptrack" if "heap" in r else ""
    out = [f"`benches/soak.py --minutes {r['minutes']:g} --tr {r['tr_s']:g} --shape {r['shape']}{flags}` on {r['date']}: a "
           "pyneal stream from `mirage simulate --stream` through motion, GLM, publish and recording, a pyzmq subscriber, "
           "the daemon's memory sampled and its `status` topic's rolling ingest → publish percentiles (last 256 volumes) "
           "read every interval.", "",
           f"Sent {r['sent']}, received {r['received']}, recorded {r['recorded']}, published {r['published']}, at the "
           f"subscriber {r['at_subscriber']}: **lost {r['lost']}**; rejected {r['rejected']}, errors "
           f"{r['errors'] or 'none'}. Ingest → publish over the whole run: p50 {e['p50']:.2f}, p90 {e['p90']:.2f}, "
           f"p99 {e['p99']:.2f}, p99.9 {e['p999']:.2f}, max {e['max']:.2f} ms. Session folder {r['session_gb']:.1f} GB.", "",
           "| minute | daemon RSS (MB) | rolling p50 (ms) | rolling p99 (ms) | worst rolling p99 in the interval (ms) |",
           "|---|---|---|---|---|"]
    rows = r["rows"]
    step = max(1, len(rows) // 10)
    for row in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        fmt = lambda v: "–" if v is None else f"{v:.2f}"
        out.append(f"| {row['minute']:.0f} | {row['rss_mb']:.1f} | {fmt(row['rolling_p50_ms'])} | "
                   f"{fmt(row['rolling_p99_ms'])} | {fmt(row['worst_rolling_p99_in_interval_ms'])} |")
    out.append("")
    if r.get("note"):
        out += [r["note"], ""]
    heap = r.get("heap")
    if heap:
        out += ["heaptrack: " + "; ".join(heap["summary"]) + ". The sites holding the most heap at the peak:", ""]
        for p in heap["peak"][:6]:
            ours = ", ".join(f"`{f}`" for f in p["frames"][:2]) or "(outside our frames)"
            out.append(f"- {p['site']}: {ours}")
        out.append("")
    return out


def mindeye2_md():
    """`mirage bench-decode --mindeye2 H` runs on record (docs/benchmarks/mindeye2_*.json; not rerun here)."""
    runs = []
    for name in sorted(os.listdir(PLOTS)) if os.path.isdir(PLOTS) else []:
        if name.startswith("mindeye2_") and name.endswith(".json"):
            runs.append(json.load(open(os.path.join(PLOTS, name))))
    if not runs:
        return []
    out = ["## MindEye2 decode", "",
           "`mirage bench-decode --device DEV --mindeye2 H --trials N --pictures P --json docs/benchmarks/mindeye2_DEV_hH.json`: "
           "a MindEye2 network with random weights at the published shapes (15,724 voxels, 4 mixer blocks, 256 × 1664 CLIP "
           "tokens, the blurry branch), per trial: betas uploaded, ridge, backbone, `clip_proj` and the blurry latent "
           "(4 × 28 × 28), every output back on the host. Then P pictures: Stable Diffusion's VAE decoder (block channels "
           "128, 256, 512, 512; 2 layers per block) turns a blurry latent into a 224 × 224 picture and its PNG.", "",
           "| device | h | dtype | weights (G) | trials | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | picture p50 (ms) | pictures |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["device"], r["hidden"])):
        t, p = r["per_trial_ms"], r.get("per_picture_ms")
        picture = f"{p['p50']:.0f} | {r['pictures']}" if p else "— | 0"
        out.append(f"| {r['device']} | {r['hidden']} | {r['weight_dtype']} | {r['weights'] / 1e9:.2f} | {r['trials']} | "
                   f"{t['p50']:.1f} | {t['p90']:.1f} | {t['p99']:.1f} | {t['max']:.1f} | {picture} |")
    # Weights read per trial over the p50, and the SD VAE decoder's 475 Gflop (28 x 28 latent to
    # 224 x 224, multiply-adds counted twice) over the picture p50, of the widest CPU run.
    cpu = [r for r in runs if r["device"] == "cpu"]
    widest = max(cpu, key=lambda r: r["hidden"]) if cpu else None
    rates = ""
    if widest:
        gbs = widest["weights"] * 4 / 1e9 / (widest["per_trial_ms"]["p50"] / 1e3)
        rates = f" (h = {widest['hidden']}: {gbs:.1f} GB/s of float32 weights at the p50)"
        if widest.get("per_picture_ms"):
            rates += f"; the picture is compute-bound, 475 Gflop of convolutions, {475 / (widest['per_picture_ms']['p50'] / 1e3):.0f} Gflop/s here"
    out += ["", "The backbone_linear alone is h × 425,984 weights (7.0 GB in float32 at h = 4096), read once per trial: "
            f"on this CPU the decode is bound by memory bandwidth{rates}. A picture cannot meet a trial's budget on a "
            "CPU: live, it follows its decode (README, MindEye2). The GPU figures "
            "(`scripts/gpu_check.sh`, steps mindeye2_bf16 and mindeye2_f32) wait for a session with a device.", ""]
    return out


def feedback_choice(r):
    """The default the feedback worlds choose: of the `steps` grid, the recipes whose every
    regulation value stays above -1 response and every spike moves the value by under 1 response,
    in every world and seed; of those, the highest mean correlation over the worlds."""
    grid = r.get("grid", [])
    ok = [g for g in grid if all(w["signals"][g]["worst_in_regulation_min"] > -1
                                 and (w["signals"][g]["spike_change_max"] or 0) < 1 for w in r["results"])]
    mean_corr = {g: sum(w["signals"][g]["corr"] for w in r["results"]) / len(r["results"]) for g in grid}
    return (max(ok, key=lambda g: mean_corr[g]) if ok else None), mean_corr


def feedback_md():
    """The feedback worlds on record (`benches/feedback_worlds.py`, docs/benchmarks/feedback_worlds.json)."""
    f = os.path.join(PLOTS, "feedback_worlds.json")
    if not os.path.exists(f):
        return []
    r = json.load(open(f))
    seeds = r["results"][0].get("seeds", [])
    out = ["## Neurofeedback on worlds built to break it", "",
           f"`{r['command']}` on {r['date']}, commit {r['commit']}: {r['volumes']} volumes at TR {r['tr']:g} s on "
           f"{r['anatomy']} (FSL's example_func: 64x64x21 @ 4x4x6 mm; the MNI template: 61x73x61 @ 3 mm), "
           "20 s baseline and regulation blocks, a 1 % response in a 9 mm sphere, through `mirage run` with "
           f"motion correction, once per recipe; each figure the mean over seeds {', '.join(map(str, seeds))}. "
           "corr: with the true response over the run; in regulation: within regulation blocks only (where a "
           "feedback value is shown; 0 outside them for every recipe); worst: the lowest regulation value below "
           "the baseline mean, and spike: the largest change at a spike volume, both in units of that signal's "
           "own response (regulation mean minus baseline mean), the worst over the seeds. The nuisance ROI is "
           "white matter (MNI) or the brain eroded by two voxels (example_func), outside 20 mm of the ROI. "
           "A raw ROI mean under task-locked motion correlates well because the motion follows the task: that "
           "is the confound, not signal.", ""]
    choice, mean_corr = feedback_choice(r)
    if choice:
        out += [f"**The default, chosen by the rule in `benches/benchmarks.py` (`feedback_choice`):** of the "
                f"`steps` grid, the recipes that keep every regulation value above −1 response and every spike "
                f"change under 1 response in every world and seed, the one with the highest mean correlation: "
                f"**{choice}** (mean corr {mean_corr[choice]:.3f}). The grid's means: "
                + ", ".join(f"{g} {c:.3f}" for g, c in mean_corr.items()) + ".", ""]
        rows = ["| world | the default: corr / in regulation / worst / spike | OpenNFT's best variant there | "
                "corr ≥ OpenNFT's best |", "|---|---|---|---|"]
        for w in r["results"]:
            sig = w["signals"]
            best = max(("opennft, motion regressors", "opennft, no motion regressors"), key=lambda k: sig[k]["corr"])
            fmt = lambda x: (f"{x['corr']:.3f} / {x['corr_in_regulation']:.3f} / {x['worst_in_regulation_min']:.2f} / "
                             + ("–" if x["spike_change_max"] is None else f"{x['spike_change_max']:.2f}"))
            rows.append(f"| {w['world']} | {fmt(sig[choice])} | {best}: {fmt(sig[best])} | "
                        f"{'yes' if sig[choice]['corr'] >= sig[best]['corr'] else 'no'} |")
        out += rows + [""]
    out += ["| world | signal | corr (lowest) | corr in regulation | worst in regulation | spike |",
            "|---|---|---|---|---|---|"]
    for w in r["results"]:
        for name, sc in w["signals"].items():
            spike = "–" if sc.get("spike_change_max") is None else f"{sc['spike_change_max']:.2f}"
            out.append(f"| {w['world']} | {name} | {sc['corr']:.3f} ({sc['corr_min']:.2f}) | "
                       f"{sc['corr_in_regulation']:.3f} | {sc['worst_in_regulation_min']:.2f} | {spike} |")
    return out + [""]


def peers_md():
    """The peers run on record (`benches/peers.py`, docs/benchmarks/peers.json; not rerun here)."""
    f = os.path.join(PLOTS, "peers.json")
    if not os.path.exists(f):
        return []
    r = json.load(open(f))
    g = r["glm"]
    out = ["## Peers side by side", "",
           f"`{r['command']}` on {r['date']}, commit {r['commit']}, {r['machine']}, every tool on one thread, "
           f"in one run on the same data ({r['minutes']:.1f} minutes).", ""]
    for m in r["motion"]:
        out += [f"Motion correction (registration and reslice per volume) of one simulated series, {m['grid']}, "
                f"{m['anatomy']} as anatomy, {m['motion']}; error is the mean displacement against the simulator's "
                f"exact motion over {m['brain_points']:,} brain voxels:", "",
                "| tool | volumes | p50 (ms) | p99 (ms) | p50 ÷ mirage's | mean error (mm) | max error (mm) |",
                "|---|---|---|---|---|---|---|"]
        base = m["mirage"]["p50_ms"]
        for key, label in (("mirage", "mirage-rt (`mirage realign`)"),
                           ("mirage_half_samples", "mirage-rt, `motion.sample_fraction = 0.1` (default 0.2)"),
                           ("simpleitk", f"SimpleITK {m['simpleitk']['version']}: mean squares, 5 % sampling, 2 levels"),
                           ("ants", f"ANTs (antspyx {m['ants']['version']}): `registration(type_of_transform='Rigid')`")):
            t = m[key]
            out.append(f"| {label} | {t['volumes']} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['p50_ms'] / base:.1f} | "
                       f"{t['mean_error_mm']:.4f} | {t['max_error_mm']:.4f} |")
        out.append("")
    n = g["nilearn_refit"]["seconds_at_volume"]
    last = max(n, key=int)
    out += [f"Online GLM of one simulated run, {g['grid']}, {g['volumes']} volumes, {g['voxels']:,} mask voxels, "
            f"{g['regressors']} regressors ({g['trials']} trials, one regressor each):", "",
            "| tool | work per TR | p50 (ms) | p99 (ms) | ÷ mirage's p50 |", "|---|---|---|---|---|",
            f"| mirage-rt (`mirage glm`) | exact incremental least squares, trial betas as each trial closes | "
            f"{g['mirage']['p50_ms']:.2f} | {g['mirage']['p99_ms']:.2f} | 1.0 |",
            f"| NumPy {g['numpy']['version']} | X'X and X'Y updated by the volume's row (design known in advance) | "
            f"{g['numpy']['p50_ms']:.2f} | {g['numpy']['p99_ms']:.2f} | {g['numpy']['p50_ms'] / g['mirage']['p50_ms']:.1f} |"]
    for t in sorted(n, key=int):
        out.append(f"| nilearn {g['nilearn_refit']['version']} `FirstLevelModel` refit at volume {t} | every volume "
                   f"so far refitted | {n[t] * 1e3:.0f} | – | {n[t] * 1e3 / g['mirage']['p50_ms']:.0f} |")
    out += ["", f"NumPy's betas after the last volume (one solve of every beta: {g['numpy']['solve_ms']:.1f} ms) equal "
            f"mirage's to {g['numpy']['final_betas_max_rel_diff']:.1e} of the largest beta. A refit every TR, as "
            f"rt-MindEye does, costs at volume {last} what the row above says, every TR.", ""]
    return out + pyneal_loop_md()


def pyneal_loop_md():
    """The whole loop against pyneal's (`benches/pyneal_loop.py`, docs/benchmarks/pyneal_loop.json; not rerun here)."""
    f = os.path.join(PLOTS, "pyneal_loop.json")
    if not os.path.exists(f):
        return []
    r = json.load(open(f))
    st, res = r["stream"], r["results"]
    out = [f"The whole loop against pyneal's, `{r['meta']['command']}` on {r['meta']['date']}, commit {r['meta']['commit']}: "
           f"one pyneal-scanner sender plays the same simulated series ({st['shape']}, {st['volumes']} volumes, TR "
           f"{st['tr_s']:g} s) into {r['pyneal_description']}, and into {r['mirage_description']}. Latency is "
           f"{r['latency_definition']}. " + "; ".join(r["pyneal_notes"]) + "." + (f" {r['note']}" if r.get("note") else ""), "",
           "| loop | answered | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | within one TR | CPU s per volume |",
           "|---|---|---|---|---|---|---|---|"]
    for key, label in (("pyneal", "pyneal 750f0ec (unmodified)"), ("mirage", "mirage-rt (`mirage run`)")):
        x = res[key]
        lat = x["latency"]
        out.append(f"| {label} | {lat['n']} of {st['volumes']} | {lat['p50_ms']:.1f} | {lat['p90_ms']:.1f} | "
                   f"{lat['p99_ms']:.1f} | {lat['max_ms']:.1f} | {100 * x['within_one_tr']:.0f} % | {x['cpu_s_per_volume']:.3f} |")
    busy = ", ".join(f"{k} {res[k]['machine_busy_pct']:.0f} %" for k in ("pyneal", "mirage"))
    out += ["", f"pyneal ÷ mirage-rt: p50 {res['pyneal']['latency']['p50_ms'] / res['mirage']['latency']['p50_ms']:.0f}×, "
            f"p99 {res['pyneal']['latency']['p99_ms'] / res['mirage']['latency']['p99_ms']:.0f}×; CPU per volume "
            f"{res['pyneal']['cpu_s_per_volume'] / res['mirage']['cpu_s_per_volume']:.0f}×. Both cores' use over each loop's "
            f"run, everything on the machine counted: {busy}.", ""]
    return out


def update_section(lines, before=None, after=None):
    """Replaces the section or subsection `lines` starts (its `## ` or `### ` heading) in
    BENCHMARKS.md, up to the next heading of its level or above; or inserts it before the heading
    `before`, or after the (sub)section headed `after`."""
    path = os.path.join(ROOT, "BENCHMARKS.md")
    old = open(path).read().splitlines()
    level = lines[0].split(" ")[0]
    stops = tuple("#" * k + " " for k in range(2, len(level) + 1))
    end_of = lambda start: next((i for i in range(start + 1, len(old)) if old[i].startswith(stops)), len(old))
    if lines[0] in old:
        start = old.index(lines[0])
        end = end_of(start)
    elif after in old:
        start = end = end_of(old.index(after))
    else:
        start = end = old.index(before) if before in old else len(old)
    open(path, "w").write("\n".join(old[:start] + lines + old[end:]) + "\n")
    print(f"updated {lines[0]} in BENCHMARKS.md", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--criterion", action="store_true", help="run `cargo bench` first")
    ap.add_argument("--quick", action="store_true", help="fewer volumes (for trying the script)")
    ap.add_argument("--render", action="store_true", help="re-render the last run's reports, run nothing")
    ap.add_argument("--only", choices=["calibration", "soak", "mindeye2", "peers", "criterion", "feedback"],
                    help="re-render this section of BENCHMARKS.md from its data, keeping the others")
    ap.add_argument("--scenario", action="append", default=[],
                    help="run only the end-to-end scenarios whose title holds this, updating their subsections")
    a = ap.parse_args()
    if a.only:
        section = {"calibration": calibration_md, "soak": soak_md, "mindeye2": mindeye2_md, "peers": peers_md,
                   "criterion": criterion_md, "feedback": feedback_md}[a.only]()
        return update_section(section, before="## Decode on a GPU")
    sh(["cargo", "build", "--release", "-q"])
    if a.criterion:
        subprocess.run(["cargo", "bench", "-q"], cwd=ROOT, check=True)
    os.makedirs(PLOTS, exist_ok=True)
    machine = None
    body = []
    for title, args, target, repeats in SCENARIOS:
        if a.scenario and not any(x in title for x in a.scenario):
            continue
        args = list(args)
        if a.quick:
            i = args.index("--volumes")
            args[i + 1] = str(max(40, int(args[i + 1]) // 10))
        slug = title.split(",")[0] + "-" + "-".join(p.strip().split()[0].lower() for p in title.split(",")[1:3])
        slug = slug.replace(" ", "").replace("/", "") + ("-fifo" if "SCHED_FIFO" in title else "")
        js = os.path.join("/tmp", f"mirage-bench-{slug}.json")
        print(f"== {title}", file=sys.stderr)
        if not a.render:
            sh([MIRAGE, "bench", *args, "--json", js, "--plot", os.path.join(PLOTS, f"{slug}.svg")])
        r = json.load(open(js))
        again = []
        for k in range(1, repeats):
            jk = js.replace(".json", f"-{k}.json")
            if not a.render:
                sh([MIRAGE, "bench", *args, "--json", jk])
            again.append(json.load(open(jk)))
        machine = r["setup"]["machine"]
        section = scenario_md(title, args, target, r, slug, again)
        body += section
        if a.scenario:
            titles = [t for t, *_ in SCENARIOS]
            update_section(section, after=f"### {titles[max(0, titles.index(title) - 1)]}")
    if a.scenario:
        return
    commit = sh(["git", "describe", "--always", "--dirty"]).strip()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# Benchmarks",
        "",
        f"Generated by `benches/benchmarks.py{' --criterion' if a.criterion else ''}` on {date}, commit {commit}, "
        f"on {machine}. Do not edit by hand: rerun the script.",
        "",
        "`mirage bench` runs the whole daemon in one process: the simulator's volumes (made before "
        "the run, and each one's data frame encoded before its slot, so neither cost is counted) go "
        "over a real transport on loopback into ingest, "
        "motion correction, the online GLM, decoding (random low-rank r = 512 heads of MIRAGE's "
        "output shapes over 15,724 voxels where named; a worker beside the volume path) and "
        "publish, and a ZMQ subscriber thread stamps each message on receipt. Trigger → feedback "
        "is the sender's acquisition stamp to that receipt, on one monotonic clock. Stage "
        "latencies include queue waits; at `--rate max` they are mostly queue.",
        "",
    ]
    latent = latent_md(a.quick, a.render)
    if a.render:
        old = open(os.path.join(ROOT, "BENCHMARKS.md")).read().splitlines()
        head[2] = next(l for l in old if l.startswith("Generated by"))
    sections = (body + soak_md() + scanner_md() + latent + calibration_md() + mindeye2_md() + peers_md()
                + feedback_md() + gpu_md() + criterion_md())
    text = "\n".join(head + ["## End to end", ""] + sections)
    open(os.path.join(ROOT, "BENCHMARKS.md"), "w").write(text)
    print(f"wrote BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
