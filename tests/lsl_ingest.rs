//! lsl:// ingest against a real pylsl outlet, and the `mirage-feedback` outlet read by a real
//! pylsl inlet.

mod common;

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
