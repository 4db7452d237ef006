//! Online realignment against the simulator's exact motion on real anatomy, the offline twin
//! (`mirage realign`) against the online stage, and exact cases.

use crate::common;

use std::time::Duration;

use common::{free_port, mirage, published, run_with_timeout, Daemon};
use mirage_rt::motion::rigid::{mean_displacement, RigidParams};
use mirage_rt::motion::{MotionConfig, MotionCorrector};
use mirage_rt::sim::{SimConfig, Simulator};
use mirage_rt::topic::{MotionHeader, VolumeHeader};
use mirage_rt::volume::IDENTITY_AFFINE;

/// The accuracy protocol: a real EPI (FSL's example_func) as anatomy, random rigid motion up
/// to ±3 mm / ±3° per volume, Gaussian noise at SNR 50, no signal or drift.
fn protocol(extra: &[(&str, &str)]) -> SimConfig {
    let mut cfg = SimConfig::default();
    let anat = common::shared_data("fslpy-example-func/example_func.nii.gz");
    for (k, v) in [
        ("anatomy", anat.to_str().unwrap()),
        ("volumes", "21"),
        ("motion_kind", "random"),
        ("motion_mm", "3"),
        ("motion_deg", "3"),
        ("noise_pct", "2"),
        ("ar1", "0"),
        ("drift_pct", "0"),
        ("signal_pct", "0"),
    ]
    .iter()
    .chain(extra)
    {
        cfg.set(k, v).unwrap();
    }
    cfg
}

/// Mean displacement error (mm) over the reference brain of each moved volume.
fn errors(cfg: &SimConfig) -> Vec<f64> {
    let mut sim = Simulator::new(cfg).unwrap();
    let truth: Vec<RigidParams> = sim.motion().to_vec();
    let mut mc = MotionCorrector::new(&MotionConfig::default()).unwrap();
    let mut out = Vec::new();
    while let Some(v) = sim.next_volume() {
        let r = mc.process(&v, v.index == 0).unwrap().expect("volume 0 is the reference");
        if v.index == 0 {
            assert_eq!(r.estimate.matrix, IDENTITY_AFFINE);
            continue;
        }
        let brain = &mc.reference().unwrap().brain;
        out.push(mean_displacement(&r.estimate.matrix, &truth[v.index as usize].matrix(), brain));
    }
    out
}

fn check(errs: &[f64], label: &str, mean_limit: f64, max_limit: f64) {
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    let max = errs.iter().cloned().fold(0.0, f64::max);
    eprintln!("{label}: mean displacement error {mean:.4} mm, max {max:.4} mm over {} volumes", errs.len());
    assert!(mean <= mean_limit, "{label}: mean {mean} mm");
    assert!(max <= max_limit, "{label}: max {max} mm: {errs:?}");
}

#[test]
fn random_motion_on_real_anatomy_at_3mm_meets_the_accuracy_target() {
    for seed in ["1", "2"] {
        let errs = errors(&protocol(&[("shape", "64,64,36"), ("voxel_mm", "3,3,3"), ("seed", seed)]));
        check(&errs, &format!("64x64x36 @ 3 mm, seed {seed}"), 0.03, 0.1);
    }
}

#[test]
fn random_motion_on_real_anatomy_with_anisotropic_las_voxels() {
    // example_func's own grid: 64 x 64 x 21 at 4 x 4 x 6 mm, LAS.
    check(&errors(&protocol(&[("seed", "3")])), "64x64x21 @ 4x4x6 mm LAS", 0.05, 0.1);
}

#[test]
fn a_still_head_is_identity_and_a_whole_voxel_shift_is_exact() {
    let mut cfg = SimConfig::default();
    for (k, v) in
        [("volumes", "1"), ("noise_pct", "0"), ("drift_pct", "0"), ("motion_mm", "0"), ("motion_deg", "0")]
    {
        cfg.set(k, v).unwrap();
    }
    let mut sim = Simulator::new(&cfg).unwrap();
    let reference = sim.next_volume().unwrap();
    let mut mc = MotionCorrector::new(&MotionConfig::default()).unwrap();
    mc.process(&reference, true).unwrap().unwrap();
    // The same volume again: identity.
    let mut again = reference.clone();
    again.index = 1;
    let est = mc.process(&again, false).unwrap().unwrap().estimate;
    let brain = mc.reference().unwrap().brain.clone();
    assert!(mean_displacement(&est.matrix, &IDENTITY_AFFINE, &brain) < 1e-4, "{:?}", est.params);
    // The head one voxel (3 mm) further along +x: the acquisition window of the padded head
    // taken one voxel back.
    let head = &sim.anatomy().head;
    let dims = reference.dims;
    let mut shifted = reference.clone();
    shifted.index = 2;
    for v in 0..shifted.data.len() {
        let (i, j, k) = (v % dims[0], (v / dims[0]) % dims[1], v / (dims[0] * dims[1]));
        let [oi, oj, ok] = head.offset;
        shifted.data[v] = head.image[(i + oi - 1) + head.dims[0] * ((j + oj) + head.dims[1] * (k + ok))];
    }
    let est = mc.process(&shifted, false).unwrap().unwrap().estimate;
    let truth = RigidParams { trans: [3.0, 0.0, 0.0], rot: [0.0; 3] }.matrix();
    let err = mean_displacement(&est.matrix, &truth, &brain);
    assert!(err < 1e-3, "whole-voxel shift off by {err} mm: {:?}", est.params);
}

