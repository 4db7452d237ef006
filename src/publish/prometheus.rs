//! A Prometheus endpoint: `GET /metrics` answers with the pipeline's counters, queue gauges
//! and latency histograms in the text exposition format. Plain HTTP/1.0 on std's
//! `TcpListener`: one scrape every few seconds needs no web framework.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// Largest request read, bytes.
const MAX_REQUEST: usize = 8192;

/// Binds `addr` (`HOST:PORT`); the listener is served by [`serve`].
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    super::listener::bind(addr, "metrics endpoint", "127.0.0.1:9464")
}

/// Answers scrapes until `done` is set.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>, done: Arc<AtomicBool>) {
    super::listener::serve(listener, "metrics", &done, |stream| answer(stream, &metrics));
}

fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
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
    let line = String::from_utf8_lossy(&buf);
    let (status, body) = if line.starts_with("GET /metrics ") || line.starts_with("GET / ") {
        ("200 OK", metrics.prometheus())
    } else {
        ("404 Not Found", "GET /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
