//! `mirage bench` end to end on a small grid: the report's structure, percentiles that come
//! from real measurements (ordered, counted), counts that add up, and a plot file. No timing
//! thresholds: speed lives in the bench itself.

use crate::common;

use std::time::Duration;

use common::{mirage, run, run_with_timeout};

fn check_summary(name: &str, s: &serde_json::Value, want_count: Option<u64>) {
    let get = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{name}.{k} missing: {s}"));
    let count = s["count"].as_u64().unwrap();
    if let Some(n) = want_count {
        assert_eq!(count, n, "{name}: {s}");
    }
    if count > 0 {
        let (p50, p90, p99, p999, max) = (get("p50"), get("p90"), get("p99"), get("p999"), get("max"));
        assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "{name}: {s}");
    }
}

#[test]
fn bench_reports_ordered_percentiles_and_counts_that_add_up_for_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    for ingest in ["inproc", "pyneal", "zmq", "lsl"] {
        let json = dir.path().join(format!("{ingest}.json"));
        let svg = dir.path().join(format!("{ingest}.svg"));
        let out = run(mirage()
            .args(["bench", "--shape", "32,32,20", "--volumes", "40", "--rate", "max", "--ingest", ingest])
            .args(["--voxels-decoded", "600", "--rank", "4", "--json"])
            .arg(&json)
            .arg("--plot")
            .arg(&svg));
        assert!(out.contains("trigger to feedback"), "{out}");
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let c = &r["counts"];
        for k in ["sent", "received", "recorded", "published", "subscriber"] {
            assert_eq!(c[k], 40, "{ingest}: {k} in {c}");
        }
        assert_eq!(c["dropped"], 0, "{ingest}: {c}");
        assert_eq!(r["volumes"].as_array().unwrap().len(), 40);
        // The report's stages are the path's latency keys, the daemon's own (its status names
        // them), each with a latency for every volume.
        let stages: Vec<&str> = r["stages"].as_array().unwrap().iter().filter_map(|s| s.as_str()).collect();
        assert!(
            stages.len() >= 3 && stages[0] == "ingest" && stages.last() == Some(&"publish"),
            "{stages:?}"
        );
        for stage in &stages {
            check_summary(stage, &r["stages_ms"][stage], Some(40));
        }
        assert!(r["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["stage_ms"].as_array().unwrap().len() == stages.len()));
        check_summary("ingest_to_publish", &r["ingest_to_publish_ms"], Some(40));
        check_summary("trigger_to_feedback", &r["trigger_to_feedback_ms"], Some(40));
        // Every trial the GLM closed live was decoded off the volume path and received.
        let decodes = r["trial_decode_ms"]["count"].as_u64().unwrap();
        assert!(decodes >= 1, "{ingest}: no decodes: {}", r["trial_decode_ms"]);
        check_summary("trial_decode", &r["trial_decode_ms"], None);
        check_summary("decode_compute", &r["decode_compute_ms"], Some(decodes));
        // Each volume's trigger-to-feedback (sender's stamp to subscriber) covers the time the
        // daemon itself measured between receipt and publish.
        for v in r["volumes"].as_array().unwrap() {
            let t2f = (v["recv_time"].as_f64().unwrap() - v["acq_time"].as_f64().unwrap()) * 1e3;
            let inside: f64 = v["stage_ms"].as_array().unwrap().iter().filter_map(|x| x.as_f64()).sum();
            assert!(t2f + 0.01 >= inside, "{ingest}: volume {}: {t2f} ms < {inside} ms", v["index"]);
        }
        assert!(r["throughput_vps"].as_f64().unwrap() > 0.0);
        assert!(
            r["cpu_ms_per_volume"]["pipeline threads"].as_f64().unwrap() > 0.0,
            "{}",
            r["cpu_ms_per_volume"]
        );
        let plot = std::fs::read_to_string(&svg).unwrap();
        assert!(
            plot.starts_with("<svg") && plot.contains("<polyline") && plot.trim_end().ends_with("</svg>")
        );
    }
}

/// `GET path` over plain HTTP; the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn live_metrics_serve_prometheus_and_the_status_topic_carries_rolling_percentiles() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let session = dir.path().join("s");
    let addr = format!("127.0.0.1:{port}");
    let daemon = common::Daemon::start(
        &[
            "--ingest",
            "sim://?shape=32,32,20&volumes=80&speed=20",
            "--publish",
            "none",
            "--no-lsl",
            "--quiet",
            "--record",
            session.to_str().unwrap(),
            "--metrics",
            &addr,
            "--set",
            "publish.status_interval_s=0.5",
        ],
        dir.path(),
    );
    // Scrape while it runs.
    let mut scrapes = Vec::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while scrapes.len() < 2 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(700));
        if let Some(body) = http_get(port, "/metrics").filter(|b| b.contains("mirage_received_total")) {
            scrapes.push(body);
        }
    }
    let not_found = http_get(port, "/nothing");
    let (status, log) = daemon.wait(std::time::Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert!(scrapes.len() >= 2, "{log}");
    assert!(not_found.is_some_and(|b| b.starts_with("HTTP/1.0 404")), "{log}");
    let value = |body: &str, key: &str| -> f64 {
        body.lines().find(|l| l.starts_with(key)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap()
    };
    let body = &scrapes[scrapes.len() - 1];
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(value(body, "mirage_received_total ") >= value(&scrapes[0], "mirage_received_total "));
    // Histogram buckets are cumulative and end at the count.
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("mirage_latency_seconds_bucket{stage=\"motion\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() == 15 && buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(buckets[14], value(body, "mirage_latency_seconds_count{stage=\"motion\"}"));
    assert!(buckets[14] > 0.0);

    let statuses = common::published(&session, "status");
    let last = statuses.last().unwrap();
    let r = &last["rolling_ms"]["end_to_end"];
    assert_eq!(r["count"], 80, "{last}");
    assert!(r["p50"].as_f64().unwrap() <= r["p99"].as_f64().unwrap());
    assert!(r["p99"].as_f64().unwrap() <= r["max"].as_f64().unwrap());
}

#[test]
fn bench_decode_counts_the_weights_of_mirage_shapes_and_a_copied_decoder_gives_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("decode.json");
    let (voxels, rank) = (300usize, 16usize);
    run(mirage()
        .args(["bench-decode", "--device", "cpu", "--voxels", "300", "--rank", "16", "--trials", "6"])
        .args(["--compare-cpu", "2", "--tolerance", "0", "--json"])
        .arg(&json));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let outputs = [768usize, 77 * 1280, 91_168, 257 * 1024];
    let weights: usize = outputs.iter().map(|&o| rank.min(o) * (voxels + o)).sum();
    assert_eq!(r["weights"].as_u64(), Some(weights as u64), "{r}");
    check_summary("per_trial_ms", &r["per_trial_ms"], Some(6));
    check_summary("cpu_per_trial_ms", &r["cpu_per_trial_ms"], Some(2));
    let heads: Vec<&str> =
        r["comparison"].as_array().unwrap().iter().map(|c| c["head"].as_str().unwrap()).collect();
    assert_eq!(heads, ["image", "text", "lowlevel", "retrieval"]);
    for c in r["comparison"].as_array().unwrap() {
        assert!(c["max_abs_cpu"].as_f64().unwrap() > 0.0, "{c}");
        assert_eq!(c["max_abs_diff"].as_f64(), Some(0.0), "{c}");
    }
    let (status, out) = run_with_timeout(
        mirage().args(["bench-decode", "--device", "cuda:7", "--trials", "1"]),
        Duration::from_secs(60),
    );
    assert!(!status.success() && out.contains("cuda:7"), "{out}");
}

