//! The one HTTP stack of the daemon: every web listener (the console, the Prometheus endpoint)
//! is an axum router served by [`serve`] on hyper's HTTP/1, under [`crate::listen`]'s limits.

use std::future::Future;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use crate::access::{Denied, Token};
use crate::listen::{Limits, Requested};
use crate::metrics::Metrics;

/// Serves `app` on `listener` until `stop` completes; a request's head must arrive within
/// `limits.request_timeout`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    what: &'static str,
    stop: impl Future<Output = ()>,
) {
    crate::listen::serve(listener, limits, metrics, what, stop, move |stream, requested: Requested| {
        // The request's head has been read once the router is called.
        let app = app.clone().layer(axum::middleware::map_request(move |req: Request| {
            requested.mark();
            async move { req }
        }));
        let service = TowerToHyperService::new(app);
        async move {
            // One request per connection: an idle kept-alive connection would hold a slot.
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.request_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("{what}: {e}");
            }
        }
    })
    .await;
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
