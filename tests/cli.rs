//! What a user meets at the command line: one-line errors that say what to fix, exit code 2,
//! and a run on the simulator that records and summarises.

use crate::common;

use std::time::Duration;

use common::{mirage, run_with_timeout};
use mirage_rt::io::session::SessionReader;

#[test]
fn bad_uris_and_configs_get_a_clear_error_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad_cfg = dir.path().join("bad.toml");
    std::fs::write(&bad_cfg, "[ingest]\nurl = \"sim://\"\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["run".into(), "--ingest".into(), "ftp://x".into()], "unknown ingest scheme"),
        (vec!["run".into(), "--ingest".into(), "pyneal://scanner:5555".into()], "must be an IP address"),
        (vec!["run".into(), "--ingest".into(), "sim://?volumes=lots".into()], "volumes"),
        (
            vec![
                "run".into(),
                "--publish".into(),
                "udp://1.2.3.4:5".into(),
                "--ingest".into(),
                "sim://".into(),
            ],
            "publish.uri",
        ),
        (vec!["run".into(), "--config".into(), bad_cfg.display().to_string()], "unknown field `url`"),
        (vec!["run".into(), "--ingest".into(), "file:///no/such.nii.gz".into()], "does not exist"),
        (vec!["check".into(), "--config".into(), bad_cfg.display().to_string()], "url"),
    ];
    for (args, hint) in cases {
        let (status, out) = run_with_timeout(mirage().args(&args), Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{args:?}: {out}");
        assert!(out.contains(hint), "{args:?}: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
}

#[test]
fn simulator_run_records_everything_and_prints_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("session");
    let (status, out) = run_with_timeout(
        mirage().env("MIRAGE_CACHE_DIR", dir.path().join("cache")).args([
            "run",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.toml"),
            "--ingest",
            "sim://?volumes=20&shape=32,32,20&speed=max",
            "--publish",
            "none",
            "--no-lsl",
            "--console",
            "none",
            "--record",
            session.to_str().unwrap(),
        ]),
        Duration::from_secs(180),
    );
    assert!(status.success(), "{out}");
    // A row per latency key of the path (the status names them) and end to end.
    let status = common::published_as::<mirage_rt::topic::StatusHeader>(&session).pop().expect("a status");
    assert!(status.stages.len() >= 5, "{:?}", status.stages);
    for stage in status.stages.iter().map(String::as_str).chain(["end to end"]) {
        assert!(out.lines().any(|l| l.starts_with(stage)), "no {stage} row:\n{out}");
    }
    assert!(out.contains("received 20 recorded 20 published 20"), "{out}");
    let rec = SessionReader::open(&session).unwrap();
    assert_eq!(rec.entries.len(), 20);
    assert_eq!(rec.meta["ingest"], "sim://?volumes=20&shape=32,32,20&speed=max");
    // A session folder is never overwritten.
    let (status, out) = run_with_timeout(
        mirage()
            .args(["run", "--ingest", "sim://?volumes=2", "--publish", "none", "--no-lsl", "--record"])
            .arg(&session),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(2));
    assert!(out.contains("not empty"), "{out}");
}

#[test]
fn sigterm_and_sigint_drain_and_print_the_summary() {
    for signal in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let session = dir.path().join("s");
        let daemon = common::Daemon::start(
            &[
                "--ingest",
                "sim://?volumes=1000&shape=24,24,16&tr=0.05",
                "--publish",
                "none",
                "--no-lsl",
                "--record",
                session.to_str().unwrap(),
            ],
            dir.path(),
        );
        std::thread::sleep(Duration::from_secs(2));
        daemon.signal(signal);
        let (status, log) = daemon.wait(Duration::from_secs(30));
        assert!(status.success(), "SIG{signal}: {log}");
        assert!(log.contains("stopped by signal"), "SIG{signal}: {log}");
        let rec = SessionReader::open(&session).unwrap();
        assert!(!rec.entries.is_empty() && rec.entries.len() < 1000);
        let published = log.lines().find(|l| l.starts_with("volumes:")).unwrap();
        assert!(published.contains(&format!("recorded {}", rec.entries.len())), "SIG{signal}: {published}");
    }
}

#[test]
fn a_config_runs_from_another_folder_with_its_inputs_read_from_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A simulated series with its events and mask, beside a config that names them relatively.
    let study = d.join("study");
    let sim = study.join("data");
    let (status, out) = run_with_timeout(
        mirage()
            .args(["simulate", "--seed", "3", "--shape", "24,24,16", "--volumes", "30", "--out"])
            .arg(&sim),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{out}");
    let config = study.join("run.toml");
    std::fs::write(
        &config,
        r#"[ingest]
uri = "file://data/bold.nii.gz?speed=max"
[glm]
events = "data/events.tsv"
mask = "data/truth/roi_mask.nii.gz"
rois = [{ name = "visual", path = "data/truth/roi_mask.nii.gz" }]
"#,
    )
    .unwrap();
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let (status, out) = run_with_timeout(
        mirage().current_dir(&elsewhere).arg("check").arg("--config").arg(&config),
        Duration::from_secs(30),
    );
    assert!(status.success(), "{out}");
    let (status, out) = run_with_timeout(
        mirage()
            .current_dir(&elsewhere)
            .args(["run", "--no-lsl", "--console", "none", "--publish", "none", "--record", "s", "--config"])
            .arg(&config),
        Duration::from_secs(180),
    );
    assert!(status.success(), "{out}");
    assert!(out.contains("received 30 recorded 30 published 30"), "{out}");
    // Outputs stay where the command runs.
    assert_eq!(SessionReader::open(&elsewhere.join("s")).unwrap().entries.len(), 30);
    // The shipped config, too, checks from any folder.
    let (status, out) = run_with_timeout(
        mirage().current_dir(&elsewhere).args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.toml"),
        ]),
        Duration::from_secs(30),
    );
    assert!(status.success(), "{out}");
}

#[test]
fn none_turns_off_every_listener_in_a_file_as_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("off.toml");
    std::fs::write(
        &cfg,
        "[ingest]\nuri = \"sim://?volumes=3&shape=16,16,8&speed=max\"\n[console]\nlisten = \"none\"\n\
         [publish]\nuri = \"none\"\nresults = \"none\"\nmetrics = \"none\"\nlsl_feedback = \"none\"\n",
    )
    .unwrap();
    let (status, out) =
        run_with_timeout(mirage().arg("check").arg("--config").arg(&cfg), Duration::from_secs(30));
    assert!(status.success(), "{out}");
    let (status, out) = run_with_timeout(
        mirage().args(["run", "--quiet", "--record", "s", "--config"]).arg(&cfg).current_dir(dir.path()),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{out}");
}
