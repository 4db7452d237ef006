//! The online GLM against outside references (NumPy least squares, nilearn, the simulator's
//! true amplitudes), the online stage against its offline twin, and live markers over LSL and
//! ZMQ.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{free_port, mirage, published, python, run_with_timeout, unique_name, Daemon};
use mirage_rt::io::nifti::read_nifti;

/// A simulated run without motion (the offline twin has no motion regressors) and its offline
/// fit over the true ROI.
fn simulated_run(dir: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let run = dir.join("run");
    let (status, log) = run_with_timeout(
        mirage()
            .args([
                "simulate",
                "--volumes",
                "120",
                "--shape",
                "32,32,20",
                "--seed",
                "3",
                "--set",
                "motion_mm=0",
                "--set",
                "motion_deg=0",
                "--out",
            ])
            .arg(&run),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{log}");
    let fit = dir.join("glm");
    let (status, log) = run_with_timeout(
        mirage()
            .arg("glm")
            .arg(run.join("bold.nii.gz"))
            .arg("--events")
            .arg(run.join("events.tsv"))
            .arg("--mask")
            .arg(run.join("truth/roi_mask.nii.gz"))
            .arg("--out")
            .arg(&fit)
            .args(extra),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{log}");
    (run, fit)
}

/// A daemon replaying simulated `run` as fast as it can (after a second for subscribers) into
/// the GLM with the run's events and ROI mask, publishing on `port` and recording `session`.
fn replay_daemon(run: &Path, session: &Path, port: u16, extra: &[&str], dir: &Path) -> Daemon {
    let ingest = format!("file://{}?speed=max&delay=1", run.join("bold.nii.gz").display());
    let publish = format!("tcp://127.0.0.1:{port}");
    let events = format!("glm.events=\"{}\"", run.join("events.tsv").display());
    let mask = format!("glm.mask=\"{}\"", run.join("truth/roi_mask.nii.gz").display());
    let mut args = vec!["--ingest", &ingest, "--publish", &publish, "--no-lsl", "--record"];
    args.extend([session.to_str().unwrap(), "--set", &events, "--set", &mask]);
    args.extend(extra);
    Daemon::start(&args, dir)
}

/// The regressor names of an offline fit (`design.tsv`'s header).
fn design_names(fit: &Path) -> Vec<String> {
    let design = std::fs::read_to_string(fit.join("design.tsv")).unwrap();
    design.lines().next().unwrap().split('\t').map(String::from).collect()
}

fn check(mode: &str, run: &Path, fit: &Path) -> serde_json::Value {
    let (status, out) = run_with_timeout(
        python("check_glm.py").arg(mode).arg(run).arg(fit).arg(run.join("truth/roi_mask.nii.gz")),
        Duration::from_secs(300),
    );
    assert!(status.success(), "{mode}:\n{out}");
    eprintln!("{mode}: {out}");
    serde_json::from_str(&out[out.find('{').unwrap()..out.rfind('}').unwrap() + 1]).unwrap()
}

#[test]
fn offline_fit_equals_numpy_lstsq_nilearn_and_recovers_the_true_amplitudes() {
    let dir = tempfile::tempdir().unwrap();
    let (run, fit) = simulated_run(dir.path(), &[]);
    assert!(check("numpy", &run, &fit)["max_rel_error"].as_f64().unwrap() <= 1e-4);
    assert!(check("nilearn", &run, &fit)["correlation_min"].as_f64().unwrap() >= 0.999);
    let truth = check("truth", &run, &fit);
    assert!(truth["correlation_all"].as_f64().unwrap() > 0.5, "{truth}");
}

#[test]
fn ar1_prewhitened_fit_equals_numpy_gls() {
    let dir = tempfile::tempdir().unwrap();
    let (run, fit) = simulated_run(dir.path(), &["--ar1"]);
    let r = check("ar1", &run, &fit);
    assert!(r["max_rel_error"].as_f64().unwrap() <= 1e-4, "{r}");
}

#[test]
fn online_betas_after_the_last_volume_equal_the_offline_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (run, fit) = simulated_run(dir.path(), &[]);
    let sp = free_port();
    let sub = common::Subscriber::connect(sp, "betas");
    let session = dir.path().join("s");
    let mask = run.join("truth/roi_mask.nii.gz");
    let rois = format!("glm.rois=[{{name = \"visual\", path = \"{}\"}}]", mask.display());
    let daemon =
        replay_daemon(&run, &session, sp, &["--set", "motion.enabled=false", "--set", &rois], dir.path());
    let events = std::fs::read_to_string(run.join("events.tsv")).unwrap().lines().count() - 1;
    // Each trial twice: when its window closes (if it does before the end) and at the end.
    let msgs = sub.collect(2 * events, Duration::from_secs(60));
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let finals: Vec<_> = msgs.iter().filter(|m| betas_header(m).trial.at_run_end).collect();
    assert_eq!(finals.len(), events, "{log}");
    let offline = read_nifti(fit.join("betas.nii.gz"), 1 << 24).unwrap();
    let names = design_names(&fit);
    for m in finals {
        let trial = betas_header(m).trial.trial;
        let col = names.iter().position(|n| *n == format!("trial_{trial:04}")).unwrap();
        let voxels = m.u32_payload("voxels").unwrap();
        let online = m.f32_payload("betas").unwrap();
        let scale = online.iter().fold(0f32, |a, b| a.max(b.abs()));
        for (v, b) in voxels.iter().zip(&online) {
            let want = offline.volumes[col][*v as usize];
            assert!((b - want).abs() <= 1e-5 * scale, "trial {trial} voxel {v}: online {b} offline {want}");
        }
    }
    // ROI feedback: one message per volume, percent signal change once estimable.
    let roi = published(&session, "roi");
    assert_eq!(roi.len(), 120);
    assert!(roi[60]["rois"][0]["psc"].as_f64().unwrap().abs() < 10.0);
    assert_eq!(published(&session, "betas").len(), msgs.len());
}

#[test]
fn zmq_markers_from_the_streaming_simulator_make_trial_betas() {
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
            "40",
            "--quiet",
        ],
        dir.path(),
    );
    let (status, log) = run_with_timeout(
        mirage().args([
            "simulate",
            "--stream",
            &format!("zmq://127.0.0.1:{port}"),
            "--speed",
            "40",
            "--volumes",
            "40",
            "--shape",
            "32,32,20",
            "--seed",
            "2",
        ]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{log}");
    assert!(log.contains("3 trial markers"), "{log}");
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let betas = published(&session, "betas");
    let trials: Vec<u64> =
        betas.iter().filter(|b| b["at_run_end"] == true).map(|b| b["trial"].as_u64().unwrap()).collect();
    assert_eq!(trials, vec![0, 1, 2], "{log}");
    assert!(betas.iter().any(|b| b["at_run_end"] == false && b["estimable"] == true));
}

#[test]
fn lsl_markers_from_pylsl_are_placed_on_the_scanner_clock() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("mirage-markers");
    let session = dir.path().join("s");
    let daemon = Daemon::start(
        &[
            "--ingest",
            "sim://?volumes=40&shape=32,32,20&tr=0.25&speed=tr&delay=2",
            "--publish",
            "none",
            "--no-lsl",
            "--record",
            session.to_str().unwrap(),
            "--quiet",
            "--set",
            &format!("glm.markers=\"lsl://{name}\""),
            "--set",
            "glm.trial_window_s=2",
        ],
        dir.path(),
    );
    // A stimulus program: two markers a little after the run starts, stamped now.
    let then = "time.sleep(3.0)\n\
                print('pushed', pylsl.local_clock(), flush=True)\n\
                o.push_sample(['trial=100;stim=1;cond=seen;dur=1'])\n\
                time.sleep(1.0)\n\
                o.push_sample(['trial=101;stim=2;cond=imagery;dur=1'])\n\
                o.push_sample(['trial=x'])\n\
                time.sleep(8)\n";
    let (status, out) = run_with_timeout(&mut common::marker_program(&name, then), Duration::from_secs(60));
    assert!(status.success(), "{out}");
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let betas = published(&session, "betas");
    let ours: Vec<&serde_json::Value> =
        betas.iter().filter(|b| b["trial"].as_u64().unwrap() >= 100 && b["at_run_end"] == true).collect();
    assert_eq!(ours.len(), 2, "{log}");
    // Marker 1 is stamped when pushed (the script printed that instant on the shared monotonic
    // clock), marker 2 a second later: their onsets on the scanner clock, from the run's start
    // as recorded, say so, however late the script got going.
    let pushed: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("pushed "))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let run_start = mirage_rt::io::session::SessionReader::open(&session).unwrap().run_start(0, None);
    let (o1, o2) = (ours[0]["onset"].as_f64().unwrap(), ours[1]["onset"].as_f64().unwrap());
    assert!((o1 - (pushed - run_start)).abs() < 0.05, "{o1} against {}", pushed - run_start);
    assert!((o2 - o1 - 1.0).abs() < 0.3, "{o1} {o2}");
    let status = published(&session, "status");
    assert_eq!(status.last().expect("a status message")["errors"]["bad_marker"], 1);
}

