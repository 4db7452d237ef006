//! `mirage export`: a recorded session as BIDS, judged by the official BIDS validator (npm
//! `bids-validator`, installed by `scripts/setup.sh --tests`) and by nibabel against the
//! session it came from.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{python, run, run_with_timeout};

/// The validator `scripts/setup.sh --tests` installs (or `$MIRAGE_BIDS_VALIDATOR`).
fn bids_validator() -> PathBuf {
    std::env::var_os("MIRAGE_BIDS_VALIDATOR").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bids-validator/node_modules/.bin/bids-validator")
    })
}

/// The validator's errors and warnings on `dir` (their keys), failing if it cannot run.
fn validate(dir: &Path) -> (Vec<String>, Vec<String>) {
    let validator = bids_validator();
    assert!(validator.exists(), "{} missing: run scripts/setup.sh --tests", validator.display());
    let mut cmd = std::process::Command::new(&validator);
    cmd.arg(dir).arg("--json");
    let (_, out) = run_with_timeout(&mut cmd, Duration::from_secs(300));
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON from the validator:\n{out}"));
    let report: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("validator output:\n{out}"));
    let keys = |kind: &str| -> Vec<String> {
        report["issues"][kind]
            .as_array()
            .map(|a| a.iter().map(|i| format!("{}: {}", i["key"], i["reason"])).collect())
            .unwrap_or_default()
    };
    (keys("errors"), keys("warnings"))
}

#[test]
fn a_simulated_session_exports_as_valid_bids_equal_to_what_was_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("session");
    let mut daemon = common::mirage();
    daemon.args(["run", "--ingest", "sim://?volumes=48&shape=16,16,10&speed=max", "--publish", "none"]);
    daemon.args(["--no-lsl", "--quiet", "--console", "none", "--record"]).arg(&session);
    run(daemon.current_dir(dir.path()));

    let bids = dir.path().join("bids");
    let export = |extra: &[&str]| {
        let mut c = common::mirage();
        c.arg("export").arg(&session).arg("--bids").arg(&bids).args(["--subject", "01", "--task", "imagery"]);
        c.args(extra);
        c
    };
    let out = run(&mut export(&[]));
    assert!(out.contains("-> run-1: 48 volumes"), "{out}");

    let (errors, warnings) = validate(&bids);
    assert!(errors.is_empty(), "BIDS validator errors: {errors:#?}\nwarnings: {warnings:#?}");
    eprintln!("BIDS validator: 0 errors, warnings: {warnings:#?}");

    let stem = "sub-01/func/sub-01_task-imagery_run-1";
    let mut check = python("bids_check.py");
    check.arg(&session).arg(&bids).arg(stem);
    let summary = run(&mut check);
    assert!(summary.contains("\"volumes\": 48"), "{summary}");

    // The derivatives name the version, commit and configuration that made them.
    let desc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(bids.join("derivatives/mirage-rt/dataset_description.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(desc["DatasetType"], "derivative");
    let generated = &desc["GeneratedBy"][0];
    assert_eq!(generated["Version"], env!("CARGO_PKG_VERSION"));
    assert!(generated["Commit"].as_str().is_some_and(|c| !c.is_empty()), "{desc}");
    assert_eq!(generated["Configuration"]["ingest"]["uri"], "sim://?volumes=48&shape=16,16,10&speed=max");

    // Never overwritten without --force; with it, replaced.
    let (status, out) = run_with_timeout(&mut export(&[]), Duration::from_secs(60));
    assert!(!status.success() && out.contains("exists; give --force"), "{out}");
    run(&mut export(&["--force"]));
}
