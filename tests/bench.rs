//! `mirage bench` end to end on a small grid: the report's structure, percentiles that come
//! from real measurements (ordered, counted), counts that add up, and a plot file. No timing
//! thresholds: speed lives in the bench itself.

mod common;

use common::{mirage, run};

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
        for stage in ["ingest", "motion", "glm", "decode", "publish"] {
            check_summary(stage, &r["stages_ms"][stage], Some(40));
        }
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
        assert!(r["cpu_ms_per_volume"]["pipeline threads"].as_f64().unwrap() > 0.0, "{}", r["cpu_ms_per_volume"]);
        let plot = std::fs::read_to_string(&svg).unwrap();
        assert!(plot.starts_with("<svg") && plot.contains("<polyline") && plot.trim_end().ends_with("</svg>"));
    }
}