#[test]
fn offline_glm_with_the_motion_parameters_reproduces_the_live_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A run with head motion: the live GLM has the six parameters as nuisance regressors.
    let run = d.join("run");
    let (status, log) = run_with_timeout(
        mirage()
            .args(["simulate", "--volumes", "100", "--shape", "32,32,20", "--seed", "5", "--out"])
            .arg(&run),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{log}");
    let mask = run.join("truth/roi_mask.nii.gz");
    let session = d.join("s");
    let sp = free_port();
    let sub = common::Subscriber::connect(sp, "betas");
    let daemon = replay_daemon(&run, &session, sp, &["--quiet"], d);
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    let betas = sub.collect(published(&session, "betas").len(), Duration::from_secs(30));
    let finals: Vec<_> = betas.iter().filter(|b| betas_header(b).trial.at_run_end).collect();
    assert!(finals.len() >= 4, "{log}");
    // Offline: realign, then fit the realigned series with its parameters.
    let (realigned, params) = (d.join("realigned.nii.gz"), d.join("params.tsv"));
    let (status, log) = run_with_timeout(
        mirage()
            .arg("realign")
            .arg(run.join("bold.nii.gz"))
            .arg("--out")
            .arg(&realigned)
            .arg("--params")
            .arg(&params),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{log}");
    let fit = |out: &Path, motion: bool| {
        let mut cmd = mirage();
        cmd.arg("glm").arg(&realigned).arg("--events").arg(run.join("events.tsv")).arg("--mask").arg(&mask);
        cmd.arg("--out").arg(out);
        if motion {
            cmd.arg("--motion").arg(&params);
        }
        let (status, log) = run_with_timeout(&mut cmd, Duration::from_secs(120));
        assert!(status.success(), "{log}");
        (design_names(out), read_nifti(out.join("betas.nii.gz"), 1 << 24).unwrap())
    };
    let (names, with_motion) = fit(&d.join("glm-motion"), true);
    assert!(names.iter().any(|n| n.contains("trans_x")), "{names:?}");
    let (names_plain, without) = fit(&d.join("glm-plain"), false);
    // Relative error of each trial's live end-of-run betas against an offline fit.
    let worst = |names: &[String], offline: &mirage_rt::io::nifti::NiftiImage| {
        let mut worst = 0f64;
        for b in &finals {
            let trial = betas_header(b).trial.trial;
            let col = names.iter().position(|n| *n == format!("trial_{trial:04}")).unwrap();
            let (voxels, live) = (b.u32_payload("voxels").unwrap(), b.f32_payload("betas").unwrap());
            let scale = live.iter().fold(0f64, |a, x| a.max(x.abs() as f64));
            for (v, x) in voxels.iter().zip(&live) {
                worst = worst.max((*x as f64 - offline.volumes[col][*v as usize] as f64).abs() / scale);
            }
        }
        worst
    };
    let e_motion = worst(&names, &with_motion);
    let e_plain = worst(&names_plain, &without);
    eprintln!("live vs offline, relative: with --motion {e_motion:.2e}, without {e_plain:.2e}");
    assert!(e_motion <= 1e-4, "with --motion: {e_motion}");
    assert!(e_plain > 10.0 * e_motion.max(1e-6), "without --motion the fit should differ: {e_plain}");
}

/// A received `betas` message's header, read as its type.
fn betas_header(m: &mirage_rt::message::Received) -> mirage_rt::topic::BetasHeader {
    mirage_rt::topic::read(&m.topic, &m.header).unwrap_or_else(|e| panic!("{e}"))
}

/// Streams simulated `run` to a pyneal receiver on `port` as pyneal-scanner does (C-order
/// buffers, one reply per volume), with a copy of volume `at` sent as index `stray` right after
/// it; returns the receiver's replies.
fn send_over_pyneal(run: &Path, port: u16, stray: Option<(u64, u64)>) -> Vec<String> {
    let img = read_nifti(run.join("bold.nii.gz"), 1 << 24).unwrap();
    let [nx, ny, nz] = img.dims;
    let affine = serde_json::to_string(&img.affine).unwrap();
    let tr = img.header.tr_seconds().unwrap();
    let ctx = zmq::Context::new();
    let s = common::pyneal_socket(&ctx, port);
    common::pyneal_hello(&s);
    let mut replies = Vec::new();
    let mut send = |index: u64, v: &[f32]| {
        let mut c_order = vec![0f32; v.len()];
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    c_order[(i * ny + j) * nz + k] = v[i + nx * (j + ny * k)];
                }
            }
        }
        let header = serde_json::json!({"volIdx": index, "dtype": "float32", "shape": [nx, ny, nz],
            "affine": affine, "TR": tr.to_string()});
        let payload: Vec<u8> = c_order.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.send_multipart([header.to_string().into_bytes(), payload], 0).unwrap();
        replies.push(s.recv_string(0).unwrap().unwrap());
    };
    for (i, v) in img.volumes.iter().enumerate() {
        send(i as u64, v);
        if let Some((at, index)) = stray.filter(|(at, _)| *at == i as u64) {
            send(index, &img.volumes[at as usize]);
        }
    }
    replies
}

