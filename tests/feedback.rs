//! OpenNFT's continuous PSC, step by step, against the numpy re-implementation of its MATLAB
//! code (`tests/python/opennft_reference.py`, itself checked against OpenNFT's files in Octave),
//! fed the same ROI means and motion.

use crate::common;

use std::time::Duration;

use mirage_rt::feedback::opennft::{Combine, ContinuousPsc, Display, Protocol, VolumeSteps};
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

fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "NaN" => f64::NAN,
        v => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

/// The reference's steps for a run.
fn reference(
    means: &[Vec<f64>],
    motion: Option<&[[f64; 6]]>,
    blocks: &[(usize, usize)],
    operation: &str,
) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.json"), dir.path().join("out.json"));
    let mut options = json!({"roi_anat_operation": operation});
    if motion.is_none() {
        options["motion_missing"] = json!("omit");
    }
    let doc = json!({
        "tr": 2.0,
        "roi_means": means,
        "motion": motion,
        "blocks": {"regulation": blocks.iter().map(|b| [b.0, b.1]).collect::<Vec<_>>()},
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
    blocks: &[(usize, usize)],
    combine: Combine,
) -> Vec<VolumeSteps> {
    let protocol = Protocol::new(means.len(), 2000.0, blocks.to_vec()).unwrap();
    let mut psc = ContinuousPsc::new(protocol, means[0].len(), combine, Display::default(), motion.is_some());
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
fn continuous_psc_equals_the_opennft_reference_step_by_step() {
    let (means, motion, blocks) = world(120);
    let want = reference(&means, Some(&motion), &blocks, "mean(norm_percValues)");
    let got = ours(&means, Some(&motion), &blocks, Combine::Mean);
    agree(&got, &want, "mean, motion regressors");
    // Regulation volumes show values, and the NaN a missing baseline would give is absent.
    let shown = got.iter().filter(|v| v.display > 0.0).count();
    eprintln!("volumes with a value shown: {shown} of {}", got.len());
    assert!(shown > 10 && got.iter().all(|v| v.feedback.is_finite()));
    let want = reference(&means, None, &blocks, "norm_percValues(1)-norm_percValues(2)");
    agree(&ours(&means, None, &blocks, Combine::Difference(0, 1)), &want, "difference, no motion regressors");
    let want = reference(&means, Some(&motion), &blocks, "median(norm_percValues)");
    agree(&ours(&means, Some(&motion), &blocks, Combine::Median), &want, "median");
}
