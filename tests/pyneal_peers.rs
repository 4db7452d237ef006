//! pyneal's own scanner-side code, unmodified (`../shared/peers/pyneal`), against the daemon:
//! its simulated sender, which sends the TR in milliseconds (and whose real series the session
//! export must give back as valid BIDS), and its Siemens mosaic processor, which stops when a
//! reply says `STOP`.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    as_strs, free_port, mirage, published, pyneal_daemon_args, python, run, run_with_timeout, shared_data,
    shared_peer, validate, Daemon,
};
use mirage_rt::io::session::SessionReader;

/// pyneal's `pynealScanner_sim.py` sending `series` to `port` at `tr_ms`, ENTER pressed.
fn pyneal_simulated_sender(series: &std::path::Path, port: u16, tr_ms: u32) -> Command {
    let py = std::env::var("MIRAGE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = shared_peer("pyneal/utils/simulation/pynealScanner_sim.py");
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("echo | {py} {} -f {} -t {tr_ms} -sp {port}", script.display(), series.display()))
        .stdin(Stdio::null());
    c
}

/// A daemon started with `args` taking pyneal's simulated sender's replay of `series` to `port`
/// at 500 ms; both must succeed. The sender's output and the daemon's log.
fn with_pyneals_sender(
    d: &std::path::Path,
    args: &[String],
    series: &std::path::Path,
    port: u16,
) -> (String, String) {
    let daemon = Daemon::start(&as_strs(args), d);
    let (status, out) =
        run_with_timeout(&mut pyneal_simulated_sender(series, port, 500), Duration::from_secs(120));
    assert!(status.success(), "pyneal's sender failed:\n{out}\ndaemon log:\n{}", daemon.log());
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    (out, log)
}

/// A small simulated run of `volumes` at TR 0.5 s (16x16x10), its series' path.
fn small_run(d: &std::path::Path, volumes: usize) -> std::path::PathBuf {
    let sim = d.join("run");
    run(mirage()
        .args([
            "simulate",
            "--seed",
            "4",
            "--shape",
            "16,16,10",
            "--tr",
            "0.5",
            "--volumes",
            &volumes.to_string(),
        ])
        .arg("--out")
        .arg(&sim));
    sim.join("bold.nii.gz")
}

#[test]
fn pyneals_simulated_sender_with_its_tr_in_milliseconds_gives_estimable_trial_betas() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 80 volumes at TR 0.5 s with trials every ~8 s: what pyneal's sender replays at 500 ms.
    let sim = d.join("run");
    run(mirage()
        .args(["simulate", "--seed", "4", "--shape", "32,32,20", "--tr", "0.5", "--volumes", "80"])
        .args(["--set", "motion_mm=0", "--set", "motion_deg=0", "--out"])
        .arg(&sim));
    let port = free_port();
    let session = d.join("s");
    let events = format!("glm.events=\"{}\"", sim.join("events.tsv").display());
    let mask = format!("glm.mask=\"{}\"", sim.join("truth/roi_mask.nii.gz").display());
    let extra = ["--stop-after", "80", "--set", "motion.enabled=false", "--set", &events, "--set", &mask];
    let args = pyneal_daemon_args(port, "none", &session, &extra);
    let (out, log) = with_pyneals_sender(d, &args, &sim.join("bold.nii.gz"), port);
    assert!(out.contains("Sent vol: 79"), "{out}");

    // Its "TR": "500.0" was read as 0.5 s.
    let rec = SessionReader::open(&session).unwrap();
    assert_eq!(rec.entries.len(), 80);
    assert!(rec.entries.iter().all(|e| e.tr == Some(0.5)), "{:?}", rec.entries.first().map(|e| e.tr));
    // Trials closed during the run with estimable betas.
    let betas = common::published_as::<mirage_rt::topic::BetasHeader>(&session);
    let live: Vec<_> = betas.iter().filter(|b| !b.trial.at_run_end).collect();
    assert!(live.len() >= 3, "{} trials closed live:\n{log}", live.len());
    assert!(live.iter().all(|b| b.trial.estimable && b.tr == Some(0.5)), "{live:?}");
}

