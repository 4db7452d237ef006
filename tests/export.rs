//! The session, out: `mirage export` writes a recorded session as BIDS, judged by the official
//! BIDS validator (npm `bids-validator`, installed by `scripts/setup.sh --tests`), by pybids and
//! by nibabel against the session it came from; `file://SESSION_DIR` replays it through the
//! daemon.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{python, run, run_with_timeout, validate};

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
    assert!(summary.contains("\"volumes\": 48") && summary.contains("\"trials\": 4"), "{summary}");

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
        "trial_betas": [format!("{deriv}_desc-trials_betas.nii.gz")], "mask": [format!("{deriv}_desc-glm_mask.nii.gz")],
        "design": [format!("{deriv}_desc-glm_design.tsv")], "roi": [], "decode": [],
    });
    assert_eq!(found, expect);

    // The latency summary is the session's last status message, field for field.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bids.join(format!("{deriv}_desc-latency_summary.json"))).unwrap(),
    )
    .unwrap();
    let last = common::published(&session, "status").pop().expect("a status message");
    for key in
        ["stage_latency_ms", "end_to_end_ms", "acquisition_to_publish_ms", "received", "recorded", "errors"]
    {
        assert!(!summary[key].is_null(), "{key} is null: {summary}");
        assert_eq!(summary[key], last[key], "{key}");
    }
    assert!(summary["end_to_end_ms"]["p50"].as_f64().is_some_and(|v| v > 0.0), "{summary}");

    // The sidecar's volume times are seconds from the run's first volume, as recorded.
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bids.join(format!("{stem}_bold.json"))).unwrap())
            .unwrap();
    let rec = mirage_rt::io::session::SessionReader::open(&session).unwrap();
    let at = |e: &mirage_rt::io::session::IndexEntry| e.acq_time.unwrap_or(e.recv_time);
    let times: Vec<f64> =
        sidecar["MirageVolumeTimes"].as_array().unwrap().iter().filter_map(|v| v.as_f64()).collect();
    assert_eq!(times.len(), rec.entries.len());
    assert_eq!(sidecar["MirageFirstVolumeTime"].as_f64(), Some(at(&rec.entries[0])));
    for (t, e) in times.iter().zip(&rec.entries) {
        assert!((t - (at(e) - at(&rec.entries[0]))).abs() < 1e-9, "{t}");
    }
    assert_eq!(times[0], 0.0);

    // The realigned series reproduces the live one from the raw volumes and the recorded
    // motion matrices, value for value.
    let realigned = bids.join("derivatives/mirage-rt").join(format!("{stem}_desc-realigned_bold.nii.gz"));
    let img = mirage_rt::io::nifti::read_nifti(&realigned, 1 << 24).unwrap();
    assert_eq!(img.volumes.len(), 48);
    for (t, (got, msg)) in img.volumes.iter().zip(&live).enumerate() {
        let want = msg.f32_payload("data").expect("a volume payload");
        assert!(got == &want, "volume {t}: the exported realigned volume differs from the live one");
    }

    // The export's design: a column per trial and nuisance regressor, a row per volume.
    let design = std::fs::read_to_string(
        bids.join("derivatives/mirage-rt").join(format!("{stem}_desc-glm_design.tsv")),
    )
    .unwrap();
    let header: Vec<&str> = design.lines().next().unwrap().split('\t').collect();
    assert_eq!(design.lines().count(), 49, "{design}");
    assert!((0..4).all(|k| header.contains(&format!("trial_{k:04}").as_str())), "{header:?}");
    assert!(header.iter().any(|c| c.contains("trans_x")), "motion regressors: {header:?}");

    // `mirage glm` on the exported realigned series, events, confounds and GLM mask reproduces
    // the live end-of-run trial betas (their recorded payloads), trial by trial.
    let deriv_dir = bids.join("derivatives/mirage-rt");
    let fit = dir.path().join("offline-glm");
    run(common::mirage()
        .arg("glm")
        .arg(deriv_dir.join(format!("{stem}_desc-realigned_bold.nii.gz")))
        .arg("--events")
        .arg(bids.join(format!("{stem}_events.tsv")))
        .arg("--motion")
        .arg(deriv_dir.join(format!("{stem}_desc-confounds_timeseries.tsv")))
        .arg("--mask")
        .arg(deriv_dir.join(format!("{stem}_desc-glm_mask.nii.gz")))
        .arg("--out")
        .arg(&fit));
    let (shape, offline) = common::npy(&fit.join("trial_betas.npy"));
    let messages = mirage_rt::io::session::read_messages(&session).unwrap();
    let mut run_end: Vec<(f64, Vec<f32>)> = messages
        .iter()
        .filter(|m| m.topic == "betas" && m.header["at_run_end"] == true)
        .map(|m| {
            let bytes =
                mirage_rt::io::session::read_payload(&session, m, "betas").unwrap().expect("recorded betas");
            let values = mirage_rt::volume::f32_from_le_bytes(&bytes);
            (m.header["onset"].as_f64().unwrap(), values)
        })
        .collect();
    run_end.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(run_end.len() == 4 && shape == [4, run_end[0].1.len()], "{shape:?} vs {} trials", run_end.len());
    for (k, (_, live)) in run_end.iter().enumerate() {
        let row = &offline[k * shape[1]..(k + 1) * shape[1]];
        let scale = live.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = live.iter().zip(row).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-5 * scale, "trial {k}: offline differs by {worst} (largest beta {scale})");
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

