//! The daemon's TCP listeners (the console, the Prometheus endpoint, the results server): bound
//! to a stated address, each serving many clients at once, with a deadline per request, a bound
//! on open connections and a stop that never waits on a client.
//!
//! When a listener is full, the connection that has waited longest without sending its request
//! is closed (counted) to make room: a client that sends its request at once is served however
//! many idle connections an attacker holds. Only when every open connection has sent its
//! request is the new one closed unanswered (counted).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::reason::Reason;

/// Connections a full listener closed unanswered: every open one had sent its request.
pub const LISTENER_FULL: Reason = Reason::new(
    "listener_full",
    "connections closed unanswered: the console, metrics or results listener was full of answered ones",
);
/// Connections closed before their request to make room for a new one.
pub const LISTENER_EVICTED: Reason = Reason::new(
    "listener_evicted",
    "connections closed before sending a request, to make room in a full console, metrics or results listener",
);

/// Reasons this module counts.
pub const REASONS: &[Reason] = &[LISTENER_FULL, LISTENER_EVICTED];

/// Set by a connection's handler once its request has arrived: from then on it is not closed
/// to make room.
#[derive(Clone, Default)]
pub struct Requested(Arc<AtomicBool>);

impl Requested {
    /// The request has arrived.
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// An open connection, as the accept loop keeps it.
struct Open {
    task: tokio::task::AbortHandle,
    requested: Requested,
}

/// How one listener treats its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; one more is closed unanswered and counted.
    pub max_connections: usize,
    /// Time a client has to send its whole request (an HTTP head), however it trickles in.
    pub request_timeout: Duration,
    /// Time a connection may live in all; `None` for streams that last the run (server-sent events).
    pub connection_timeout: Option<Duration>,
}

/// Binds `addr` (`IP:PORT`) for `what` (named in errors), non-blocking, for [`serve`]; warns when
/// it is reachable from the network. `example` is a valid address for the error message.
pub fn bind(addr: &str, what: &str, example: &str) -> Result<std::net::TcpListener, String> {
    let sock: std::net::SocketAddr =
        addr.parse().map_err(|_| format!("{what} {addr:?}: want IP:PORT, e.g. {example}"))?;
    if !sock.ip().is_loopback() {
        tracing::warn!("{what} {sock} is reachable from the network");
    }
    let l = std::net::TcpListener::bind(sock).map_err(|e| format!("{what} {sock}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| format!("{what} {sock}: {e}"))?;
    Ok(l)
}

/// Hands each connection to `answer` on a task of its own until `stop` completes, at most
/// `limits.max_connections` at once (see the module's docs for a full listener) and each for at
/// most `limits.connection_timeout`; then drops every open connection.
pub async fn serve<F, A>(
    listener: tokio::net::TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
    what: &'static str,
    stop: impl Future<Output = ()>,
    answer: F,
) where
    F: Fn(TcpStream, Requested) -> A,
    A: Future<Output = ()> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    let mut open: std::collections::VecDeque<Open> = std::collections::VecDeque::new();
    let mut warned_full = false;
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                tracing::warn!("{what}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        open.retain(|c| !c.task.is_finished());
        if open.len() >= limits.max_connections {
            if !std::mem::replace(&mut warned_full, true) {
                tracing::warn!("{what}: {} connections open, making room (counted)", limits.max_connections);
            }
            match open.iter().position(|c| !c.requested.is_set()) {
                Some(oldest_idle) => {
                    if let Some(c) = open.remove(oldest_idle) {
                        c.task.abort();
                    }
                    metrics.count(LISTENER_EVICTED);
                }
                None => {
                    metrics.count(LISTENER_FULL);
                    drop(stream);
                    continue;
                }
            }
        }
        let requested = Requested::default();
        let answered = answer(stream, requested.clone());
        let timeout = limits.connection_timeout;
        let task = connections.spawn(async move {
            match timeout {
                Some(t) => {
                    let _ = tokio::time::timeout(t, answered).await;
                }
                None => answered.await,
            }
        });
        open.push_back(Open { task, requested });
    }
    connections.shutdown().await;
}

/// Runs `serve_on` (a listener's [`serve`]) on a runtime of this thread's own until it returns;
/// the listener threads (metrics, results) are plain threads of the runner.
pub fn block_on<F: Future<Output = ()>>(what: &str, serve_on: impl FnOnce() -> F) {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(serve_on()),
        Err(e) => tracing::error!("{what}: {e}"),
    }
}

/// Completes once `done` is set (checked every 20 ms): the stop of a listener whose owner ends
/// it with a flag.
pub async fn when_set(done: Arc<AtomicBool>) {
    while !done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