#[test]
fn a_real_series_from_pyneals_sender_exports_as_valid_bids_equal_to_what_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // pyneal's test series (uint16 on disk); its sender sends `get_fdata()`, i.e. float64.
    let series = shared_data("pyneal-testseries/testSeries.nii.gz");
    let port = free_port();
    let session = d.join("s");
    let daemon =
        Daemon::start(&as_strs(&pyneal_daemon_args(port, "none", &session, &["--stop-after", "3"])), d);
    let (status, out) =
        run_with_timeout(&mut pyneal_simulated_sender(&series, port, 200), Duration::from_secs(120));
    assert!(status.success(), "pyneal's sender failed:\n{out}\ndaemon log:\n{}", daemon.log());
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");

    let bids = d.join("bids");
    let out =
        run(mirage().arg("export").arg(&session).arg("--bids").arg(&bids).args(["--subject", "pyneal"]));
    assert!(out.contains("-> run-1: 3 volumes"), "{out}");
    let (errors, warnings) = validate(&bids);
    assert!(errors.is_empty(), "BIDS validator errors: {errors:#?}\nwarnings: {warnings:#?}");
    eprintln!("BIDS validator on pyneal's series: 0 errors, warnings: {warnings:#?}");
    // nibabel: the raw bold is what pyneal sent, float64 value for value (the daemon keeps
    // float32, exact for these integers), TR and affine as its headers said.
    let stem = "sub-pyneal/func/sub-pyneal_task-rt_run-1";
    let summary = run(python("bids_check.py").arg(&session).arg(&bids).arg(stem).arg(&series));
    assert!(summary.contains("\"volumes\": 3") && summary.contains("\"dtype\": \"float64\""), "{summary}");
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bids.join(format!("{stem}_bold.json"))).unwrap()).unwrap();
    assert_eq!(sidecar["MirageReceivedDtype"], "float64", "{sidecar}");
}

#[test]
fn pyneals_siemens_mosaic_processor_stops_on_the_last_volumes_reply() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let session = dir.path().join("s");
    // Three real mosaics queued one at a time; the daemon's run ends after two.
    let extra = ["--stop-after", "2", "--set", "motion.enabled=false", "--set", "glm.enabled=false"];
    let daemon = Daemon::start(&as_strs(&pyneal_daemon_args(port, "none", &session, &extra)), dir.path());
    let (status, out) = run_with_timeout(
        python("pyneal_siemens_stop.py")
            .arg(shared_peer("pyneal"))
            .arg(common::shared_data("pyneal-scanner-formats/Siemens_env/funcData"))
            .arg(port.to_string()),
        Duration::from_secs(120),
    );
    assert!(status.success(), "pyneal's processor failed:\n{out}\ndaemon log:\n{}", daemon.log());
    let report: serde_json::Value =
        serde_json::from_str(out.lines().find(|l| l.starts_with("{\"mosaics\"")).expect(&out)).unwrap();
    assert_eq!(report["mosaics"], 3, "{report}");
    // It stopped by itself on "received volIdx 1 - STOP" and never sent the third.
    assert_eq!(report["sent"], 2, "{report}");
    assert_eq!(report["replies"][0], "received volIdx 0", "{report}");
    assert_eq!(report["replies"][1], "received volIdx 1 - STOP", "{report}");
    assert_eq!(report["stopped_by_itself"], true, "{report}");
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert_eq!(SessionReader::open(&session).unwrap().entries.len(), 2);
}

