//! Exposed listeners: a sender outside `ingest.allow` is refused before any of its data is
//! read, and a listener beyond loopback without an allowlist does not start. Loopback only:
//! the refused sender connects from 127.0.0.2.

mod common;

use std::time::Duration;

use common::{as_strs, free_port, published, pyneal_daemon_args, run_with_timeout, Daemon};
use mirage_rt::ingest::IngestUri;
use mirage_rt::sender::VolumeSender;
use mirage_rt::sim::{SimConfig, Simulator};

#[test]
fn a_sender_outside_the_allowlist_is_refused_and_counted_while_an_allowed_one_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let session = dir.path().join("session");
    let extra = ["--stop-after", "2", "--set", "ingest.allow=[\"127.0.0.1\"]", "--set", "glm.enabled=false"];
    let daemon = Daemon::start(&as_strs(&pyneal_daemon_args(port, "none", &session, &extra)), dir.path());

    // From 127.0.0.2: the handshake is never answered, the greeting never read.
    let ctx = zmq::Context::new();
    let outsider = ctx.socket(zmq::PAIR).unwrap();
    outsider.set_rcvtimeo(1500).unwrap();
    outsider.set_linger(0).unwrap();
    outsider.connect(&format!("tcp://127.0.0.2:0;127.0.0.1:{port}")).unwrap();
    outsider.send("hello from elsewhere", 0).unwrap();
    assert!(matches!(outsider.recv_string(0), Err(zmq::Error::EAGAIN)), "{}", daemon.log());
    drop(outsider);

    // From 127.0.0.1: let in, both volumes recorded.
    let uri = IngestUri::parse(&format!("pyneal://127.0.0.1:{port}"), &SimConfig::default()).unwrap();
    let mut sender = VolumeSender::connect(&uri, 10.0).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let mut sim =
        Simulator::new(&SimConfig { volumes: 2, shape: Some([12, 12, 6]), ..Default::default() }).unwrap();
    for _ in 0..2 {
        let v = sim.next_volume().unwrap();
        sender.send(&v).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    }
    sender.finish();
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert!(log.contains("refused a sender at 127.0.0.2"), "{log}");
    let st = published(&session, "status").pop().expect("a status message");
    assert_eq!((st["received"].as_u64(), st["recorded"].as_u64()), (Some(2), Some(2)), "{st}");
    assert!(st["errors"]["sender_refused"].as_u64() >= Some(1), "{st}");
}

#[test]
fn a_listener_beyond_loopback_without_an_allowlist_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    for (args, key) in [
        (vec!["--ingest".to_string(), format!("zmq://*:{port}")], "ingest.uri"),
        (
            vec![
                "--ingest".to_string(),
                "sim://?volumes=2&shape=12,12,6".to_string(),
                "--results".to_string(),
                format!("0.0.0.0:{port}"),
            ],
            "publish.results",
        ),
    ] {
        let mut cmd = common::mirage();
        cmd.args([
            "run",
            "--no-lsl",
            "--quiet",
            "--console",
            "none",
            "--publish",
            "none",
            "--record",
            "none",
        ]);
        cmd.args(&args).current_dir(dir.path());
        let (status, out) = run_with_timeout(&mut cmd, Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{out}");
        assert!(out.contains(key) && out.contains("ingest.allow"), "{out}");
    }
    // On purpose, anyone: it starts (and is stopped by its volume count).
    let mut cmd = common::mirage();
    cmd.args(["run", "--no-lsl", "--quiet", "--console", "none", "--publish", "none", "--record", "none"]);
    cmd.args([
        "--ingest",
        "sim://?volumes=2&shape=12,12,6&speed=max",
        "--results",
        &format!("0.0.0.0:{port}"),
    ]);
    cmd.args(["--set", "ingest.allow=[\"*\"]"]).current_dir(dir.path());
    let (status, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(status.success(), "{out}");
}

/// The status line of `GET target` on 127.0.0.1:`port`, with an `Authorization` header if
/// given.
fn get_status(port: u16, target: &str, authorization: Option<&str>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

#[test]
fn web_endpoints_beyond_loopback_serve_only_the_token_printed_in_their_url() {
    let dir = tempfile::tempdir().unwrap();
    let (console, metrics) = (free_port(), free_port());
    let (c, m) = (format!("0.0.0.0:{console}"), format!("0.0.0.0:{metrics}"));
    let args = [
        "--ingest",
        "sim://?volumes=400&shape=12,12,6&tr=0.1",
        "--no-lsl",
        "--quiet",
        "--publish",
        "none",
        "--record",
        "none",
        "--console",
        &c,
        "--metrics",
        &m,
    ];
    let mut daemon = Daemon::start(&args, dir.path());
    daemon.wait_for_log("console at", Duration::from_secs(60));
    let log = daemon.log();
    let url = log.lines().find(|l| l.contains("console at")).unwrap().to_string();
    let token = url
        .split("?token=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(token.len() >= 16, "{url}");
    assert_eq!(log.matches(token).count(), 2, "printed in the console and metrics URLs only:\n{log}");

    let with = format!("?token={token}");
    let wrong = format!("?token={}", token.chars().rev().collect::<String>());
    for path in ["/", "/events"] {
        assert!(get_status(console, path, None).contains(" 401 "), "{path}");
        assert!(get_status(console, &format!("{path}{wrong}"), None).contains(" 403 "), "{path}");
        assert!(get_status(console, &format!("{path}{with}"), None).contains(" 200 "), "{path}");
    }
    assert!(get_status(metrics, "/metrics", None).contains(" 401 "));
    assert!(get_status(metrics, "/metrics", Some("Bearer nottherighttoken0")).contains(" 403 "));
    assert!(get_status(metrics, "/metrics", Some(&format!("Bearer {token}"))).contains(" 200 "));
    assert!(get_status(metrics, &format!("/metrics{with}"), None).contains(" 200 "));
    daemon.terminate();
    let (status, log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");
}
