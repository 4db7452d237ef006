//! OpenNFT's continuous PSC, step by step, against the numpy re-implementation of its MATLAB
//! code (`tests/python/opennft_reference.py`, itself checked against OpenNFT's files in Octave),
//! fed the same ROI means and motion.

use crate::common;

use std::time::Duration;

use mirage_rt::feedback::opennft::{Combine, Display, Mode, OpenNftFeedback, Protocol, VolumeSteps};
use mirage_rt::feedback::steps::{RoiStep, Steps, StepsFeedback, StepsVolume};
use serde_json::{json, Value};

/// A run: each volume's ROI means, its motion parameters, and the regulation blocks.
type World = (Vec<Vec<f64>>, Vec<[f64; 6]>, Vec<(usize, usize)>);

/// A run with a known response: `n` volumes at TR 2 s, 10-volume baseline and regulation blocks
/// alternating, a 1% response in regulation (lagged 2 volumes) in ROI 0 and half of it in ROI 1,
/// slow drift, noise, head motion that follows the task, and a spike at volume 47.
fn world(n: usize) -> World {
    let blocks: Vec<(usize, usize)> =
        (0..).map(|k| (11 + 20 * k, 20 + 20 * k)).take_while(|b| b.1 <= n).collect();
    let mut rng = mirage_rt::rng::Rng::new(7, 0);
    let active = |t: usize| blocks.iter().any(|&(on, off)| (on + 2..=off + 2).contains(&t));
    let mut means = Vec::new();
    let mut motion = Vec::new();
    for t in 1..=n {
        let task = if active(t) { 1.0 } else { 0.0 };
        let drift = 0.02 * t as f64;
        let spike = if t == 47 { 40.0 } else { 0.0 };
        means.push(vec![
            1000.0 * (1.0 + 0.01 * task) + drift + 2.0 * rng.normal() + spike,
            800.0 * (1.0 + 0.005 * task) - drift + 2.0 * rng.normal() + spike,
        ]);
        let m = 0.3 * task + 0.02 * rng.normal();
        motion.push([m, 0.5 * m, 0.1 * rng.normal(), 0.002 * task, 0.0, 0.001 * rng.normal()]);
    }
    (means, motion, blocks)
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "NaN" => f64::NAN,
        v => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

/// A run's regulation blocks, display blocks and feedback mode.
type Blocks<'a> = (&'a [(usize, usize)], &'a [(usize, usize)], Mode);

/// The reference's steps for a run.
fn reference(
    means: &[Vec<f64>],
    motion: Option<&[[f64; 6]]>,
    (blocks, display, mode): Blocks,
    operation: &str,
    tr: f64,
) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.json"), dir.path().join("out.json"));
    let mut options = json!({"roi_anat_operation": operation});
    if motion.is_none() {
        options["motion_missing"] = json!("omit");
    }
    if mode == Mode::Intermittent {
        options["prot"] = json!("Inter");
    }
    let pairs = |b: &[(usize, usize)]| b.iter().map(|b| [b.0, b.1]).collect::<Vec<_>>();
    let doc = json!({
        "tr": tr,
        "roi_means": means,
        "motion": motion,
        "blocks": {"regulation": pairs(blocks), "display": pairs(display)},
        "options": options,
    });
    std::fs::write(&input, doc.to_string()).unwrap();
    let (status, out) = common::run_with_timeout(
        common::python("opennft_reference.py").arg("--in").arg(&input).arg("--out").arg(&output),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{out}");
    serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap()
}

/// Ours over the same run.
fn ours(
    means: &[Vec<f64>],
    motion: Option<&[[f64; 6]]>,
    (blocks, display, mode): Blocks,
    combine: Combine,
    tr: f64,
) -> Vec<VolumeSteps> {
    let protocol =
        Protocol::with_display(means.len(), tr * 1000.0, blocks.to_vec(), display.to_vec()).unwrap();
    let mut psc =
        OpenNftFeedback::new(protocol, mode, means[0].len(), combine, Display::default(), motion.is_some());
    (0..means.len()).map(|t| psc.step(&means[t], motion.map(|m| m[t]))).collect()
}

/// Every step of every ROI and volume, and the feedback, agree to 1e-6 (relative to the step's
/// scale over the run).
fn agree(got: &[VolumeSteps], want: &Value, what: &str) {
    type Step = fn(&mirage_rt::feedback::opennft::RoiSteps) -> f64;
    let steps: [(&str, Step); 8] = [
        ("init_lim", |s| s.init_lim),
        ("raw_ar1", |s| s.raw_ar1),
        ("glm", |s| s.glm),
        ("sigma", |s| s.sigma),
        ("kalman", |s| s.kalman),
        ("pos_min", |s| s.pos_min),
        ("pos_max", |s| s.pos_max),
        ("scaled", |s| s.scaled),
    ];
    for (name, step) in steps {
        let rows = want["per_roi"][name].as_array().unwrap();
        assert_eq!(rows.len(), got.len(), "{what} {name}");
        let scale =
            rows.iter().flat_map(|r| r.as_array().unwrap()).map(|v| number(v).abs()).fold(1e-12, f64::max);
        let mut worst = 0f64;
        for (t, (row, g)) in rows.iter().zip(got).enumerate() {
            for (j, v) in row.as_array().unwrap().iter().enumerate() {
                let (a, b) = (step(&g.rois[j]), number(v));
                assert!(
                    (a - b).abs() <= 1e-6 * scale,
                    "{what}: {name} volume {} ROI {j}: ours {a}, reference {b}",
                    t + 1
                );
                worst = worst.max((a - b).abs() / scale);
            }
        }
        eprintln!("{what}: {name} agrees to {worst:.1e} of its range");
    }
    // Each ROI's normalised value where the reference has one (regulation volumes).
    for (t, (v, g)) in want["per_volume"]["norm_perc_values"].as_array().unwrap().iter().zip(got).enumerate()
    {
        let theirs: Vec<f64> = v.as_array().map(|a| a.iter().map(number).collect()).unwrap_or_default();
        let mine: Vec<f64> = g.rois.iter().filter_map(|r| r.norm).collect();
        assert_eq!(mine.len(), theirs.len(), "{what}: volume {}", t + 1);
        for (a, b) in mine.iter().zip(&theirs) {
            assert!((a - b).abs() <= 1e-9, "{what}: norm at volume {}: ours {a}, reference {b}", t + 1);
        }
    }
    for (key, pick) in [("fb_value", 0), ("disp_value", 1)] {
        for (t, (v, g)) in want["per_volume"][key].as_array().unwrap().iter().zip(got).enumerate() {
            let (a, b) = (if pick == 0 { g.feedback } else { g.display }, number(v));
            assert!(
                (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6,
                "{what}: {key} volume {}: ours {a}, reference {b}",
                t + 1
            );
        }
    }
}

#[test]
fn intermittent_psc_equals_the_opennft_reference_step_by_step() {
    // 10 baseline, 10 regulation, 4 display volumes, repeated; a value at each block's end, held
    // through its display volumes.
    let n = 120;
    let regulation: Vec<(usize, usize)> = (0..5).map(|k| (11 + 24 * k, 20 + 24 * k)).collect();
    let display: Vec<(usize, usize)> = regulation.iter().map(|&(_, off)| (off + 1, off + 4)).collect();
    let (means, motion, _) = world(n);
    let blocks = (&regulation[..], &display[..], Mode::Intermittent);
    let want = reference(&means, Some(&motion), blocks, "mean(norm_percValues)", 2.0);
    let got = ours(&means, Some(&motion), blocks, Combine::Mean, 2.0);
    agree(&got, &want, "intermittent");
    // Shown at the end of each block and through its display volumes, 0 elsewhere.
    let shown: Vec<usize> = (0..n).filter(|&t| got[t].display != 0.0).map(|t| t + 1).collect();
    eprintln!("intermittent: values shown at volumes {shown:?}");
    assert!(shown
        .iter()
        .all(|t| regulation.iter().any(|b| b.1 == *t) || display.iter().any(|b| (b.0..=b.1).contains(t))));
    assert!(!shown.is_empty());
}

#[test]
fn continuous_psc_equals_the_opennft_reference_step_by_step() {
    let (means, motion, blocks) = world(120);
    let want =
        reference(&means, Some(&motion), (&blocks, &[], Mode::Continuous), "mean(norm_percValues)", 2.0);
    let got = ours(&means, Some(&motion), (&blocks, &[], Mode::Continuous), Combine::Mean, 2.0);
    agree(&got, &want, "mean, motion regressors");
    // Regulation volumes show values, and the NaN a missing baseline would give is absent.
    let shown = got.iter().filter(|v| v.display > 0.0).count();
    eprintln!("volumes with a value shown: {shown} of {}", got.len());
    assert!(shown > 10 && got.iter().all(|v| v.feedback.is_finite()));
    let want = reference(
        &means,
        None,
        (&blocks, &[], Mode::Continuous),
        "norm_percValues(1)-norm_percValues(2)",
        2.0,
    );
    agree(
        &ours(&means, None, (&blocks, &[], Mode::Continuous), Combine::Difference(0, 1), 2.0),
        &want,
        "difference, no motion regressors",
    );
    let want =
        reference(&means, Some(&motion), (&blocks, &[], Mode::Continuous), "median(norm_percValues)", 2.0);
    agree(
        &ours(&means, Some(&motion), (&blocks, &[], Mode::Continuous), Combine::Median, 2.0),
        &want,
        "median",
    );
    let weighted = "0.7*norm_percValues(1)+0.3*norm_percValues(2)";
    let want = reference(&means, Some(&motion), (&blocks, &[], Mode::Continuous), weighted, 2.0);
    let got =
        ours(&means, Some(&motion), (&blocks, &[], Mode::Continuous), Combine::Weighted(vec![0.7, 0.3]), 2.0);
    agree(&got, &want, "weighted sum");
}

/// A daemon replaying a simulated 80-volume run (its TR returned) into OpenNFT's recipe over the
/// simulator's visual ROI, regulation blocks of 10 volumes from volumes 11, 31, 51 and 71 and
/// display blocks of 4 after the first three, recording to `session`; `extra` flags follow.
fn replay_with_feedback(
    dir: &std::path::Path,
    session: &std::path::Path,
    extra: &[&str],
) -> (common::Daemon, f64) {
    let run = dir.join("run");
    common::run(
        common::mirage()
            .args(["simulate", "--seed", "5", "--shape", "32,32,20", "--volumes", "80", "--out"])
            .arg(&run),
    );
    let image = mirage_rt::io::nifti::read_nifti(run.join("bold.nii.gz"), 1 << 24).unwrap();
    let tr = image.header.tr_seconds().unwrap();
    let protocol = dir.join("protocol.tsv");
    let mut rows: String =
        [10, 30, 50, 70].iter().map(|v| format!("{}\t{}\tregulation\n", *v as f64 * tr, 10.0 * tr)).collect();
    rows += &[20, 40, 60]
        .iter()
        .map(|v| format!("{}\t{}\tdisplay\n", *v as f64 * tr, 4.0 * tr))
        .collect::<String>();
    std::fs::write(&protocol, format!("onset\tduration\ttrial_type\n{rows}")).unwrap();
    let ingest = format!("file://{}?speed=max", run.join("bold.nii.gz").display());
    let mask = run.join("truth/roi_mask.nii.gz");
    let rois = format!("glm.rois=[{{name = \"visual\", path = \"{}\"}}]", mask.display());
    let proto = format!("feedback.protocol=\"{}\"", protocol.display());
    let mut args =
        vec!["--ingest", &ingest, "--publish", "none", "--quiet", "--record", session.to_str().unwrap()];
    args.extend(["--set", &rois, "--set", "feedback.recipe=\"opennft\"", "--set", &proto]);
    args.extend(["--set", "feedback.volumes=80"]);
    args.extend(extra);
    (common::Daemon::start(&args, dir), tr)
}

#[test]
fn the_live_feedback_of_a_replayed_run_equals_the_offline_recipe_and_the_reference() {
    use mirage_rt::topic::{MotionHeader, RoiHeader};
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("s");
    let (daemon, tr) = replay_with_feedback(dir.path(), &session, &["--no-lsl"]);
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    let roi = common::published_as::<RoiHeader>(&session);
    let motion = common::published_as::<MotionHeader>(&session);
    assert_eq!((roi.len(), motion.len()), (80, 80));
    let means: Vec<Vec<f64>> = roi.iter().map(|r| vec![r.rois[0].mean.unwrap_or(f64::NAN)]).collect();
    let params: Vec<[f64; 6]> = motion.iter().map(|m| m.params()).collect();
    let blocks = [(11, 20), (31, 40), (51, 60), (71, 80)];
    let offline = ours(&means, Some(&params), (&blocks, &[], Mode::Continuous), Combine::Mean, tr);
    for (r, o) in roi.iter().zip(&offline) {
        assert_eq!(r.feedback, Some(o.display).filter(|v| v.is_finite()), "volume {}", r.index);
        // One ROI: its own value is the combined one.
        assert_eq!(r.rois[0].feedback, r.feedback, "volume {}", r.index);
    }
    let want =
        reference(&means, Some(&params), (&blocks, &[], Mode::Continuous), "mean(norm_percValues)", tr);
    for (r, v) in roi.iter().zip(want["per_volume"]["disp_value"].as_array().unwrap()) {
        assert_eq!(r.feedback, Some(number(v)).filter(|x| x.is_finite()), "volume {}", r.index);
    }
    // The export's ROI time series carries it as a column.
    let bids = dir.path().join("bids");
    common::run(common::mirage().arg("export").arg(&session).arg("--bids").arg(&bids).args([
        "--subject",
        "01",
        "--task",
        "nf",
    ]));
    let series =
        walk(&bids).into_iter().find(|p| p.to_string_lossy().ends_with("desc-roi_timeseries.tsv")).unwrap();
    let table = mirage_rt::io::tsv::read(&series).unwrap();
    let col = table.column("feedback").expect("a feedback column");
    for (row, r) in table.rows.iter().zip(&roi) {
        let cell = row.get(col).unwrap();
        assert_eq!(cell.parse::<f64>().ok(), r.feedback, "volume {}: {cell}", r.index);
    }
    let shown = roi.iter().filter(|r| r.feedback.is_some_and(|v| v > 0.0)).count();
    eprintln!("live OpenNFT feedback: {shown} of 80 volumes above 0");
    assert!(shown > 0);
}

/// `mirage check` on a simulated 40-volume run with the simulator's visual ROI, a regulation
/// block at 20 s and `[feedback] recipe = RECIPE` followed by `extra` lines.
fn check_recipe(dir: &std::path::Path, recipe: &str, extra: &str) -> (std::process::ExitStatus, String) {
    let protocol = dir.join("protocol.tsv");
    std::fs::write(&protocol, "onset\tduration\ttrial_type\n20\t20\tregulation\n").unwrap();
    let config = dir.join("run.toml");
    let text = format!(
        "[ingest]\nuri = \"sim://?volumes=40\"\n[glm]\nrois = [{{name = \"visual\", path = \"sim\"}}]\n\
         [feedback]\nrecipe = \"{recipe}\"\nvolumes = 40\nprotocol = \"{}\"\n{extra}",
        protocol.display()
    );
    std::fs::write(&config, text).unwrap();
    common::run_with_timeout(
        common::mirage().arg("check").arg("--config").arg(&config),
        Duration::from_secs(60),
    )
}

#[test]
fn a_recipe_naming_an_unknown_roi_or_condition_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str| check_recipe(dir.path(), "opennft", extra);
    let (status, out) = check("");
    assert!(status.success(), "{out}");
    let (status, out) = check("rois = [\"nowhere\"]\n");
    assert!(!status.success() && out.contains("\"nowhere\"") && out.contains("visual"), "{out}");
    let (status, out) = check("regulation = \"tapping\"\n");
    assert!(!status.success() && out.contains("\"tapping\""), "{out}");
}

#[test]
fn the_example_display_reads_the_live_feedback_headless() {
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("s");
    let outlet = common::unique_name("mirage-feedback");
    let name = format!("publish.lsl_feedback=\"{outlet}\"");
    let (mut daemon, _) =
        replay_with_feedback(dir.path(), &session, &["--set", &name, "--set", "publish.lsl_wait_s=60"]);
    daemon.wait_for_log("waiting up to 60 s for an LSL consumer", Duration::from_secs(60));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/feedback_display.py");
    let py = std::env::var("MIRAGE_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = std::process::Command::new(py);
    cmd.arg(script).arg(format!("lsl:{outlet}")).args(["--headless", "--count", "80"]);
    let (status, out) = common::run_with_timeout(&mut cmd, Duration::from_secs(120));
    assert!(status.success(), "{out}\n{}", daemon.log());
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let shown: Vec<(u64, Option<f64>)> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["index"].as_u64().unwrap(), v["feedback"].as_f64()))
        .collect();
    let published: Vec<(u64, Option<f64>)> = common::published_as::<mirage_rt::topic::RoiHeader>(&session)
        .iter()
        .map(|r| (r.index, r.feedback))
        .collect();
    assert_eq!(shown.len(), 80, "{out}");
    assert_eq!(shown, published);
}