#[test]
fn a_sender_that_goes_on_after_the_run_ends_is_answered_stop() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let session = dir.path().join("s");
    let extra = ["--stop-after", "1", "--set", "motion.enabled=false", "--set", "glm.enabled=false"];
    let daemon = Daemon::start(&as_strs(&pyneal_daemon_args(port, "none", &session, &extra)), dir.path());
    let ctx = zmq::Context::new();
    let s = common::pyneal_socket(&ctx, port);
    common::pyneal_hello(&s);
    let header = |i: u64| {
        serde_json::json!({"volIdx": i, "dtype": "float32", "shape": [2, 2, 2], "affine": "[[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]", "TR": "0.5"})
            .to_string()
    };
    let payload = [0u8; 32];
    s.send_multipart([header(0).as_bytes(), &payload[..]], 0).unwrap();
    assert_eq!(s.recv_string(0).unwrap().unwrap(), "received volIdx 0 - STOP");
    // A sender that ignores it is not left waiting while the daemon drains.
    s.send_multipart([header(1).as_bytes(), &payload[..]], 0).unwrap();
    let reply = s.recv_string(0).unwrap().unwrap();
    assert!(reply.starts_with("STOP") && reply.contains("volIdx 1"), "{reply}");
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert_eq!(SessionReader::open(&session).unwrap().entries.len(), 1);
    assert!(log.contains("refused_after_stop=1"), "{log}");
}

/// pyneal's `endUser_sim.py` asking the results server for `index`; the dict it prints, as
/// JSON (it prints Python's repr).
fn end_user_request(port: u16, index: u64) -> serde_json::Value {
    let script = shared_peer("pyneal/utils/simulation/endUser_sim.py");
    let py = std::env::var("MIRAGE_PYTHON").unwrap_or_else(|_| "python3".into());
    let (status, out) = run_with_timeout(
        Command::new(py).arg(script).args(["-sp", &port.to_string(), &format!("{index:04}")]),
        Duration::from_secs(30),
    );
    assert!(status.success(), "endUser_sim.py failed:\n{out}");
    let repr = out.lines().skip_while(|l| !l.starts_with("client received")).nth(1).expect(&out);
    // Python's repr of a dict of numbers, strings, booleans and None, as JSON.
    let json =
        repr.replace('\'', "\"").replace("True", "true").replace("False", "false").replace("None", "null");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {repr}"))
}

