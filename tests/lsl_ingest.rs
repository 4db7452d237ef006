//! lsl:// ingest against a real pylsl outlet, and the `mirage-feedback` outlet read by a real
//! pylsl inlet.

use crate::common;

use std::time::Duration;

use common::{free_port, python, run_with_timeout, unique_name, Daemon};

fn roundtrip(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sp = free_port();
    let name = unique_name(&format!("mirage-test-{format}"));
    let feedback = unique_name("mirage-feedback");
    let session = dir.path().join("s");
    let cfg = dir.path().join("cfg.toml");
    std::fs::write(&cfg, format!("[publish]\nlsl_feedback = \"{feedback}\"\n")).unwrap();
    let daemon = Daemon::start(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--ingest",
            &format!("lsl://{name}"),
            "--publish",
            &format!("tcp://127.0.0.1:{sp}"),
            "--record",
            session.to_str().unwrap(),
            "--stop-after",
            "12",
            "--quiet",
            // Transport checks: volumes must come out exactly as sent.
            "--set",
            "motion.enabled=false",
            "--set",
            "glm.enabled=false",
        ],
        dir.path(),
    );
    let (status, out) = run_with_timeout(
        python("lsl_roundtrip.py").args([
            "--name",
            &name,
            "--sub",
            &format!("tcp://127.0.0.1:{sp}"),
            "--feedback",
            &feedback,
            "--n",
            "12",
            "--format",
            format,
        ]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "python peer failed:\n{out}\ndaemon log:\n{}", daemon.log());
    let report: serde_json::Value = serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(report["received"], 12);
    assert_eq!(report["feedback_samples"], 12);
    // Feedback sample = [volume index, latency ms]: a real, positive latency.
    let first = report["feedback_first"].as_array().unwrap();
    assert_eq!(first[0], 0.0);
    assert!(first[1].as_f64().unwrap() > 0.0);
    let (status, log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(log.contains("received 12 recorded 12 published 12"), "{log}");
    assert!(log.contains("acquisition to publish"), "{log}");
}

#[test]
fn pylsl_float32_volumes_in_feedback_out() {
    roundtrip("float32");
}

#[test]
fn pylsl_int16_volumes_in_feedback_out() {
    roundtrip("int16");
}

#[test]
fn a_stock_pylsl_client_reads_the_feedback_outlets_layout_and_every_sample_from_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let feedback = unique_name("mirage-feedback");
    let cfg = dir.path().join("cfg.toml");
    std::fs::write(
        &cfg,
        format!(
            "[ingest]\nuri = \"sim://?volumes=16&shape=32,32,20&tr=2&speed=16\"\n[glm]\nmask = \"sim\"\n\
             rois = [{{ name = \"visual\", path = \"sim\" }}]\n[publish]\nlsl_feedback = \"{feedback}\"\nlsl_wait_s = 60\n"
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--publish",
            "none",
            "--record",
            "none",
            "--console",
            "none",
            "--quiet",
        ],
        dir.path(),
    );
    // The client starts after the daemon: the daemon waits for it before the first volume.
    daemon.wait_for_log("waiting up to 60 s for an LSL consumer", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let (status, out) = run_with_timeout(
        python("lsl_feedback_client.py").args([feedback.as_str(), "16"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "pylsl client failed:\n{out}\ndaemon log:\n{}", daemon.log());
    let line = out.lines().find(|l| l.starts_with("{\"channel_count\"")).expect(&out);
    let report: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(report["channel_count"], 3, "{report}");
    assert_eq!(report["nominal_srate"], 0.5, "the run's TR is 2 s: {report}");
    let channels = report["channels"].as_array().unwrap();
    let labels: Vec<&str> = channels.iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["volume_index", "latency_ms", "visual_psc"], "{report}");
    let units: Vec<&str> = channels.iter().map(|c| c["unit"].as_str().unwrap()).collect();
    assert_eq!(units, ["index", "milliseconds", "percent"], "{report}");
    assert!(channels.iter().all(|c| !c["type"].as_str().unwrap().is_empty()), "{report}");
    // No signal change before the fit has a baseline: NaN on the wire (null in the report).
    assert!(report["first"][2].is_null(), "{report}");
    // Nothing lost before the client connected.
    let indices: Vec<u64> =
        report["indices"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
    assert_eq!(indices, (0..16).collect::<Vec<u64>>(), "{report}");
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
}