#[test]
fn live_intermittent_feedback_equals_the_reference_on_its_recorded_means() {
    use mirage_rt::topic::{MotionHeader, RoiHeader};
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("s");
    let recipe = ["--no-lsl", "--set", "feedback.recipe=\"opennft_intermittent\""];
    let (daemon, tr) = replay_with_feedback(dir.path(), &session, &recipe);
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    let roi = common::published_as::<RoiHeader>(&session);
    let means: Vec<Vec<f64>> = roi.iter().map(|r| vec![r.rois[0].mean.unwrap_or(f64::NAN)]).collect();
    let params: Vec<[f64; 6]> =
        common::published_as::<MotionHeader>(&session).iter().map(|m| m.params()).collect();
    let (regulation, display) = ([(11, 20), (31, 40), (51, 60), (71, 80)], [(21, 24), (41, 44), (61, 64)]);
    let want = reference(
        &means,
        Some(&params),
        (&regulation, &display, Mode::Intermittent),
        "mean(norm_percValues)",
        tr,
    );
    let shown = want["per_volume"]["disp_value"].as_array().unwrap();
    for (r, v) in roi.iter().zip(shown) {
        assert_eq!(r.feedback, Some(number(v)).filter(|x| x.is_finite()), "volume {}", r.index);
    }
    // Outside block ends and display volumes the value is 0.
    let held: Vec<u64> = roi.iter().filter(|r| r.feedback != Some(0.0)).map(|r| r.index + 1).collect();
    assert!(
        held.iter()
            .all(|&t| [20, 40, 60, 80].contains(&t)
                || display.iter().any(|b| (b.0..=b.1).contains(&(t as usize)))),
        "{held:?}"
    );
}