/// A stage the standard path does not have, standing in for a new stage's folder.
struct Probe;

impl mirage_rt::stage::Stage for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn process(&mut self, _frame: &mut mirage_rt::frame::Frame) -> Result<(), mirage_rt::stage::StageError> {
        Ok(())
    }
}

/// A new stage is its folder and one topology line: with nothing else changed, its latency is in
/// the status, the bench's JSON and plot, and the console's first event names it.
#[test]
fn a_stage_added_to_the_topology_shows_in_status_the_bench_and_the_console() {
    use mirage_rt::commands::bench::{bench_with, BenchArgs, Transport};
    use mirage_rt::pipeline::resolve::Topology;
    let dir = tempfile::tempdir().unwrap();
    let (json, session) = (dir.path().join("bench.json"), dir.path().join("session"));
    let mut config = mirage_rt::config::Config::default();
    config.console.listen = None;
    let args = BenchArgs {
        config,
        shape: [16, 16, 8],
        voxels_decoded: 0,
        rank: 4,
        volumes: 12,
        ingest: Transport::Inproc,
        rate: None,
        deadline_ms: None,
        json: Some(json.clone()),
        plot: Some(dir.path().join("bench.svg")),
        record: Some(session.clone()),
    };
    // Between motion and the GLM: the one line.
    let mut topology = Topology::standard();
    topology.0.insert(1, Box::new(|_| Ok(Some(Box::new(Probe) as Box<dyn mirage_rt::stage::Stage>))));
    let report = bench_with(&args, false, &topology).unwrap();

    let status = common::published_as::<mirage_rt::topic::StatusHeader>(&session).pop().expect("a status");
    let at = |stages: &[String], name: &str| stages.iter().position(|s| s == name);
    let probe = at(&status.stages, "probe").expect("the status names the stage");
    assert_eq!(Some(probe), at(&status.stages, "motion").map(|m| m + 1), "{:?}", status.stages);
    assert_eq!(status.stage_latency_ms["probe"].count, 12, "{:?}", status.stage_latency_ms);

    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["stages"], serde_json::json!(status.stages), "the bench's stages are the status's");
    check_summary("probe", &r["stages_ms"]["probe"], Some(12));
    for v in r["volumes"].as_array().unwrap() {
        assert!(v["stage_ms"][probe].as_f64().is_some_and(|ms| ms >= 0.0), "{v}");
    }
    assert_eq!(report.stages, status.stages);
    assert!(report.table().lines().any(|l| l.starts_with("probe ")), "{}", report.table());
    let plot = std::fs::read_to_string(dir.path().join("bench.svg")).unwrap();
    assert!(plot.contains(">probe</text>"), "the plot's legend names the stage");

    let hello =
        common::report_events(&session.join("report.html")).into_iter().next().expect("a first event");
    assert_eq!(hello["topic"], "hello");
    assert_eq!(hello["stages"], serde_json::json!(status.stages), "{hello}");
}
