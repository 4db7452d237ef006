//! Calibration: the closed-form alignment against per-run z-scoring on imagery stimuli it
//! never saw, offline decoding with the run's own statistics, clear refusals of bad settings
//! and input, the gradient fit's safety nets, and the live mode in the daemon.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    as_strs, close, decode_cmd, decode_daemon_args, mirage, npy, published, run, run_with_timeout,
    simulated_session_with, train_model, Daemon,
};
use mirage_rt::decode::metrics::two_way;

const HEADS: [&str; 5] = ["image", "text", "lowlevel", "retrieval", "pixels"];
/// The simulator's participants here see 24 stimuli; the default protocol cues 0–11.
const STIMULI: &str = "n_stimuli=24";

/// Stimulus id of every trial of a simulated run (its `events.tsv`).
fn stimuli(run_dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run_dir.join("events.tsv")).unwrap();
    text.lines().skip(1).map(|l| l.split('\t').nth(3).unwrap().parse().unwrap()).collect()
}

/// Calibration rows: the first trial of each of stimuli 0–11 (the default protocol's cues).
fn calibration_rows(stim: &[u64]) -> String {
    let rows: Vec<String> = (0..12)
        .map(|s| stim.iter().position(|x| *x == s).unwrap_or_else(|| panic!("stimulus {s} never shown")))
        .map(|r| r.to_string())
        .collect();
    rows.join(",")
}

/// Mean over heads of the 2-way identification of the trials `rows`.
fn mean_two_way(pred: &Path, truth: &Path, rows: &[usize]) -> f64 {
    let pick = |dir: &Path, head: &str| -> Vec<Vec<f32>> {
        let (shape, values) = npy(&dir.join(format!("{head}.npy")));
        let size = values.len() / shape[0];
        rows.iter().map(|&r| values[r * size..(r + 1) * size].to_vec()).collect()
    };
    HEADS.iter().map(|h| two_way(&pick(pred, h), &pick(truth, h))).sum::<f64>() / HEADS.len() as f64
}

fn decode(model: &Path, betas: &Path, out: &Path, align: &str, run_stats: &str) {
    run(decode_cmd(model, betas, out).args(["--align", align, "--run-stats", run_stats]));
}

fn calibrate(p: &Participant, rows: &str, out: &Path) -> std::process::Command {
    calibrate_for(&p.model, p, rows, out)
}