#[test]
fn the_export_holds_the_trial_betas_mask_roi_series_and_decodes_subscribers_received() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (train_run, train_glm) = common::simulated_session(d, 7, "train", "seen", 1, 600);
    let model = common::train_model(d, &train_run, &train_glm);
    let session = d.join("s");
    let port = common::free_port();
    let (betas_sub, decode_sub) =
        (common::Subscriber::connect(port, "betas"), common::Subscriber::connect(port, "decode"));
    let gallery = train_run.join("truth/gallery");
    let roi = format!(
        "glm.rois=[{{name = \"visual\", path = \"{}\"}}]",
        train_run.join("truth/roi_mask.nii.gz").display()
    );
    let mut args = common::decode_daemon_args(
        "seed=7&run_seed=9&volumes=80&shape=32,32,20&condition=seen&speed=max&delay=2",
        &session,
        "sim",
        &model,
        Some(&gallery),
        &["--set", &roi],
    );
    let publish = args.iter().position(|a| a == "none").unwrap();
    args[publish] = format!("tcp://127.0.0.1:{port}");
    let (status, log) = common::Daemon::start(&common::as_strs(&args), d).wait(Duration::from_secs(180));
    assert!(status.success(), "{log}");
    // What subscribers received (queued on their sockets while the run went on).
    let n = |topic| common::published(&session, topic).len();
    let (betas, decodes) = (n("betas"), n("decode"));
    let betas = betas_sub.collect(betas, Duration::from_secs(10));
    let decodes = decode_sub.collect(decodes, Duration::from_secs(10));
    assert!(
        betas.len() >= 5 && decodes.len() >= 5,
        "{} betas, {} decodes\n{log}",
        betas.len(),
        decodes.len()
    );

    let bids = d.join("bids");
    let mut export = common::mirage();
    export.arg("export").arg(&session).arg("--bids").arg(&bids).args(["--subject", "02", "--task", "seen"]);
    let out = run(&mut export);
    let (errors, warnings) = validate(&bids);
    assert!(errors.is_empty(), "BIDS validator errors: {errors:#?}\nwarnings: {warnings:#?}");

    // The live trials as subscribers saw them, for nibabel and NumPy to compare the export with.
    let live = d.join("live");
    std::fs::create_dir_all(&live).unwrap();
    let f32s = |m: &mirage_rt::message::Received, name: &str| -> Vec<f32> {
        m.f32_payload(name).unwrap_or_else(|| panic!("no {name}"))
    };
    let chosen: Vec<&mirage_rt::message::Received> = {
        // The export keeps each trial's live estimate (else its end-of-run one), by onset.
        let mut by_trial: std::collections::BTreeMap<u64, &mirage_rt::message::Received> = Default::default();
        for m in &betas {
            let t = m.header["trial"].as_u64().unwrap();
            let keep = by_trial
                .get(&t)
                .is_none_or(|o| o.header["at_run_end"] == true && m.header["at_run_end"] == false);
            if keep {
                by_trial.insert(t, m);
            }
        }
        let mut v: Vec<_> = by_trial.into_values().collect();
        v.sort_by(|a, b| a.header["onset"].as_f64().unwrap().total_cmp(&b.header["onset"].as_f64().unwrap()));
        v
    };
    let voxels: Vec<f32> =
        chosen[0].u32_payload("voxels").expect("no voxels").into_iter().map(|v| v as f32).collect();
    let values: Vec<f32> = chosen.iter().flat_map(|m| f32s(m, "betas")).collect();
    let write = |name: &str, shape: &[usize], v: &[f32]| {
        mirage_rt::io::npy::write_npy(live.join(name), shape, v).unwrap();
    };
    write("betas.npy", &[chosen.len(), voxels.len()], &values);
    write("voxels.npy", &[voxels.len()], &voxels);
    let mut heads = serde_json::Map::new();
    for head in ["image", "text", "lowlevel", "retrieval", "pixels"] {
        let shape: Vec<usize> = decodes[0].payloads.iter().find(|(n, _, _)| n == head).unwrap().1.clone();
        let all: Vec<f32> = decodes.iter().flat_map(|m| f32s(m, head)).collect();
        let mut full = vec![decodes.len()];
        full.extend(&shape);
        write(&format!("decode-{head}.npy"), &full, &all);
        heads.insert(head.into(), serde_json::json!(format!("decode-{head}.npy")));
    }
    let summary = serde_json::json!({
        "trials": chosen.iter().map(|m| m.header["trial"].clone()).collect::<Vec<_>>(),
        "top1": decodes.iter().map(|m| m.header["top"][0]["id"].clone()).collect::<Vec<_>>(),
        "volumes": 80,
        "heads": heads,
    });
    std::fs::write(live.join("live.json"), summary.to_string()).unwrap();
    let stem = "derivatives/mirage-rt/sub-02/func/sub-02_task-seen_run-1";
    let checked = run(python("trials_check.py").arg(bids.join(stem)).arg(&live));
    eprintln!("{out}{checked}");

    let mut pybids = python("pybids_check.py");
    let found = run(pybids.arg(&bids));
    let found: serde_json::Value = serde_json::from_str(found.lines().last().unwrap_or_default()).unwrap();
    let expect = |kind: &str, name: &str| {
        assert_eq!(found[kind], serde_json::json!([format!("{stem}_{name}")]), "{kind}: {found}");
    };
    expect("trial_betas", "desc-trials_betas.nii.gz");
    expect("mask", "desc-glm_mask.nii.gz");
    expect("design", "desc-glm_design.tsv");
    expect("roi", "desc-roi_timeseries.tsv");
    expect("decode", "desc-decode_results.tsv");
}
