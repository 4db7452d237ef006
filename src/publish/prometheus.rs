//! A Prometheus endpoint: `GET /metrics` answers with the pipeline's counters, queue gauges
//! and latency histograms in the text exposition format, served by [`crate::http`] like the
//! console.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::access::Token;
use crate::listen::Limits;
use crate::metrics::Metrics;

/// A scraper is one client every few seconds: a few connections at once is plenty, and a
/// scrape (head and answer) has two seconds.
const LIMITS: Limits = Limits {
    max_connections: 16,
    request_timeout: Duration::from_secs(2),
    connection_timeout: Some(Duration::from_secs(2)),
};

/// The 401's text.
const NEEDS_TOKEN: &str = "this endpoint needs the run's token\n";

/// Binds `addr` (`HOST:PORT`); the listener is served by [`serve`].
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    crate::listen::bind(addr, "metrics endpoint", "127.0.0.1:9464")
}

/// Answers scrapes until `done` is set; with a `token`, only those that present it
/// (`?token=…` or `Authorization: Bearer …`, as Prometheus' `authorization` setting sends).
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>, done: Arc<AtomicBool>, token: Option<Token>) {
    crate::listen::block_on("metrics endpoint", || async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return tracing::error!("metrics endpoint: {e}"),
        };
        let scrape = {
            let metrics = metrics.clone();
            move || {
                let body = metrics.prometheus();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }
        };
        let app = Router::new()
            .route("/", get(scrape.clone()))
            .route("/metrics", get(scrape))
            .fallback(|| async { (StatusCode::NOT_FOUND, "GET /metrics\n").into_response() })
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                let token = token.clone();
                async move { crate::http::guard(token.as_ref(), NEEDS_TOKEN, req, next).await }
            }));
        let stop = crate::listen::when_set(done);
        crate::http::serve(listener, app, LIMITS, metrics, "metrics endpoint", stop).await;
    });
}