/// `mirage calibrate` of participant `p`'s calibration run for `model`.
fn calibrate_for(model: &Path, p: &Participant, rows: &str, out: &Path) -> std::process::Command {
    let mut cmd = mirage();
    cmd.args(["calibrate", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--betas")
        .arg(p.cal.1.join("trial_betas.npy"))
        .arg("--targets")
        .arg(p.cal.0.join("truth/targets/trials"))
        .args(["--trials", rows, "--out"])
        .arg(out);
    cmd
}

struct Participant {
    model: PathBuf,
    cal: (PathBuf, PathBuf),
    eval: (PathBuf, PathBuf),
}

fn participant(d: &Path, seed: u64, volumes: u32) -> Participant {
    let (train_run, train_glm) = simulated_session_with(d, seed, "train", "seen", 1, 900, &[STIMULI]);
    Participant {
        model: train_model(d, &train_run, &train_glm),
        cal: simulated_session_with(d, seed, "cal", "imagery", 3, volumes, &[STIMULI]),
        eval: simulated_session_with(d, seed, "eval", "imagery", 4, volumes, &[STIMULI]),
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_calibration_on_twelve_stimuli_beats_per_run_zscoring_on_stimuli_it_never_cued() {
    let mut gains = Vec::new();
    for seed in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = participant(d, seed, 600);
        let rows = calibration_rows(&stimuli(&p.cal.0));
        let head = d.join("alignment.safetensors");
        let report = d.join("fit.json");
        run(calibrate(&p, &rows, &head).arg("--report").arg(&report));
        let fit = read_json(&report);
        assert_eq!(
            (fit["method"].as_str(), fit["n_trials"].as_u64(), fit["n_stimuli"].as_u64()),
            (Some("closed-form"), Some(12), Some(12))
        );
        // The rest of the calibration run entered its statistics.
        assert!(fit["n_run_trials"].as_u64().unwrap() > 40, "{fit}");
        // Held-out estimates, with their uncertainty.
        let est = &fit["two_way"]["gain"];
        assert!(est["se"].as_f64().unwrap() > 0.0 && est["n"] == 12, "{fit}");

        // Evaluated only on stimuli 12–23, which calibration never cued.
        let held: Vec<usize> =
            stimuli(&p.eval.0).iter().enumerate().filter(|(_, s)| **s >= 12).map(|(i, _)| i).collect();
        let betas = p.eval.1.join("trial_betas.npy");
        let truth = p.eval.0.join("truth/targets/trials");
        let score = |align: &str, name: &str| {
            decode(&p.model, &betas, &d.join(name), align, "all");
            mean_two_way(&d.join(name), &truth, &held)
        };
        let (none, zscore, fitted) =
            (score("none", "none"), score("zscore-run", "zs"), score(head.to_str().unwrap(), "head"));
        eprintln!("seed {seed}: none {none:.3} zscore-run {zscore:.3} calibrated {fitted:.3}: {fit}");
        gains.push((fitted - zscore, fitted - none));

        // With the run's statistics as the live stage has them (the rows so far), the last row
        // is decoded as with the whole file's statistics, an early one is not.
        decode(&p.model, &betas, &d.join("running"), head.to_str().unwrap(), "running");
        let (shape, all) = npy(&d.join("head/image.npy"));
        let (_, running) = npy(&d.join("running/image.npy"));
        let size = all.len() / shape[0];
        let last = shape[0] - 1;
        for (a, b) in all[last * size..].iter().zip(&running[last * size..]) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "last row: {a} vs {b}");
        }
        assert!(
            all[3 * size..4 * size] != running[3 * size..4 * size],
            "row 3 used the whole file's statistics"
        );
    }
    let n = gains.len() as f64;
    let (over_zscore, over_none) = gains.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    // benches/calibration_eval.py measures about +24 points over twenty participants.
    assert!(over_zscore > 0.05, "mean gain over per-run z-scoring {over_zscore:.3}");
    assert!(over_none > 0.05, "mean gain over no adaptation {over_none:.3}");
}

#[test]
fn bad_settings_and_input_are_refused_clearly_and_fits_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = participant(d, 3, 300);
    let rows = calibration_rows(&stimuli(&p.cal.0));
    let fail = |cmd: &mut std::process::Command, want: &str| {
        let (status, out) = run_with_timeout(cmd, Duration::from_secs(120));
        assert_eq!(status.code(), Some(2), "{out}");
        assert!(out.contains(want), "expected {want:?} in:\n{out}");
    };
    let x = d.join("x");
    for (set, want) in [
        ("rank=0", "calibrate.rank must be between 1 and 1024"),
        ("alphas=[]", "calibrate.alphas must list positive penalties"),
        ("alphas=[1.0, -2.0]", "calibrate.alphas must list positive penalties"),
        ("inputs=[]", "calibrate.inputs must name at least one"),
        ("inputs=[\"model\", \"model\"]", "lists a normalisation twice"),
        ("modes=[]", "calibrate.modes must list"),
        ("guard_p=0", "calibrate.guard_p must be in (0, 0.5]"),
        ("min_stimuli=1", "calibrate.min_stimuli must be at least 3"),
        ("method=\"newton\"", "method"),
    ] {
        fail(calibrate(&p, &rows, &x).args(["--set", set]), want);
    }
    fail(&mut calibrate(&p, "", &x), "--trials names no rows");
    fail(&mut calibrate(&p, "0,1", &x), "at least 4 are needed");
    fail(&mut calibrate(&p, "0,1,2,9999", &x), "row 9999 does not exist");
    fail(&mut calibrate(&p, "0,1,2,2", &x), "row 2 is named twice");
    fail(&mut calibrate(&p, "0,1,2,x", &x), "--trials");
    assert!(!x.exists(), "a refused fit wrote a file");

    // Fewer than calibrate.min_stimuli stimuli: nothing is tested, the report says why, and the
    // alignment decodes exactly as MIRAGE's per-run z-scoring does.
    let few = d.join("few.safetensors");
    let few_report = d.join("few.json");
    let four: Vec<&str> = rows.split(',').take(4).collect();
    run(calibrate(&p, &four.join(","), &few).arg("--report").arg(&few_report));
    let fit = read_json(&few_report);
    assert!(fit["note"].as_str().unwrap().contains("at least 10"), "{fit}");
    assert!(fit["heads"].as_array().unwrap().iter().all(|h| h["kept"] == false), "{fit}");
    let eval = p.eval.1.join("trial_betas.npy");
    decode(&p.model, &eval, &d.join("few"), few.to_str().unwrap(), "all");
    decode(&p.model, &eval, &d.join("zs"), "zscore-run", "all");
    for head in HEADS {
        let file = format!("{head}.npy");
        let ((sa, a), (sb, b)) = (npy(&d.join("few").join(&file)), npy(&d.join("zs").join(&file)));
        assert_eq!(sa, sb, "{head}");
        close(&a, &b, 1e-6, head);
    }

    // Deterministic: the same fit twice gives the same tensors and decisions.
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    run(&mut calibrate(&p, &rows, &a));
    run(&mut calibrate(&p, &rows, &b));
    let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    assert!(names.contains(&"run.mean"), "{names:?}");
    for name in names {
        assert!(
            a.tensor(name).unwrap().data() == b.tensor(name).unwrap().data(),
            "{name} differs between fits"
        );
    }

    // The gradient fit of a voxel head (calibrate.method = "gradient") survives an absurd
    // learning rate: every exploding step is rolled back and the head stays finite.
    let wild = d.join("wild.safetensors");
    let report = d.join("wild.json");
    run(calibrate(&p, &rows, &wild)
        .args(["--set", "method=\"gradient\"", "--set", "lr=1e6", "--report"])
        .arg(&report));
    let fit = read_json(&report);
    assert!(fit["rollbacks"].as_u64().unwrap() >= 1, "{fit}");
    assert!(fit["loss_final"].as_f64().unwrap().is_finite(), "{fit}");
    decode(&p.model, &p.eval.1.join("trial_betas.npy"), &d.join("wild"), wild.to_str().unwrap(), "all");

    // Another participant's model: the betas do not fit it, and an alignment fitted for one
    // model is refused by another.
    let other = tempfile::tempdir().unwrap();
    let (o_run, o_glm) = simulated_session_with(other.path(), 11, "train", "seen", 1, 300, &[STIMULI]);
    let o_model = train_model(other.path(), &o_run, &o_glm);
    fail(&mut calibrate_for(&o_model, &p, &rows, &x), "voxels, the model takes");
    let good = d.join("good.safetensors");
    run(&mut calibrate(&p, &rows, &good));
    let mut cmd = decode_cmd(&o_model, &o_glm.join("trial_betas.npy"), &d.join("o"));
    cmd.arg("--align").arg(&good);
    fail(&mut cmd, "calibrate again with this model");
}

