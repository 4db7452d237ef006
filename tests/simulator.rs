//! The simulator: same seed, same bytes; written truth consistent with the data (checked by
//! independent Python code); streamed runs identical to written ones over every transport.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{free_port, mirage, python, run_with_timeout, Daemon};
use mirage_rt::io::nifti::read_nifti;
use mirage_rt::io::session::SessionReader;

const SMALL: [&str; 6] = ["--volumes", "24", "--shape", "24,24,16", "--tr", "1"];

fn simulate(out: &Path, extra: &[&str]) {
    let (status, log) = run_with_timeout(
        mirage().arg("simulate").arg("--out").arg(out).args(SMALL).args(extra),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{log}");
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = walk(dir)
        .into_iter()
        .map(|p| (p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn same_seed_gives_the_same_bytes_and_another_seed_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    simulate(&a, &["--seed", "5"]);
    simulate(&b, &["--seed", "5"]);
    simulate(&c, &["--seed", "6"]);
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "bold.nii.gz",
        "events.tsv",
        "truth/truth.json",
        "truth/motion.tsv",
        "truth/motion_matrices.tsv",
        "truth/anatomy.nii.gz",
        "truth/roi_mask.nii.gz",
        "truth/trial_amplitudes.npy",
        "truth/stimuli_pictures.npy",
        "truth/stimuli_embeddings.npy",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_eq!(fa, fb);
    let bold = |f: &[(String, Vec<u8>)]| f.iter().find(|(n, _)| n == "bold.nii.gz").unwrap().1.clone();
    assert_ne!(bold(&fa), bold(&fc));
}

#[test]
fn truth_matches_the_data_by_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let signal = dir.path().join("signal");
    let motion = dir.path().join("motion");
    simulate(
        &signal,
        &["--set", "noise_pct=0", "--set", "drift_pct=0", "--set", "motion_mm=0", "--set", "motion_deg=0"],
    );
    simulate(
        &motion,
        &[
            "--set",
            "signal_pct=0",
            "--set",
            "noise_pct=0",
            "--set",
            "drift_pct=0",
            "--set",
            "motion_mm=2",
            "--set",
            "motion_deg=2",
        ],
    );
    for (d, mode) in [(&signal, "signal"), (&motion, "motion")] {
        let (status, out) =
            run_with_timeout(python("check_sim_truth.py").arg(d).arg(mode), Duration::from_secs(120));
        assert!(status.success(), "{mode}:\n{out}");
    }
}

#[test]
fn real_anatomy_las_grid_with_anisotropic_voxels() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("real");
    let anat = common::shared_data("fslpy-example-func/example_func.nii.gz");
    let (status, log) =
        run_with_timeout(
            mirage()
                .args(["simulate", "--volumes", "6", "--anatomy"])
                .arg(&anat)
                .arg("--out")
                .arg(&out)
                .args(["--set", "signal_pct=0", "--set", "noise_pct=0", "--set", "drift_pct=0"]),
            Duration::from_secs(60),
        );
    assert!(status.success(), "{log}");
    let src = read_nifti(&anat, 1 << 24).unwrap();
    let sim = read_nifti(out.join("bold.nii.gz"), 1 << 24).unwrap();
    assert_eq!(sim.dims, [64, 64, 21]);
    // Same orientation and voxel size (LAS, 4 x 4 x 6 mm), grid centred on the world origin.
    for r in 0..3 {
        for c in 0..3 {
            assert!(
                (sim.affine[r][c] - src.affine[r][c]).abs() < 1e-4,
                "{:?} vs {:?}",
                sim.affine,
                src.affine
            );
        }
    }
    assert!(sim.affine[0][0] < 0.0);
    let (status, out) =
        run_with_timeout(python("check_sim_truth.py").arg(&out).arg("motion"), Duration::from_secs(60));
    assert!(status.success(), "{out}");
}

fn stream_and_record(uri: &str, ingest: &str, extra_run: &[&str]) -> std::path::PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let session = dir.join("session");
    let daemon = Daemon::start(
        &[
            &[
                "--ingest",
                ingest,
                "--publish",
                "none",
                "--record",
                session.to_str().unwrap(),
                "--stop-after",
                "24",
                "--quiet",
            ],
            extra_run,
        ]
        .concat(),
        &dir,
    );
    let (status, log) = run_with_timeout(
        mirage().args(["simulate", "--stream", uri, "--speed", "20", "--seed", "9"]).args(SMALL),
        Duration::from_secs(120),
    );
    assert!(status.success(), "sender: {log}\ndaemon: {}", daemon.log());
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    session
}

fn assert_session_equals_written_run(session: &Path) {
    let dir = tempfile::tempdir().unwrap();
    simulate(&dir.path().join("ref"), &["--seed", "9"]);
    let img = read_nifti(dir.path().join("ref/bold.nii.gz"), 1 << 24).unwrap();
    let rec = SessionReader::open(session).unwrap();
    assert_eq!(rec.entries.len(), img.volumes.len());
    for (t, want) in img.volumes.iter().enumerate() {
        let v = rec.volume(t).unwrap();
        assert_eq!(v.index, t as u64);
        assert_eq!(&v.data, want, "volume {t}");
        assert_eq!(v.tr, Some(1.0));
        for r in 0..4 {
            for c in 0..4 {
                assert!((v.affine[r][c] - img.affine[r][c]).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn streamed_over_pyneal_equals_written() {
    let p = free_port();
    let s = stream_and_record(
        &format!("pyneal://127.0.0.1:{p}"),
        &format!("pyneal://127.0.0.1:{p}"),
        &["--no-lsl"],
    );
    assert_session_equals_written_run(&s);
}

#[test]
fn streamed_over_native_zmq_equals_written_with_acquisition_times() {
    let p = free_port();
    let s =
        stream_and_record(&format!("zmq://127.0.0.1:{p}"), &format!("zmq://127.0.0.1:{p}"), &["--no-lsl"]);
    assert_session_equals_written_run(&s);
    let rec = SessionReader::open(&s).unwrap();
    let acq: Vec<f64> = rec.entries.iter().map(|e| e.acq_time.unwrap()).collect();
    // Paced at 20x: one volume every 50 ms of the sender's clock.
    for w in acq.windows(2) {
        assert!((w[1] - w[0] - 0.05).abs() < 1e-6, "{acq:?}");
    }
}

#[test]
fn streamed_over_lsl_equals_written() {
    let name = common::unique_name("mirage-test-sim");
    let s = stream_and_record(&format!("lsl://{name}"), &format!("lsl://{name}"), &["--no-lsl"]);
    assert_session_equals_written_run(&s);
}
