//! Exposed listeners: a sender outside `ingest.allow` is refused before any of its data is
//! read, and a listener beyond loopback without an allowlist does not start; with CURVE only
//! the listed keys get in, on the ingest and the PUB socket. Loopback only: the refused sender
//! connects from 127.0.0.2.

use crate::common;

use std::time::Duration;

use common::{as_strs, free_port, published, pyneal_daemon_args, run_with_timeout, Daemon};
use mirage_rt::curve::Certificate;
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

/// `mirage keygen NAME` in `dir`: (public, secret) certificate paths.
fn keygen(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let prefix = dir.join("keys").join(name);
    common::run(common::mirage().arg("keygen").arg(&prefix));
    (prefix.with_extension("key"), prefix.with_extension("key_secret"))
}

#[test]
fn curve_lets_in_only_the_listed_senders_and_subscribers_with_pyzmqs_own_key_loading() {
    let dir = tempfile::tempdir().unwrap();
    let [daemon_keys, scanner, laptop, stranger] =
        ["daemon", "scanner", "laptop", "stranger"].map(|n| keygen(dir.path(), n));
    let (ingest, publish) = (free_port(), free_port());
    let session = dir.path().join("session");
    let quoted = |p: &std::path::Path| format!("\"{}\"", p.display());
    std::fs::create_dir(dir.path().join("subscribers")).unwrap();
    std::fs::copy(&laptop.0, dir.path().join("subscribers/laptop.key")).unwrap();
    let settings = [
        format!("ingest.curve.secret={}", quoted(&daemon_keys.1)),
        format!("ingest.curve.clients=[{}]", quoted(&scanner.0)),
        format!("publish.curve.secret={}", quoted(&daemon_keys.1)),
        // A folder of public certificates, as pyzmq's configure_curve(location=…) takes.
        format!("publish.curve.clients=[{}]", quoted(&dir.path().join("subscribers"))),
    ];
    let mut args = vec![
        "--ingest".to_string(),
        format!("zmq://127.0.0.1:{ingest}"),
        "--publish".into(),
        format!("tcp://127.0.0.1:{publish}"),
        "--record".into(),
        session.display().to_string(),
        "--no-lsl".into(),
        "--stop-after".into(),
        "3".into(),
        "--set".into(),
        "glm.enabled=false".into(),
    ];
    for s in &settings {
        args.extend(["--set".to_string(), s.clone()]);
    }
    let mut daemon = Daemon::start(&as_strs(&args), dir.path());
    daemon.wait_for_log("publishing on", Duration::from_secs(60));

    // Subscribers (pyzmq, keys read by zmq.auth.load_certificate): listed, plain, unlisted.
    let address = format!("tcp://127.0.0.1:{publish}");
    let sub = |keys: &[&std::path::Path]| {
        let mut c = common::python("curve_peer.py");
        c.args(["sub", &address, "12"]).args(keys).stdout(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let subscribers = [sub(&[&daemon_keys.0, &laptop.1]), sub(&[]), sub(&[&daemon_keys.0, &stranger.1])];
    std::thread::sleep(Duration::from_secs(2));

    // Senders: an unlisted key, then a listed one wrongly given the stranger's key as the
    // daemon's (its handshake fails), then `mirage simulate` with the scanner's keys.
    let target = format!("tcp://127.0.0.1:{ingest}");
    for (server, own) in [(&daemon_keys.0, &stranger.1), (&stranger.0, &scanner.1)] {
        let mut push = common::python("curve_peer.py");
        push.args(["push", &target]).arg(server).arg(own);
        let out = common::run(&mut push);
        assert_eq!(out.trim(), "{\"sent\": false}", "{out}\n{}", daemon.log());
    }
    let mut sim = common::mirage();
    sim.args(["simulate", "--stream", &format!("zmq://127.0.0.1:{ingest}"), "--volumes", "3"]);
    sim.args(["--shape", "12,12,6", "--speed", "2"]).arg("--curve-server").arg(&daemon_keys.0);
    sim.arg("--curve-key").arg(&scanner.1);
    common::run(&mut sim);
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "refused a sender at 127.0.0.1: CURVE key {}",
            Certificate::read(&stranger.0).unwrap().public
        )),
        "{log}"
    );
    let st = published(&session, "status").pop().expect("a status message");
    assert_eq!(
        (st["received"].as_u64(), st["recorded"].as_u64(), st["rejected"].as_u64()),
        (Some(3), Some(3), Some(0)),
        "{st}"
    );
    assert!(st["errors"]["sender_refused"].as_u64() >= Some(1), "{st}");
    assert!(st["errors"]["subscriber_refused"].as_u64() >= Some(1), "{st}");

    let counts: Vec<serde_json::Value> = subscribers
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
        })
        .collect();
    assert_eq!(counts[0]["topics"]["volume"].as_u64(), Some(3), "the listed subscriber: {counts:?}");
    assert_eq!(counts[1]["topics"], serde_json::json!({}), "a plain subscriber reads nothing: {counts:?}");
    assert_eq!(counts[2]["topics"], serde_json::json!({}), "an unlisted key reads nothing: {counts:?}");
}