/// A run's recorded `betas` messages: each header and its `betas` payload's bytes.
type RecordedBetas = Vec<(mirage_rt::topic::BetasHeader, Vec<u8>)>;

/// One pyneal run of simulated `run` through the live GLM, with an optional stray index: the
/// recorded `betas` messages (header, betas payload), the receiver's replies and the last status.
fn pyneal_glm_run(
    run: &Path,
    dir: &Path,
    name: &str,
    stray: Option<(u64, u64)>,
) -> (RecordedBetas, Vec<String>, serde_json::Value) {
    use mirage_rt::io::session::{read_messages, read_payload};
    let pp = free_port();
    let session = dir.join(name);
    let events = format!("glm.events=\"{}\"", run.join("events.tsv").display());
    let mask = format!("glm.mask=\"{}\"", run.join("truth/roi_mask.nii.gz").display());
    let extra = ["--set", "motion.enabled=false", "--set", &events, "--set", &mask, "--stop-after", "120"];
    let args = common::pyneal_daemon_args(pp, "none", &session, &extra);
    let daemon = Daemon::start(&common::as_strs(&args), dir);
    let replies = send_over_pyneal(run, pp, stray);
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let betas = read_messages(&session)
        .unwrap()
        .into_iter()
        .filter(|m| m.topic == "betas")
        .map(|m| {
            let header = mirage_rt::topic::read(&m.topic, &m.header).unwrap();
            (header, read_payload(&session, &m, "betas").unwrap().unwrap())
        })
        .collect();
    (betas, replies, published(&session, "status").pop().unwrap())
}

