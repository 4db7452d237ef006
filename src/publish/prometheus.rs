//! A Prometheus endpoint: `GET /metrics` answers with the pipeline's counters, queue gauges
//! and latency histograms in the text exposition format. Plain HTTP/1.0 on std's
//! `TcpListener`: one scrape every few seconds needs no web framework.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::access::{Denied, Token};
use crate::metrics::Metrics;

/// Largest request read, bytes.
const MAX_REQUEST: usize = 8192;

/// Binds `addr` (`HOST:PORT`); the listener is served by [`serve`].
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    super::listener::bind(addr, "metrics endpoint", "127.0.0.1:9464")
}

/// Answers scrapes until `done` is set; with a `token`, only those that present it
/// (`?token=…` or `Authorization: Bearer …`, as Prometheus' `authorization` setting sends).
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>, done: Arc<AtomicBool>, token: Option<Token>) {
    super::listener::serve(listener, "metrics", &done, |stream| answer(stream, &metrics, token.as_ref()));
}

/// The request line's target and the `Authorization` header of a request's head.
fn target_and_authorization(head: &str) -> (&str, Option<&str>) {
    let mut lines = head.lines();
    let target = lines.next().and_then(|l| l.split(' ').nth(1)).unwrap_or_default();
    let auth = lines
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("authorization")))
        .map(|(_, v)| v.trim());
    (target, auth)
}

fn answer(mut stream: TcpStream, metrics: &Metrics, token: Option<&Token>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let (target, auth) = target_and_authorization(&head);
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
    let denied = token.map(|t| t.check(query, auth)).and_then(Result::err);
    let (status, body) = match denied {
        Some(Denied::Missing) => ("401 Unauthorized", "this endpoint needs the run's token\n".to_string()),
        Some(Denied::Wrong) => ("403 Forbidden", "wrong token\n".to_string()),
        None if head.starts_with("GET ") && (path == "/metrics" || path == "/") => {
            ("200 OK", metrics.prometheus())
        }
        None => ("404 Not Found", "GET /metrics\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