#[test]
fn online_stage_and_offline_realign_give_identical_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (status, log) = run_with_timeout(
        mirage()
            .args([
                "simulate",
                "--volumes",
                "12",
                "--shape",
                "40,40,24",
                "--seed",
                "4",
                "--set",
                "motion_mm=1",
                "--out",
            ])
            .arg(&run),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{log}");
    let bold = run.join("bold.nii.gz");
    let (params, matrices, out) =
        (dir.path().join("p.tsv"), dir.path().join("m.tsv"), dir.path().join("r.nii.gz"));
    let (status, log) = run_with_timeout(
        mirage()
            .arg("realign")
            .arg(&bold)
            .arg("--params")
            .arg(&params)
            .arg("--matrices")
            .arg(&matrices)
            .arg("--out")
            .arg(&out),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{log}");
    let session = dir.path().join("s");
    let daemon = Daemon::start(
        &[
            "--ingest",
            &format!("file://{}?speed=max", bold.display()),
            "--publish",
            "none",
            "--no-lsl",
            "--record",
            session.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let online = published(&session, "motion");
    let table = std::fs::read_to_string(&params).unwrap();
    let mut rows = table.lines();
    assert_eq!(
        rows.next().unwrap(),
        "trans_x\ttrans_y\ttrans_z\trot_x\trot_y\trot_z\tframewise_displacement"
    );
    let rows: Vec<Vec<f64>> = rows.map(|r| r.split('\t').map(|x| x.parse().unwrap()).collect()).collect();
    assert_eq!(rows.len(), 12);
    assert_eq!(online.len(), 12);
    let names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement"];
    for (t, (row, msg)) in rows.iter().zip(&online).enumerate() {
        assert_eq!(msg["index"], t as u64);
        for (c, name) in names.iter().enumerate() {
            let on = msg[name].as_f64().unwrap();
            assert!((row[c] - on).abs() < 1e-9, "volume {t} {name}: offline {} online {on}", row[c]);
        }
    }
    // Matrices: 12 numbers per row, the top of each online matrix.
    for (line, msg) in std::fs::read_to_string(&matrices).unwrap().lines().zip(&online) {
        let nums: Vec<f64> = line.split('\t').map(|x| x.parse().unwrap()).collect();
        let m: [[f64; 4]; 4] = serde_json::from_value(msg["matrix"].clone()).unwrap();
        assert_eq!(nums.len(), 12);
        for (i, n) in nums.iter().enumerate() {
            assert!((n - m[i / 4][i % 4]).abs() < 1e-11);
        }
    }
    // The true motion is recovered by both.
    let truth: Vec<Vec<f64>> = std::fs::read_to_string(run.join("truth/motion.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|r| r.split('\t').map(|x| x.parse().unwrap()).collect())
        .collect();
    for (t, (row, want)) in rows.iter().zip(&truth).enumerate() {
        for c in 0..3 {
            assert!((row[c] - want[c]).abs() < 0.05, "volume {t} axis {c}: {} vs {}", row[c], want[c]);
        }
    }
    assert_eq!(mirage_rt::io::nifti::read_nifti(&out, 1 << 24).unwrap().volumes.len(), 12);
}

#[test]
fn the_daemon_publishes_motion_and_survives_a_volume_it_cannot_realign() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let session = dir.path().join("s");
    let daemon = Daemon::start(
        &[
            "--ingest",
            &format!("zmq://127.0.0.1:{port}"),
            "--publish",
            "none",
            "--no-lsl",
            "--record",
            session.to_str().unwrap(),
            "--stop-after",
            "4",
            "--quiet",
        ],
        dir.path(),
    );
    // Three simulated volumes with motion, and a constant one between them.
    let mut cfg = SimConfig::default();
    for (k, v) in [
        ("volumes", "3"),
        ("shape", "32,32,20"),
        ("voxel_mm", "6,6,6"),
        ("motion_mm", "2"),
        ("noise_pct", "0"),
    ] {
        cfg.set(k, v).unwrap();
    }
    let mut sim = Simulator::new(&cfg).unwrap();
    let truth = sim.motion().to_vec();
    let ctx = zmq::Context::new();
    let push = ctx.socket(zmq::PUSH).unwrap();
    push.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let send = |v: &mirage_rt::volume::Volume| {
        let (h, d) = mirage_rt::ingest::wire::encode_volume(v, mirage_rt::ingest::wire::Dialect::Native);
        push.send_multipart([h.into_bytes(), d], 0).unwrap();
    };
    let v0 = sim.next_volume().unwrap();
    send(&v0);
    let mut flat = v0.clone();
    flat.index = 1;
    flat.data.fill(100.0);
    send(&flat);
    for _ in 0..2 {
        let mut v = sim.next_volume().unwrap();
        v.index += 1;
        send(&v);
    }
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let motion = common::published_as::<MotionHeader>(&session);
    let indices: Vec<u64> = motion.iter().map(|h| h.index).collect();
    assert_eq!(indices, vec![0, 2, 3]);
    for h in &motion[1..] {
        let t = h.index as usize - 1;
        assert!((h.trans_x - truth[t].trans[0]).abs() < 0.05, "{h:?}");
        assert!(h.converged);
    }
    let volumes = common::published_as::<VolumeHeader>(&session);
    assert_eq!(volumes.len(), 4, "every volume is published, realigned or not");
    assert!(volumes[1].stage_errors[0].contains("constant"), "{:?}", volumes[1]);
    let status = published(&session, "status").pop().expect("a status message");
    assert_eq!(status["errors"]["motion_degenerate"], 1);
}