#[test]
fn calibration_mode_collects_the_protocol_fits_and_switches_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (train_run, train_glm) = simulated_session_with(d, 5, "train", "seen", 1, 600, &[STIMULI]);
    let model = train_model(d, &train_run, &train_glm);
    let protocol = Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/default.toml");
    let session = d.join("s");
    let gallery = train_run.join("truth/gallery");
    // Long enough that three trials follow the switch even when a loaded machine makes the
    // fit finish late.
    let daemon_args = |session: &Path, protocol: &Path| -> Vec<String> {
        let protocol = protocol.to_str().unwrap();
        decode_daemon_args(
            "seed=5&run_seed=8&volumes=420&shape=32,32,20&condition=imagery&motion_mm=0&motion_deg=0&speed=10&n_stimuli=24",
            session,
            "sim",
            &model,
            Some(&gallery),
            &["--mode", "calibrate", "--protocol", protocol],
        )
    };
    let args = daemon_args(&session, &protocol);
    let turn = common::live_fit_turn();
    let daemon = Daemon::start(&as_strs(&args), d);
    let (status, log) = daemon.wait(Duration::from_secs(180));
    drop(turn);
    assert!(status.success(), "{log}");

    let events = published(&session, "calibration");
    let phases: Vec<&str> = events.iter().map(|e| e["phase"].as_str().unwrap()).collect();
    let collecting: Vec<&serde_json::Value> = events.iter().filter(|e| e["phase"] == "collecting").collect();
    assert_eq!(collecting.len(), 11, "{phases:?}\n{log}");
    for (i, e) in collecting.iter().enumerate() {
        assert_eq!(e["collected"], i + 1);
        assert_eq!(e["needed"], 12);
    }
    // The cued stimuli, in the protocol's order, are what was collected.
    let schedule = run(mirage().arg("protocol").arg(&protocol));
    let cued: Vec<String> =
        schedule.lines().skip(1).map(|l| l.split('\t').nth(3).unwrap().to_string()).collect();
    let got: Vec<String> = events
        .iter()
        .filter(|e| e["stim"].is_u64())
        .map(|e| e["stim"].as_u64().unwrap().to_string())
        .collect();
    assert_eq!(got, cued);
    let done = events.iter().find(|e| e["phase"] == "done").unwrap_or_else(|| panic!("{phases:?}\n{log}"));
    let path = PathBuf::from(done["path"].as_str().unwrap());
    assert_eq!(path, session.join("alignment.safetensors"));
    assert!(path.exists());
    let report = &done["report"];
    assert_eq!(
        (report["method"].as_str(), report["n_trials"].as_u64()),
        (Some("closed-form"), Some(12)),
        "{report}"
    );
    eprintln!("live fit: {report}");
    assert!(report["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(report["heads"].as_array().unwrap().len(), HEADS.len(), "{report}");
    assert!(phases.contains(&"fitting"), "{phases:?}");
    // Fit progress names its stage, in order.
    let stages: Vec<&str> = events.iter().filter_map(|e| e["fit_stage"].as_str()).collect();
    let order = |s: &str| ["prepare", "inputs"].iter().position(|x| *x == s);
    let ranks: Vec<usize> = stages.iter().map(|s| order(s).unwrap_or_else(|| panic!("{stages:?}"))).collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{stages:?}");

    // Trials closed after the switch are decoded with the fitted alignment; those before
    // without. The fitted alignment remembers the condition it was fitted on.
    let decoded = common::published_as::<mirage_rt::topic::DecodeHeader>(&session);
    let live: Vec<_> = decoded.iter().filter(|h| !h.trial.at_run_end).collect();
    let first_head = live.iter().position(|h| h.alignment == "head").unwrap_or_else(|| panic!("{log}"));
    assert!(first_head >= 12, "decoded with the alignment from trial {first_head}");
    assert!(live[..first_head].iter().all(|h| h.alignment == "none"));
    assert!(live[first_head..].iter().all(|h| h.alignment == "head"));
    assert!(live.len() - first_head >= 3, "{} trials after the switch", live.len() - first_head);
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    assert_eq!(meta.get("condition").map(String::as_str), Some("imagery"), "{meta:?}");
    assert_eq!(meta.get("format").map(String::as_str), Some("mirage-alignment/2"), "{meta:?}");

    // A protocol that cues a stimulus the gallery lacks is refused before anything runs.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "stimuli = [\"0\", \"99\"]\nrepeats = 1\ncue_s = 4\ninterval_s = 10\n").unwrap();
    let args = daemon_args(&d.join("s2"), &bad);
    let (status, out) = run_with_timeout(mirage().arg("run").args(&args), Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("99"), "{out}");
}
