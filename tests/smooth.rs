//! Spatial smoothing against scipy on real EPI, and the live stage against its offline twin.

use crate::common;

use std::time::Duration;

use common::{mirage, published_as, python, run, run_with_timeout, shared_data, Daemon};
use mirage_rt::io::nifti::read_nifti;

#[test]
fn smoothing_equals_scipys_gaussian_filter_on_real_epi() {
    let dir = tempfile::tempdir().unwrap();
    for (rel, fwhm) in [
        ("fslpy-example-func/example_func.nii.gz", "5"),
        ("nibabel-example4d/example4d.nii.gz", "8"),
        ("pyneal-testseries/testSeries.nii.gz", "6"),
    ] {
        let input = shared_data(rel);
        let out = dir.path().join("smoothed.nii.gz");
        run(mirage().arg("smooth").arg(&input).args(["--fwhm", fwhm, "--out"]).arg(&out));
        let (status, report) = run_with_timeout(
            python("smooth_check.py").arg(&input).arg(&out).arg(fwhm),
            Duration::from_secs(120),
        );
        assert!(status.success(), "{rel}: {report}");
        let line = report.lines().last().unwrap_or_default();
        let r: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {report}"));
        assert!(r["max_rel_diff"].as_f64().unwrap() < 1e-5, "{rel}: {r}");
    }
}

#[test]
fn the_live_stage_smooths_before_the_roi_and_costs_nothing_when_off() {
    let dir = tempfile::tempdir().unwrap();
    let series = shared_data("pyneal-testseries/testSeries.nii.gz");
    let mask = shared_data("pyneal-testseries/testSeries_mask.nii.gz");
    let smoothed = dir.path().join("smoothed.nii.gz");
    run(mirage().arg("smooth").arg(&series).args(["--fwhm", "6", "--out"]).arg(&smoothed));
    let offline = read_nifti(&smoothed, 1 << 24).unwrap();
    let roi = read_nifti(&mask, 1 << 24).unwrap();
    // Its values above 0 are weights, as the GLM takes them.
    let weights: Vec<(usize, f64)> = roi.volumes[0]
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0.0)
        .map(|(i, w)| (i, f64::from(*w)))
        .collect();
    let total: f64 = weights.iter().map(|(_, w)| w).sum();
    let daemon_run = |name: &str, sets: &[&str]| {
        let session = dir.path().join(name);
        let ingest = format!("file://{}?speed=max", series.display());
        let rois = format!("glm.rois=[{{name = \"roi\", path = \"{}\"}}]", mask.display());
        let mut args = vec!["--ingest", &ingest, "--publish", "none", "--no-lsl", "--quiet", "--record"];
        args.extend([session.to_str().unwrap(), "--set", "motion.enabled=false", "--set", &rois]);
        args.extend(sets.iter().flat_map(|s| ["--set", s]));
        let (status, log) = Daemon::start(&args, dir.path()).wait(Duration::from_secs(120));
        assert!(status.success(), "{log}");
        session
    };
    let on = daemon_run("on", &["smooth.enabled=true", "smooth.fwhm_mm=6"]);
    let readings = published_as::<mirage_rt::topic::RoiHeader>(&on);
    assert_eq!(readings.len(), offline.volumes.len());
    for (r, v) in readings.iter().zip(&offline.volumes) {
        let want = weights.iter().map(|&(i, w)| w * f64::from(v[i])).sum::<f64>() / total;
        let got = r.rois[0].mean.unwrap();
        assert!((got - want).abs() <= 1e-5 * want.abs(), "volume {}: live {got}, offline {want}", r.index);
    }
    let stages =
        |s: &std::path::Path| published_as::<mirage_rt::topic::StatusHeader>(s).pop().unwrap().stages;
    let with = stages(&on);
    let at = |name: &str| with.iter().position(|s| s == name);
    assert!(at("motion") < at("smooth") && at("smooth").map(|s| s + 1) == at("glm"), "{with:?}");
    let off = daemon_run("off", &[]);
    assert!(!stages(&off).contains(&"smooth".to_string()), "{:?}", stages(&off));
}
