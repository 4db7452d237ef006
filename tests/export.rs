//! The session, out: `mirage export` writes a recorded session as BIDS, judged by the official
//! BIDS validator (npm `bids-validator`, installed by `scripts/setup.sh --tests`), by pybids and
//! by nibabel against the session it came from; `file://SESSION_DIR` replays it through the
//! daemon.

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
    let port = common::free_port();
    let (uri, publish) =
        ("sim://?volumes=48&shape=16,16,10&speed=max&delay=2", format!("tcp://127.0.0.1:{port}"));
    let sub = common::Subscriber::connect(port, "volume");
    let s = session.display().to_string();
    let daemon = common::Daemon::start(
        &["--ingest", uri, "--publish", &publish, "--no-lsl", "--quiet", "--console", "none", "--record", &s],
        dir.path(),
    );
    // The realigned volumes as the live run published them.
    let live = sub.collect(48, Duration::from_secs(120));
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success() && live.len() == 48, "{} volumes received\n{log}", live.len());

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

    // pybids finds the raw files and every derivative, and reads the TR from the sidecar.
    let mut pybids = python("pybids_check.py");
    let out = run(pybids.arg(&bids));
    let found: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let deriv = "derivatives/mirage-rt/sub-01/func/sub-01_task-imagery_run-1";
    let expect = serde_json::json!({
        "subjects": ["01"], "tasks": ["imagery"], "runs": [1],
        "bold": [format!("{stem}_bold.nii.gz")], "events": [format!("{stem}_events.tsv")],
        "realigned": [format!("{deriv}_desc-realigned_bold.nii.gz")],
        "confounds": [format!("{deriv}_desc-confounds_timeseries.tsv")],
        "latency": [format!("{deriv}_desc-latency_summary.json")], "repetition_time": 1.0,
    });
    assert_eq!(found, expect);

    // The realigned series reproduces the live one from the raw volumes and the recorded
    // motion matrices, value for value.
    let realigned = bids.join("derivatives/mirage-rt").join(format!("{stem}_desc-realigned_bold.nii.gz"));
    let img = mirage_rt::io::nifti::read_nifti(&realigned, 1 << 24).unwrap();
    assert_eq!(img.volumes.len(), 48);
    for (t, (got, msg)) in img.volumes.iter().zip(&live).enumerate() {
        let (_, _, bytes) = &msg.payloads[0];
        let want: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert!(got == &want, "volume {t}: the exported realigned volume differs from the live one");
    }

    // The derivatives name the version, commit and configuration that made them.
    let desc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(bids.join("derivatives/mirage-rt/dataset_description.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(desc["DatasetType"], "derivative");
    let generated = &desc["GeneratedBy"][0];
    assert_eq!(generated["Version"], env!("CARGO_PKG_VERSION"));
    assert!(generated["Commit"].as_str().is_some_and(|c| !c.is_empty()), "{desc}");
    assert_eq!(generated["Configuration"]["ingest"]["uri"], uri);

    // Never overwritten without --force; with it, replaced.
    let (status, out) = run_with_timeout(&mut export(&[]), Duration::from_secs(60));
    assert!(!status.success() && out.contains("exists; give --force"), "{out}");
    run(&mut export(&["--force"]));
}

/// Every logged header of `topic` in a session folder.
fn logged(session: &Path, topic: &str) -> Vec<serde_json::Value> {
    common::published(session, topic)
}

/// `a` and `b` equal, numbers to 1e-6 (relative), keys in `skip` ignored at any depth.
fn same(a: &serde_json::Value, b: &serde_json::Value, skip: &[&str]) -> bool {
    use serde_json::Value::{Array, Number, Object};
    match (a, b) {
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0)
        }
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y, skip)),
        (Object(x), Object(y)) => {
            let keys = |o: &serde_json::Map<String, serde_json::Value>| -> Vec<String> {
                o.keys().filter(|k| !skip.contains(&k.as_str())).cloned().collect()
            };
            keys(x) == keys(y) && keys(x).iter().all(|k| same(&x[k], &y[k], skip))
        }
        _ => a == b,
    }
}

#[test]
fn a_replayed_session_gives_the_live_runs_volume_motion_roi_and_betas_messages() {
    let dir = tempfile::tempdir().unwrap();
    // The simulated brain's visual ROI as a file, so the replay (not sim://) can name it.
    let truth = dir.path().join("sim");
    run(common::mirage().args(["simulate", "--shape", "16,16,10", "--volumes", "30", "--out"]).arg(&truth));
    let roi = format!(
        "glm.rois=[{{name = \"visual\", path = \"{}\"}}]",
        truth.join("truth/roi_mask.nii.gz").display()
    );
    let daemon = |uri: &str, session: &Path| {
        let mut c = common::mirage();
        c.args(["run", "--ingest", uri, "--publish", "none", "--no-lsl", "--quiet", "--console", "none"]);
        c.args(["--set", &roi, "--record"]).arg(session).current_dir(dir.path());
        run(&mut c);
    };
    let (live, again) = (dir.path().join("live"), dir.path().join("again"));
    daemon("sim://?volumes=30&shape=16,16,10&speed=max", &live);
    daemon(&format!("file://{}?speed=max", live.display()), &again);

    // Times and latencies differ; everything the data determines does not.
    let skip = ["seq", "acq_time", "recv_time", "latency_ms", "stage_errors"];
    // The markers recorded with the volumes are replayed before them: the same trials' betas.
    for (topic, n) in [("volume", 30), ("motion", 30), ("roi", 30), ("betas", 3)] {
        let (a, b) = (logged(&live, topic), logged(&again, topic));
        assert!(a.len() >= n, "{topic}: {} live messages", a.len());
        assert_eq!(a.len(), b.len(), "{topic}");
        for (x, y) in a.iter().zip(&b) {
            assert!(same(x, y, &skip), "{topic}:\nlive   {x}\nreplay {y}");
        }
    }
    let roi_values: Vec<f64> =
        logged(&again, "roi").iter().filter_map(|h| h["rois"][0]["mean"].as_f64()).collect();
    assert_eq!(roi_values.len(), 30, "the replay's ROI readings are numbers");
}