#[test]
fn one_stray_volume_index_costs_one_volume_not_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (run, _) = simulated_run(dir.path(), &[]);
    let (clean, _, clean_status) = pyneal_glm_run(&run, dir.path(), "clean", None);
    for stray in [1000, 1 << 63] {
        let (betas, replies, status) =
            pyneal_glm_run(&run, dir.path(), &format!("stray-{stray}"), Some((19, stray)));
        assert!(replies[20].starts_with(&format!("error volIdx {stray}")), "{}", replies[20]);
        assert!(
            replies.iter().enumerate().all(|(k, r)| k == 20 || r.starts_with("received volIdx")),
            "{replies:?}"
        );
        assert_eq!(
            (status["errors"]["implausible_index"].as_u64(), status["missing"].as_u64()),
            (Some(1), Some(0))
        );
        assert_eq!(status["published"], clean_status["published"], "{status}");
        // Every trial closes where it did without the stray, estimable as it was, with the same betas.
        assert_eq!(betas.len(), clean.len());
        for ((ha, a), (hb, b)) in clean.iter().zip(&betas) {
            assert_eq!(
                (ha.index, ha.trial.estimable, ha.trial.n_volumes),
                (hb.index, hb.trial.estimable, hb.trial.n_volumes)
            );
            assert!(a == b, "trial {}: betas differ", ha.trial.trial);
        }
    }
    let live: Vec<_> = clean.iter().filter(|(h, _)| !h.trial.at_run_end).collect();
    assert!(!live.is_empty() && live.iter().all(|(h, _)| h.trial.estimable));
}

