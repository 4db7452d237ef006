//! The one HTTP stack of the daemon: every web listener (the console, the Prometheus endpoint)
//! serves an axum router through [`serve`], with a header deadline, a bound on concurrent
//! connections and a stop that does not wait on clients.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use crate::access::{Denied, Token};
use crate::metrics::Metrics;
use crate::reason::Reason;

/// Connections an HTTP listener refused because it already served its limit.
pub const HTTP_REFUSED: Reason =
    Reason::new("http_refused", "web connections (console, metrics) refused: the listener was at its limit");

/// Reasons this module counts.
pub const REASONS: &[Reason] = &[HTTP_REFUSED];

/// How one listener treats its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; one more is closed unanswered and counted.
    pub max_connections: usize,
    /// Time a client has to send a request's whole head, however it trickles in.
    pub header_timeout: Duration,
    /// Time a connection may live in all; `None` for streams that last the run (server-sent events).
    pub connection_timeout: Option<Duration>,
}

/// Serves `app` on `listener` until `stop` completes; then stops accepting and drops every open
/// connection at once, so no client can hold the daemon open.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    what: &'static str,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.count(HTTP_REFUSED);
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let served = match limits.connection_timeout {
                Some(t) => tokio::time::timeout(t, connection).await.unwrap_or(Ok(())),
                None => connection.await,
            };
            if let Err(e) = served {
                tracing::debug!("{what}: {e}");
            }
        });
    }
    connections.shutdown().await;
}

/// Completes once `done` is set (checked every 20 ms): the stop signal of a listener whose
/// owner ends it with a flag.
pub async fn when_set(done: Arc<std::sync::atomic::AtomicBool>) {
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Middleware body: serves `req` only with the run's token, when it has one (401 without,
/// 403 with another). `missing` is the 401's text.
pub async fn guard(token: Option<&Token>, missing: &'static str, req: Request, next: Next) -> Response {
    let Some(token) = token else { return next.run(req).await };
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match token.check(req.uri().query(), auth) {
        Ok(()) => next.run(req).await,
        Err(Denied::Missing) => (StatusCode::UNAUTHORIZED, missing).into_response(),
        Err(Denied::Wrong) => (StatusCode::FORBIDDEN, "wrong token\n").into_response(),
    }
}