/// The `steps` recipe's settings as the reference reads them.
fn steps_json(s: &Steps) -> Value {
    json!({"trend": s.trend, "task": s.task, "motion": s.motion, "nuisance": s.nuisance,
           "despike": s.despike, "smooth_s": s.smooth_s, "normalise": s.normalise, "full_scale": s.full_scale})
}

/// A nuisance series for [`world`]: a global signal with the world's drift, noise and spike.
fn global_signal(n: usize) -> Vec<f64> {
    let mut rng = mirage_rt::rng::Rng::new(9, 0);
    (1..=n).map(|t| 900.0 + 0.015 * t as f64 + rng.normal() + if t == 47 { 36.0 } else { 0.0 }).collect()
}

/// The `steps` recipe over a run, ours and the reference's, compared step by step to 1e-6 of each
/// step's range; returns ours.
fn steps_agree(
    (means, motion, blocks): &World,
    nuisance: Option<&[f64]>,
    steps: Steps,
    (combine, name): (Combine, Value),
    display: Display,
    (tr, named, what): (f64, Option<&[(usize, usize)]>, &str),
) -> Vec<StepsVolume> {
    let n = means.len();
    let protocol =
        Protocol::with_baseline(n, tr * 1000.0, blocks.clone(), Vec::new(), named.map(<[_]>::to_vec))
            .unwrap();
    let mut recipe = StepsFeedback::new(steps.clone(), protocol, means[0].len(), combine, display.clone());
    let got: Vec<StepsVolume> =
        (0..n).map(|t| recipe.step(&means[t], Some(motion[t]), nuisance.map(|v| v[t]))).collect();
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.json"), dir.path().join("out.json"));
    let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    let doc = json!({
        "tr": tr, "n_volumes": n,
        "roi_means": means.iter().map(|r| r.iter().map(|&v| finite(v)).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "motion": motion, "nuisance": nuisance.map(|v| v.iter().map(|&x| finite(x)).collect::<Vec<_>>()),
        "regulation": blocks.iter().map(|b| [b.0, b.1]).collect::<Vec<_>>(),
        "baseline": named.map(|b| b.iter().map(|b| [b.0, b.1]).collect::<Vec<_>>()),
        "steps": steps_json(&steps), "combine": name,
        "display": {"max": display.max, "min": display.min, "decimals": display.decimals, "negative": display.negative},
    });
    std::fs::write(&input, doc.to_string()).unwrap();
    let (status, out) = common::run_with_timeout(
        common::python("feedback_steps_reference.py").arg("--in").arg(&input).arg("--out").arg(&output),
        Duration::from_secs(300),
    );
    assert!(status.success(), "{out}");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    type Step = fn(&RoiStep) -> f64;
    let each: [(&str, Step); 6] = [
        ("baseline", |s| s.baseline),
        ("percent", |s| s.percent),
        ("despiked", |s| s.despiked),
        ("smoothed", |s| s.smoothed),
        ("norm", |s| s.norm.unwrap_or(f64::NAN)),
        ("shown", |s| s.shown),
    ];
    let same = |a: f64, b: f64, tol: f64| (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol;
    for (key, step) in each {
        let rows = want["per_roi"][key].as_array().unwrap();
        let scale = rows
            .iter()
            .flat_map(|r| r.as_array().unwrap())
            .map(number)
            .filter(|v| v.is_finite())
            .fold(1e-12f64, |m, v| m.max(v.abs()));
        let mut worst = 0f64;
        for (t, (row, g)) in rows.iter().zip(&got).enumerate() {
            for (j, v) in row.as_array().unwrap().iter().enumerate() {
                let (a, b) = (step(&g.rois[j]), number(v));
                assert!(
                    same(a, b, 1e-6 * scale),
                    "{what}: {key} volume {} ROI {j}: ours {a}, reference {b}",
                    t + 1
                );
                if a.is_finite() {
                    worst = worst.max((a - b).abs() / scale);
                }
            }
        }
        eprintln!("steps, {what}: {key} agrees to {worst:.1e} of its range");
    }
    for (key, pick) in [("feedback", 0), ("display", 1)] {
        for (t, (v, g)) in want[key].as_array().unwrap().iter().zip(&got).enumerate() {
            let a = if pick == 0 { g.feedback } else { g.display };
            assert!(same(a, number(v), 1e-6), "{what}: {key} volume {}: ours {a}, reference {v}", t + 1);
        }
    }
    got
}

#[test]
fn the_steps_recipe_equals_its_reference_step_by_step() {
    let w = world(120);
    let defaults = Steps {
        trend: true,
        task: true,
        motion: false,
        nuisance: false,
        despike: 3.0,
        smooth_s: 0.0,
        normalise: true,
        full_scale: 1.0,
    };
    let got = steps_agree(
        &w,
        None,
        defaults.clone(),
        (Combine::Mean, json!("mean")),
        Display::default(),
        (2.0, None, "defaults"),
    );
    assert!(got.iter().filter(|v| v.display > 0.0).count() > 10);
    let every = Steps { motion: true, nuisance: true, despike: 2.5, smooth_s: 4.0, ..defaults.clone() };
    let negative = Display { negative: true, decimals: 2, ..Display::default() };
    let global = global_signal(120);
    steps_agree(
        &w,
        Some(&global),
        every,
        (Combine::Difference(0, 1), json!("difference")),
        negative.clone(),
        (2.0, None, "motion, nuisance, smoothing, difference"),
    );
    let bare = Steps {
        trend: false,
        task: false,
        despike: 0.0,
        normalise: false,
        full_scale: 0.0,
        ..defaults.clone()
    };
    steps_agree(
        &w,
        None,
        bare,
        (Combine::Weighted(vec![0.7, 0.3]), json!([0.7, 0.3])),
        negative,
        (2.0, None, "bare, weighted"),
    );
    // Named baseline blocks: the two volumes before each regulation block (instructions) are in
    // none, so they are not in the baseline's median.
    let named: Vec<(usize, usize)> = (0..6).map(|k| (1 + 20 * k, 8 + 20 * k)).collect();
    let with = steps_agree(
        &w,
        None,
        defaults,
        (Combine::Mean, json!("mean")),
        Display::default(),
        (2.0, Some(&named), "named baseline"),
    );
    assert!(
        with.iter().zip(&got).any(|(a, b)| a.feedback != b.feedback),
        "the named baseline changes values"
    );
}

#[test]
fn a_missing_roi_mean_costs_the_steps_recipe_that_volume_only() {
    let (mut means, motion, blocks) = world(120);
    let mut global = global_signal(120);
    // ROI 0 has no mean at volume 35 (a regulation volume) and the nuisance ROI none at 55.
    means[34][0] = f64::NAN;
    global[54] = f64::NAN;
    let steps = Steps {
        trend: true,
        task: true,
        motion: true,
        nuisance: true,
        despike: 3.0,
        smooth_s: 3.0,
        normalise: true,
        full_scale: 1.0,
    };
    let w = (means.clone(), motion.clone(), blocks.clone());
    let got = steps_agree(
        &w,
        Some(&global),
        steps.clone(),
        (Combine::Mean, json!("mean")),
        Display::default(),
        (2.0, None, "gaps"),
    );
    assert!(
        got[34].feedback.is_nan() && got[34].rois[0].percent.is_nan() && got[34].rois[1].percent.is_finite()
    );
    assert!(got[54].rois.iter().all(|r| r.percent.is_nan()));
    // Elsewhere the same as a run whose gaps were never there, but for what the fit saw.
    let later = got.iter().skip(56).filter(|v| v.feedback.is_finite()).count();
    assert_eq!(later, 120 - 56, "every later volume has a value");
}

#[test]
fn the_steps_recipe_names_a_wrong_nuisance_roi_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str| check_recipe(dir.path(), "steps", extra);
    let (status, out) = check("");
    assert!(status.success(), "{out}");
    let (status, out) = check("nuisance = \"wm\"\n");
    assert!(!status.success() && out.contains("feedback.nuisance") && out.contains("\"wm\""), "{out}");
    let (status, out) = check("nuisance = \"visual\"\n");
    assert!(!status.success() && out.contains("nuisance"), "{out}");
    let (status, out) = check("despike = -1\n");
    assert!(!status.success() && out.contains("feedback.despike"), "{out}");
    let (status, out) = check("baseline = \"rest\"\n");
    assert!(!status.success() && out.contains("feedback.baseline") && out.contains("\"rest\""), "{out}");
}

#[test]
fn the_live_steps_feedback_with_a_nuisance_roi_equals_the_offline_recipe_and_the_reference() {
    use mirage_rt::topic::{MotionHeader, RoiHeader};
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("s");
    let brain = dir.path().join("run/truth/brain_mask.nii.gz");
    let rois = format!(
        "glm.rois=[{{name = \"visual\", path = \"{}\"}}, {{name = \"brain\", path = \"{}\"}}]",
        dir.path().join("run/truth/roi_mask.nii.gz").display(),
        brain.display()
    );
    let recipe = [
        "--no-lsl",
        "--set",
        "feedback.recipe=\"steps\"",
        "--set",
        "feedback.nuisance=\"brain\"",
        "--set",
        "feedback.motion_regressors=true",
        "--set",
        "feedback.smooth_s=2.0",
        "--set",
        &rois,
    ];
    let (daemon, tr) = replay_with_feedback(dir.path(), &session, &recipe);
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    let roi = common::published_as::<RoiHeader>(&session);
    let mean = |r: &RoiHeader, k: usize| r.rois[k].mean.unwrap_or(f64::NAN);
    let means: Vec<Vec<f64>> = roi.iter().map(|r| vec![mean(r, 0)]).collect();
    let global: Vec<f64> = roi.iter().map(|r| mean(r, 1)).collect();
    let motion: Vec<[f64; 6]> =
        common::published_as::<MotionHeader>(&session).iter().map(|m| m.params()).collect();
    assert_eq!((roi.len(), motion.len()), (80, 80));
    let steps = Steps {
        trend: true,
        task: true,
        motion: true,
        nuisance: true,
        despike: 3.0,
        smooth_s: 2.0,
        normalise: true,
        full_scale: 1.0,
    };
    let blocks = vec![(11, 20), (31, 40), (51, 60), (71, 80)];
    let w = (means, motion, blocks);
    let offline = steps_agree(
        &w,
        Some(&global),
        steps,
        (Combine::Mean, json!("mean")),
        Display::default(),
        (tr, None, "live"),
    );
    for (r, o) in roi.iter().zip(&offline) {
        assert_eq!(r.feedback, Some(o.display).filter(|v| v.is_finite()), "volume {}", r.index);
        assert_eq!(r.rois[0].feedback, r.feedback, "volume {}", r.index);
        assert_eq!(r.rois[1].feedback, None, "the nuisance ROI has no feedback of its own");
    }
    let shown = roi.iter().filter(|r| r.feedback.is_some_and(|v| v > 0.0)).count();
    eprintln!("live steps feedback: {shown} of 80 volumes above 0");
    assert!(shown > 0);
}

#[test]
fn the_console_report_plots_every_feedback_value_and_the_last_one() {
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("s");
    let console = format!("127.0.0.1:{}", common::free_port());
    let extra = ["--no-lsl", "--set", "feedback.recipe=\"steps\"", "--console", &console];
    let (daemon, _) = replay_with_feedback(dir.path(), &session, &extra);
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    let roi = common::published_as::<mirage_rt::topic::RoiHeader>(&session);
    let values: Vec<f64> = roi.iter().filter_map(|r| r.feedback).collect();
    assert!(values.iter().any(|&v| v > 0.0), "{values:?}");
    let report = session.join("report.html");
    let (status, out) = common::run_with_timeout(
        common::python("console_check.py")
            .arg(format!("file://{}", report.display()))
            .args(["--report", "--no-decodes"]),
        Duration::from_secs(200),
    );
    assert!(status.success(), "console check (needs chromium: scripts/setup.sh --tests):\n{out}");
    let seen: Value = serde_json::from_str(out.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert_eq!(seen["after"]["feedback_points"], Value::from(values.len()), "{seen}");
    assert_eq!(seen["after"]["feedback_last"].as_f64(), values.last().copied(), "{seen}");
    // The value shown and the one recipe ROI's own.
    assert_eq!(seen["after"]["feedback_series"], 2, "{seen}");
}

#[test]
fn the_steps_defaults_are_the_recipe_the_feedback_worlds_chose() {
    // The rule of benches/benchmarks.py (`feedback_choice`) over the figures on record.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks/feedback_worlds.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let worlds = doc["results"].as_array().unwrap();
    let score = |label: &str| -> Option<f64> {
        let ok = worlds.iter().all(|w| {
            let s = &w["signals"][label];
            s["worst_in_regulation_min"].as_f64().unwrap() > -1.0
                && s["spike_change_max"].as_f64().unwrap_or(0.0) < 1.0
        });
        let corr: f64 = worlds.iter().map(|w| w["signals"][label]["corr"].as_f64().unwrap()).sum();
        ok.then_some(corr / worlds.len() as f64)
    };
    let chosen = doc["grid"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g.as_str())
        .filter_map(|g| score(g).map(|c| (g, c)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("a grid recipe meets the rule")
        .0;
    let sets = &doc["recipes"][chosen];
    let get = |key: &str| sets[key].as_str().unwrap_or_else(|| panic!("{chosen}: no {key}")).to_string();
    let d = mirage_rt::feedback::FeedbackConfig::default();
    eprintln!("the feedback worlds chose {chosen:?}");
    assert_eq!(get("feedback.smooth_s").parse::<f64>().unwrap(), d.smooth_s, "{chosen}");
    assert_eq!(get("feedback.despike").parse::<f64>().unwrap(), d.despike, "{chosen}");
    assert_eq!(get("feedback.trend").parse::<bool>().unwrap(), d.trend, "{chosen}");
    assert_eq!(get("feedback.motion_regressors").parse::<bool>().unwrap(), d.motion_regressors, "{chosen}");
    assert!(d.task_regressors && d.normalise && d.nuisance.is_none());
}

#[test]
fn steps_blocks_from_pylsl_markers_give_the_feedback_of_the_same_blocks_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let name = common::unique_name("mirage-blocks");
    let (live, again) = (dir.path().join("live"), dir.path().join("again"));
    let run = dir.path().join("run");
    common::run(
        common::mirage()
            .args(["simulate", "--seed", "5", "--shape", "32,32,20", "--volumes", "60", "--out"])
            .arg(&run),
    );
    let mask = run.join("truth/roi_mask.nii.gz");
    let rois = format!("glm.rois=[{{name = \"visual\", path = \"{}\"}}]", mask.display());
    let rois = rois.as_str();
    let ingest = format!("file://{}?speed=tr&tr=0.25&delay=2", run.join("bold.nii.gz").display());
    let daemon = common::Daemon::start(
        &[
            "--ingest",
            &ingest,
            "--publish",
            "none",
            "--no-lsl",
            "--quiet",
            "--record",
            live.to_str().unwrap(),
            "--set",
            &format!("glm.markers=\"lsl://{name}\""),
            "--set",
            rois,
            "--set",
            "feedback.recipe=\"steps\"",
            "--set",
            "feedback.markers=true",
            "--set",
            "feedback.volumes=60",
        ],
        dir.path(),
    );
    // A stimulus program announcing two regulation blocks (volumes 11-20 and 31-40), and one
    // past the planned 15 s run, as soon as the daemon listens.
    let then = "blocks = ['cond=regulation;onset=2.5;dur=2.5', 'cond=regulation;onset=7.5;dur=2.5', \
                'cond=regulation;onset=20;dur=5']\n\
                [o.push_sample([m]) for m in blocks]\n\
                time.sleep(20)\n";
    let mut program = common::marker_program(&name, then).spawn().unwrap();
    let (status, log) = daemon.wait(Duration::from_secs(120));
    let _ = program.kill();
    let _ = program.wait();
    assert!(status.success(), "{log}");
    let status = common::published(&live, "status");
    assert_eq!(status.last().expect("a status message")["errors"]["feedback_marker"], 1, "{log}");
    // The same volumes again, the blocks from a file.
    let protocol = dir.path().join("protocol.tsv");
    std::fs::write(&protocol, "onset\tduration\ttrial_type\n2.5\t2.5\tregulation\n7.5\t2.5\tregulation\n")
        .unwrap();
    let ingest = format!("file://{}?speed=max", live.display());
    let proto = format!("feedback.protocol=\"{}\"", protocol.display());
    let ingest = ingest.as_str();
    let (status, log) = common::Daemon::start(
        &[
            "--ingest",
            ingest,
            "--publish",
            "none",
            "--no-lsl",
            "--quiet",
            "--record",
            again.to_str().unwrap(),
            "--set",
            rois,
            "--set",
            "feedback.recipe=\"steps\"",
            "--set",
            &proto,
            "--set",
            "feedback.volumes=60",
        ],
        dir.path(),
    )
    .wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    let (a, b) = (
        common::published_as::<mirage_rt::topic::RoiHeader>(&live),
        common::published_as::<mirage_rt::topic::RoiHeader>(&again),
    );
    assert_eq!(a.len(), 60);
    let values = |r: &[mirage_rt::topic::RoiHeader]| r.iter().map(|r| r.feedback).collect::<Vec<_>>();
    assert_eq!(values(&a), values(&b));
    let shown: Vec<u64> =
        a.iter().filter(|r| r.feedback.is_some_and(|v| v != 0.0)).map(|r| r.index + 1).collect();
    assert!(
        !shown.is_empty() && shown.iter().all(|v| (11..=20).contains(v) || (31..=40).contains(v)),
        "{shown:?}"
    );
}