#[test]
fn curve_settings_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (public, secret) = keygen(dir.path(), "daemon");
    let port = free_port();
    for (settings, expect) in [
        (vec![format!("ingest.curve.secret=\"{}\"", secret.display())], "ingest.curve.clients: no client"),
        (
            vec![
                format!("publish.curve.secret=\"{}\"", public.display()),
                format!("publish.curve.clients=[\"{}\"]", public.display()),
            ],
            "publish.curve.secret",
        ),
    ] {
        let mut cmd = common::mirage();
        cmd.args([
            "run",
            "--no-lsl",
            "--quiet",
            "--record",
            "none",
            "--ingest",
            &format!("zmq://127.0.0.1:{port}"),
        ]);
        for s in settings {
            cmd.args(["--set", &s]);
        }
        let (status, out) = run_with_timeout(cmd.current_dir(dir.path()), Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{out}");
        assert!(out.contains(expect), "{out}");
    }
    // Guarded by CURVE alone, an exposed ingest is valid (no ingest.allow needed); the
    // certificates are read relative to the config file, wherever it runs from.
    let mut cmd = common::mirage();
    cmd.args(["check", "--config"]).arg(dir.path().join("exposed.toml")).current_dir("/");
    assert!(secret.starts_with(dir.path()) && public.starts_with(dir.path()));
    std::fs::write(
        dir.path().join("exposed.toml"),
        format!(
            "[ingest]\nuri = \"zmq://*:{port}\"\n[ingest.curve]\nsecret = \"keys/daemon.key_secret\"\nclients = [\"keys/daemon.key\"]\n"
        ),
    )
    .unwrap();
    let out = common::run(&mut cmd);
    assert!(out.contains("configuration is valid"), "{out}");
}

#[test]
fn a_token_that_no_listener_will_ask_for_is_warned_of_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    let check = |listen: &str, token: Option<&str>, env: Option<&str>| {
        let mut text = format!("[ingest]\nuri = \"sim://?volumes=2\"\n[console]\nlisten = \"{listen}\"\n");
        if let Some(t) = token {
            text.push_str(&format!("[security]\ntoken = \"{t}\"\n"));
        }
        std::fs::write(&config, text).unwrap();
        let mut cmd = common::mirage();
        cmd.arg("check").arg("--config").arg(&config).env_remove(mirage_rt::access::TOKEN_ENV);
        if let Some(e) = env {
            cmd.env(mirage_rt::access::TOKEN_ENV, e);
        }
        let (status, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
        assert!(status.success(), "{out}");
        out
    };
    let port = free_port();
    let loopback = format!("127.0.0.1:{port}");
    let out = check(&loopback, Some("abcdefghijklmnop1234"), None);
    assert!(out.contains("security.token is set but not enforced"), "{out}");
    let out = check(&loopback, None, Some("abcdefghijklmnop1234"));
    assert!(out.contains("MIRAGE_TOKEN is set but not enforced"), "{out}");
    let out = check(&loopback, None, None);
    assert!(!out.contains("not enforced"), "{out}");
    let out = check(&format!("0.0.0.0:{port}"), Some("abcdefghijklmnop1234"), None);
    assert!(!out.contains("not enforced") && out.contains("configuration is valid"), "{out}");
}
