//! Every listener (the results server, the metrics endpoint, the console) against hostile
//! clients on loopback: connections that trickle a partial request or send nothing, by the
//! hundred, do not stall a client that asks properly, and SIGTERM ends the daemon whatever
//! they do.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connections held open against one listener, each having sent `partial` (maybe nothing).
fn hold(port: u16, n: usize, partial: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            let _ = s.write_all(partial);
            Some(s)
        })
        .collect()
}

/// One request as a well-behaved client makes it (the whole request at once); its answer and
/// how long it took. A client that gets no answer within 10 s counts as stalled; one that
/// cannot connect gets an empty answer.
fn ask(port: u16, request: &[u8]) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.write_all(request).is_ok() {
            let _ = s.read_to_end(&mut out);
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

/// The three listeners' well-formed requests and what their answer holds.
fn requests(ports: [u16; 3]) -> [(u16, &'static [u8], &'static str); 3] {
    let [results, metrics, console] = ports;
    [
        (results, b"0003", "\"foundResults\":true"),
        (metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"),
        (console, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"),
    ]
}

/// Median and largest of a listener's legitimate latencies, in ms.
fn summary(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

/// Twenty legitimate requests to each listener, each answered in full; their latencies.
fn legitimate(ports: [u16; 3], what: &str) -> Vec<(f64, f64)> {
    requests(ports)
        .iter()
        .map(|(port, request, want)| {
            let ms = (0..20)
                .map(|_| {
                    let (answer, took) = ask(*port, request);
                    assert!(answer.contains(want), "{what}, port {port}: {answer:?}");
                    took.as_secs_f64() * 1e3
                })
                .collect();
            summary(ms)
        })
        .collect()
}

/// A daemon on `ingest` recording to `record` with its results server, metrics endpoint and
/// console on `ports` (in that order).
fn with_listeners(ingest: &str, record: &str, ports: [u16; 3], dir: &std::path::Path) -> common::Daemon {
    let [results, metrics, console] = ports.map(|p| format!("127.0.0.1:{p}"));
    let (results, console) =
        (format!("publish.results=\"{results}\""), format!("console.listen=\"{console}\""));
    let args =
        ["--ingest", ingest, "--publish", "none", "--no-lsl", "--record", record, "--metrics", &metrics];
    common::Daemon::start(&[&args[..], &["--set", &results, "--set", &console]].concat(), dir)
}

#[test]
fn slow_clients_and_floods_stall_no_listener_and_sigterm_ends_the_daemon_regardless() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [common::free_port(), common::free_port(), common::free_port()];
    let session = dir.path().join("s");
    let record = session.to_str().unwrap();
    let daemon = with_listeners("sim://?shape=16,16,8&volumes=100000&tr=0.2", record, ports, dir.path());
    // Until volume 3 is published (each try is answered at once, found or not).
    let mut found = false;
    for _ in 0..600 {
        found = ask(ports[0], b"0003").0.contains("\"foundResults\":true");
        if found {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(found, "{}", daemon.log());
    let quiet = legitimate(ports, "no attack");

    // 200 connections per listener that sent the first byte of a request and nothing more.
    let trickling: Vec<Vec<TcpStream>> = ports.iter().map(|&p| hold(p, 200, b"G")).collect();
    let slow = legitimate(ports, "slow clients");
    // Then 300 more per listener that send nothing at all, held beside the first.
    let idle: Vec<Vec<TcpStream>> = ports.iter().map(|&p| hold(p, 300, b"")).collect();
    let flooded = legitimate(ports, "slow clients and a flood");
    let held: usize = trickling.iter().chain(&idle).map(Vec::len).sum();
    assert_eq!(held, 1500);
    // The daemon keeps at most its limit of them open (64 a listener), not 1,500.
    let descriptors = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid())).unwrap().count();
    assert!(descriptors < 3 * 64 + 200, "{descriptors} descriptors open");

    let (scrape, _) = ask(ports[1], b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let evicted = scrape
        .lines()
        .find(|l| l.starts_with("mirage_errors_total{reason=\"listener_evicted\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(evicted.is_some_and(|n| n > 0.0), "{scrape}");

    // SIGTERM with every attacking connection still open.
    let start = Instant::now();
    daemon.terminate();
    let (status, log) = daemon.wait(Duration::from_secs(30));
    let exit = start.elapsed();
    assert!(status.success(), "{log}");
    assert!(log.contains("stopped by signal"), "{log}");
    for (name, (q, (s, f))) in
        ["results", "metrics", "console"].iter().zip(quiet.iter().zip(slow.iter().zip(&flooded)))
    {
        eprintln!(
            "{name}: legitimate p50/max ms: quiet {:.2}/{:.2}, 200 slow {:.2}/{:.2}, +300 idle {:.2}/{:.2}",
            q.0, q.1, s.0, s.1, f.0, f.1
        );
    }
    eprintln!("daemon descriptors with {held} hostile connections held: {descriptors}");
    eprintln!("exit after SIGTERM with {held} hostile connections open: {:.0} ms", exit.as_secs_f64() * 1e3);
    drop((trickling, idle));
}

#[test]
fn a_run_that_ends_by_itself_exits_with_slow_clients_still_attached() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [common::free_port(), common::free_port(), common::free_port()];
    let mut daemon = with_listeners("sim://?shape=16,16,8&volumes=60&tr=0.1", "none", ports, dir.path());
    daemon.wait_for_log("metrics", Duration::from_secs(30));
    // Wait until every listener answers, then attach clients that each sent one byte.
    for (port, request, want) in requests(ports) {
        let mut ok = false;
        for _ in 0..600 {
            let (answer, _) = ask(port, request);
            ok = answer.contains(want) || (port == ports[0] && answer.contains("foundResults"));
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ok, "port {port}: {}", daemon.log());
    }
    let slow: Vec<Vec<TcpStream>> = ports.iter().map(|&p| hold(p, 20, b"G")).collect();
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    drop(slow);
}

/// A listener: its name in the error, its flag, and its value for a port.
type Listener = (&'static str, &'static str, fn(u16) -> String);

#[test]
fn any_listener_that_cannot_bind_ends_the_start_naming_it_whatever_else_is_on() {
    let dir = tempfile::tempdir().unwrap();
    // The listeners a run can open: (name in the error, its flag, how its value is written).
    let listeners: [Listener; 5] = [
        ("results server", "--results", |p| format!("127.0.0.1:{p}")),
        ("metrics endpoint", "--metrics", |p| format!("127.0.0.1:{p}")),
        ("console", "--console", |p| format!("127.0.0.1:{p}")),
        ("publish", "--publish", |p| format!("tcp://127.0.0.1:{p}")),
        ("ingest", "--ingest", |p| format!("zmq://127.0.0.1:{p}")),
    ];
    for (k, (name, _, _)) in listeners.iter().enumerate() {
        // Its port held by another program; every other listener on a free port.
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let mut args: Vec<String> =
            vec!["run".into(), "--no-lsl".into(), "--quiet".into(), "--record".into()];
        args.push(dir.path().join(format!("s{k}")).display().to_string());
        for (j, (_, flag, value)) in listeners.iter().enumerate() {
            args.push(flag.to_string());
            args.push(value(if j == k { port } else { common::free_port() }));
        }
        let (status, out) = common::run_with_timeout(
            common::mirage().args(&args).current_dir(dir.path()),
            Duration::from_secs(60),
        );
        assert_eq!(status.code(), Some(2), "{name} busy: {out}");
        assert!(out.contains(&port.to_string()), "{name} busy: the error names its address:\n{out}");
        eprintln!("{name} busy: {}", out.lines().find(|l| l.contains(&port.to_string())).unwrap_or_default());
        drop(busy);
    }
}