#[test]
fn a_mask_or_roi_on_another_grid_stops_check_and_run_naming_the_file_and_both_grids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sim = d.join("run");
    common::run(
        mirage().args(["simulate", "--seed", "3", "--shape", "16,16,8", "--volumes", "6", "--out"]).arg(&sim),
    );
    let roi = sim.join("truth/roi_mask.nii.gz");
    // The same mask shifted 2 mm (same dimensions, another place) and cropped (another grid).
    let script = format!(
        "import nibabel as nib, numpy as np\n\
         m = nib.load('{}')\n\
         a = m.affine.copy(); a[0, 3] += 2.0\n\
         nib.save(nib.Nifti1Image(np.asanyarray(m.dataobj), a), '{}/shifted.nii.gz')\n\
         nib.save(nib.Nifti1Image(np.asanyarray(m.dataobj)[:12], m.affine), '{}/cropped.nii.gz')\n",
        roi.display(),
        d.display(),
        d.display()
    );
    let (status, out) = run_with_timeout(
        std::process::Command::new("python3").arg("-c").arg(&script),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{out}");
    let ingest = format!("file://{}?speed=max", sim.join("bold.nii.gz").display());
    let config = |mask: &Path| {
        let path = d.join("run.toml");
        let text = format!(
            "[ingest]\nuri = \"{ingest}\"\n[glm]\nrois = [{{name = \"v1\", path = \"{}\"}}]\n",
            mask.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    for (file, grid) in [("shifted.nii.gz", "16x16x8"), ("cropped.nii.gz", "12x16x8")] {
        let cfg = config(&d.join(file));
        for cmd in ["check", "run"] {
            let mut c = mirage();
            c.args([cmd, "--config"]).arg(&cfg);
            if cmd == "run" {
                c.args(["--no-lsl", "--quiet", "--publish", "none", "--record", "none"]);
            }
            let (status, out) = run_with_timeout(c.current_dir(d), Duration::from_secs(60));
            assert_eq!(status.code(), Some(2), "{cmd} with {file}: {out}");
            assert!(
                out.contains(file)
                    && out.contains(&format!("its grid {grid} at"))
                    && out.contains("the volumes' 16x16x8 at"),
                "{cmd} with {file}: {out}"
            );
        }
    }
    // The mask on the volumes' own grid passes.
    let cfg = config(&roi);
    let (status, out) =
        run_with_timeout(mirage().arg("check").arg("--config").arg(&cfg), Duration::from_secs(60));
    assert!(status.success(), "{out}");
}