#[test]
fn pyneals_end_user_gets_each_volumes_results_and_its_trials_decode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let session = d.join("s");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.toml");
    let results = format!("127.0.0.1:{port}");
    let mut daemon = Daemon::start_with_env(
        &[
            "--config",
            config,
            "--ingest",
            "sim://?volumes=400&shape=32,32,20&speed=8",
            "--results",
            &results,
            "--publish",
            "none",
            "--no-lsl",
            "--console",
            "none",
            "--mode",
            "decode",
            "--quiet",
            "--record",
            session.to_str().unwrap(),
        ],
        d,
        &[("MIRAGE_CACHE_DIR", &d.join("cache"))],
    );
    daemon.wait_for_log("results server at", Duration::from_secs(300));
    // A volume not yet processed.
    assert_eq!(end_user_request(port, 399), serde_json::json!({"foundResults": false}));
    // Wait until the volumes asked for are processed and every trial they closed has been
    // decoded (decodes run off the volume path at low priority and may finish seconds after
    // their trial's volume under load: the session log, written as messages go out, says
    // when), then ask for every volume so far.
    let last = 40u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let logged = |topic: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(session.join("messages.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["topic"] == topic)
            .map(|m| m["header"].clone())
            .collect()
    };
    loop {
        let closed: Vec<serde_json::Value> = logged("betas")
            .into_iter()
            .filter(|b| b["at_run_end"] == false && b["estimable"] == true)
            .filter(|b| b["index"].as_u64().is_some_and(|i| i <= last))
            .map(|b| b["trial"].clone())
            .collect();
        let decoded: Vec<serde_json::Value> =
            logged("decode").into_iter().map(|d| d["trial"].clone()).collect();
        let ready = end_user_request(port, last)["foundResults"] == true
            && !closed.is_empty()
            && closed.iter().all(|t| decoded.contains(t));
        if ready {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "trials {closed:?} not all decoded:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let answers: Vec<serde_json::Value> = (0..=last).map(|i| end_user_request(port, i)).collect();
    daemon.terminate();
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");

    // Each answer equals what was published for that volume.
    let motion = published(&session, "motion");
    let roi = published(&session, "roi");
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["foundResults"], true, "volume {i}: {a}");
        let m = motion.iter().find(|m| m["index"] == i).expect("a motion message");
        for key in ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement"] {
            assert_eq!(a[key], m[key], "volume {i} {key}");
        }
        let r = roi.iter().find(|r| r["index"] == i).expect("a roi message");
        assert_eq!(a["visual"], r["rois"][0]["mean"], "volume {i}");
        assert_eq!(a["visual_psc"], r["rois"][0]["psc"], "volume {i}");
    }
    // A volume that closed a trial carries that trial's decode.
    let decodes = published(&session, "decode");
    let mut checked = 0;
    for b in published(&session, "betas").iter().filter(|b| b["at_run_end"] == false) {
        let i = b["index"].as_u64().unwrap();
        // The live decode (a trial dropped live is decoded again at the run's end, on stop).
        let live = |x: &&serde_json::Value| x["trial"] == b["trial"] && x["at_run_end"] == false;
        let Some(dec) = decodes.iter().find(live) else { continue };
        if i > last {
            continue;
        }
        let a = &answers[i as usize]["decode"];
        assert_eq!(a["trial"], b["trial"], "volume {i}: {a}");
        assert_eq!(a["top_id"], dec["top"][0]["id"], "volume {i}");
        assert_eq!(a["top_score"], dec["top"][0]["score"], "volume {i}");
        assert_eq!(a["condition"], dec["condition"], "volume {i}");
        checked += 1;
    }
    assert!(checked >= 2, "{checked} trials closed within the first {last} volumes");
}

#[test]
fn a_run_with_pyneals_sender_ends_by_itself_when_the_sender_goes_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let series = small_run(d, 12);
    let port = free_port();
    let session = d.join("s");
    // No --stop-after: the run has no length; it ends 2 s after pyneal's last volume.
    let extra = ["--idle-exit", "2", "--set", "motion.enabled=false"];
    let (_, log) = with_pyneals_sender(d, &pyneal_daemon_args(port, "none", &session, &extra), &series, port);
    assert!(log.contains("ingest.idle_exit_s"), "{log}");
    // Drained and flushed: every volume recorded and published, and the last status says so.
    assert_eq!(SessionReader::open(&session).unwrap().entries.len(), 12);
    assert_eq!(published(&session, "volume").len(), 12);
    let status = published(&session, "status");
    let last = status.last().expect("a status message");
    assert_eq!((last["received"].as_u64(), last["recorded"].as_u64()), (Some(12), Some(12)), "{last}");
}

#[test]
fn a_configured_tr_over_pyneals_milliseconds_is_used_without_the_milliseconds_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let series = small_run(d, 6);
    // pyneal's sender says "TR": "500.0"; with ?tr= the configuration's TR is used, unwarned.
    for (k, configured) in [(0, true), (1, false)] {
        let (port, session) = (free_port(), d.join(format!("s{k}")));
        let extra = ["--stop-after", "6", "--set", "motion.enabled=false"];
        let mut args = pyneal_daemon_args(port, "none", &session, &extra);
        if configured {
            args[1] = format!("pyneal://127.0.0.1:{port}?tr=0.5");
        }
        let (_, log) = with_pyneals_sender(d, &args, &series, port);
        let rec = SessionReader::open(&session).unwrap();
        assert_eq!(rec.entries.len(), 6);
        assert!(rec.entries.iter().all(|e| e.tr == Some(0.5)));
        assert_eq!(log.contains("read as milliseconds"), !configured, "configured TR {configured}: {log}");
    }
}
