//! The operator's console and the first run: the default configuration (the simulator's own
//! model, made and cached on first use; calibration; live decoding) with the console checked
//! in a real headless Chromium while the run goes on, and the report checked against the
//! session's own log.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{free_port, mirage, published, python, report_events, run_with_timeout, Daemon};
use serde_json::Value;

/// Runs the browser check; returns what it observed.
fn console_check(url: &str, extra: &[&str]) -> Value {
    let (status, out) =
        run_with_timeout(python("console_check.py").arg(url).args(extra), Duration::from_secs(200));
    assert!(
        status.success(),
        "console check failed (needs chromium and chromium-driver: scripts/setup.sh --tests):\n{out}"
    );
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON from the check:\n{out}"));
    serde_json::from_str(line).unwrap()
}

/// The first run's length in volumes.
const VOLUMES: usize = 420;

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn the_first_run_shows_calibration_and_decoding_in_the_browser_and_reports_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cache = d.join("cache");
    let session = d.join("s");
    let port = free_port();
    let console = format!("127.0.0.1:{port}");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml");
    let session_arg = session.display().to_string();
    // The default configuration as a new user runs it, paced faster (5 volumes/s), with ports
    // of its own. The run is long enough that, on a loaded machine where the calibration fit
    // finishes late, eight imagery trials still come after it.
    let ingest =
        format!("sim://?seed=1&run_seed=2&volumes={VOLUMES}&tr=1&speed=5&condition=mixed&n_stimuli=24");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--ingest",
        &ingest,
        "--console",
        &console,
        "--publish",
        "none",
        "--no-lsl",
        "--record",
        &session_arg,
    ];
    let turn = common::live_fit_turn();
    let mut daemon = Daemon::start_with_env(&args, d, &[("MIRAGE_CACHE_DIR", &cache)]);
    daemon.wait_for_log(&format!("console at http://{console}/"), Duration::from_secs(600));
    let live = console_check(
        &format!("http://{console}/"),
        &["--timeout", "150", "--screenshot", &d.join("console.png").display().to_string()],
    );
    let (status, log) = daemon.wait(Duration::from_secs(600));
    drop(turn);
    assert!(status.success(), "{log}");

    // First run: the model was trained on a simulated seen session and cached.
    assert!(log.contains("no cached model for this simulated brain"), "{log}");
    assert!(log.contains("cached the simulator model"), "{log}");
    // The page showed the loop and it moved: more volumes, a new reconstruction, new latency.
    let (before, after) = (&live["before"], &live["after"]);
    assert!(after["motion_points"].as_u64() > before["motion_points"].as_u64(), "{live}");
    assert!(after["decodes"].as_u64() > before["decodes"].as_u64(), "{live}");
    assert!(after["latency_updates"].as_u64() > before["latency_updates"].as_u64(), "{live}");
    assert!(before["recons_loaded"].as_u64() >= Some(1), "{live}");
    assert!(d.join("console.png").metadata().unwrap().len() > 10_000);

    // Every field of every topic of the first run has one type.
    common::assert_one_type_per_field(&session);

    // The report holds the whole run, and its numbers are the session log's.
    let report = session.join("report.html");
    assert!(log.contains(&format!("mirage: report {}", report.display())), "{log}");
    let events = report_events(&report);
    let of = |topic: &str| events.iter().filter(|e| e["topic"] == topic).collect::<Vec<_>>();
    assert_eq!(of("motion").len(), VOLUMES);
    assert_eq!(of("roi").len(), VOLUMES);
    let decoded = published(&session, "decode");
    let page_decodes = of("decode");
    assert_eq!(page_decodes.len(), decoded.len());
    assert!(of("calibration").iter().any(|e| e["phase"] == "done"), "{log}");
    assert!(decoded.iter().any(|h| h["alignment"] == "head"), "no decode with the fitted head:\n{log}");
    // Top-1 per trial, from the published headers: is the best match the cued stimulus?
    let mut top1: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    for (h, e) in decoded.iter().zip(&page_decodes) {
        assert_eq!(h["trial"], e["trial"]);
        let hit = h["top"][0]["id"].as_str().unwrap() == h["stim"].to_string().trim_matches('"');
        assert_eq!(e["scores"]["top1"], hit, "{h}\n{e}");
        if h["at_run_end"] == false {
            let key =
                (h["condition"].as_str().unwrap().to_string(), h["alignment"].as_str().unwrap().to_string());
            top1.entry(key).or_default().push(if hit { 1.0 } else { 0.0 });
        }
    }
    let summary = of("summary").last().copied().cloned().expect("a quality summary");
    let rows = summary["conditions"].as_array().unwrap();
    assert_eq!(rows.len(), top1.len(), "{summary}");
    for ((condition, alignment), hits) in &top1 {
        let row = rows.iter().find(|r| r["condition"] == *condition && r["alignment"] == *alignment).unwrap();
        assert_eq!(row["n"], hits.len());
        assert!((row["top1"].as_f64().unwrap() - mean(hits)).abs() < 1e-12, "{row}");
    }
    // Against the simulator's truth: seen pictures are decoded well (without the imagery
    // alignment), and imagery better with the fitted alignment than before it.
    let seen =
        rows.iter().find(|r| r["condition"] == "seen" && r["alignment"] == "none").expect("seen trials");
    assert!(seen["two_way"].as_f64().unwrap() > 0.9, "{seen}");
    assert!(seen["pixcorr"].as_f64().unwrap() > 0.8, "{seen}");
    assert!(rows.iter().all(|r| r["condition"] != "seen" || r["alignment"] == "none"), "{summary}");
    let imagery = |alignment: &str| {
        rows.iter()
            .find(|r| r["condition"] == "imagery" && r["alignment"] == alignment)
            .unwrap_or_else(|| panic!("{summary}"))
    };
    let (before, after) = (imagery("none"), imagery("head"));
    eprintln!("imagery without alignment {before}\nimagery with the fitted alignment {after}");
    assert!(before["n"].as_u64() >= Some(8) && after["n"].as_u64() >= Some(8), "{summary}");
    for metric in ["two_way", "top1"] {
        assert!(after[metric].as_f64() > before[metric].as_f64(), "{metric}: {before} → {after}");
    }
    let report_check = console_check(&format!("file://{}", report.display()), &["--report"]);
    assert_eq!(report_check["after"]["motion_points"], VOLUMES, "{report_check}");
    // The page's latency rows are the path's latency keys its first event named, which are the
    // status topic's: the page lists no stage of its own.
    let hello = events.first().expect("a first event");
    assert_eq!(hello["topic"], "hello", "{hello}");
    let status = published(&session, "status").pop().expect("a status message");
    assert_eq!(hello["stages"], status["stages"], "{hello}\n{status}");
    let mut rows: Vec<Value> = hello["stages"].as_array().unwrap().clone();
    rows.extend([Value::from("end_to_end"), Value::from("trial_decode")]);
    assert_eq!(report_check["after"]["latency_rows"], Value::from(rows), "{report_check}");
    assert_eq!(report_check["conn"], "report", "{report_check}");
    // The report shows what calibration kept and its held-out estimate.
    let calibration = report_check["after"]["calibration"].as_str().unwrap_or_default();
    assert!(
        calibration.contains("held-out 2-way") && calibration.contains("heads corrected"),
        "{report_check}"
    );

    // A second run reuses the cached model; a port already taken is refused before anything runs.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let mut cmd = mirage();
    cmd.env("MIRAGE_CACHE_DIR", &cache)
        .args(["run", "--config", config.to_str().unwrap(), "--console", &taken_addr, "--publish", "none"])
        .args(["--no-lsl", "--record", "none", "--stop-after", "5"]);
    let (status, out) = run_with_timeout(&mut cmd, Duration::from_secs(300));
    assert!(out.contains("using the cached simulator model"), "{out}");
    assert!(!status.success(), "{out}");
    assert!(out.contains(&format!("console: cannot listen on {taken_addr}")), "{out}");
}
