//! The console thread: feeds messages through [`ConsoleState`], broadcasts page events and
//! serves the page and its event stream.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast;

use super::{ConsoleInput, ConsoleState, PAGE};
use crate::access::Token;
use crate::listen::Limits;
use crate::metrics::Metrics;

/// Page events a slow page may fall behind by before it skips some (counted).
const BROADCAST_CAPACITY: usize = 4096;

/// A few pages at once; each must send its request head within five seconds, and an event
/// stream then lasts the run.
const LIMITS: Limits =
    Limits { max_connections: 64, request_timeout: Duration::from_secs(5), connection_timeout: None };

/// The 401's text.
const NEEDS_TOKEN: &str = "this console needs its token: open the URL mirage printed\n";

/// The state and the live event channel, shared by the feed task and every page.
struct Shared {
    state: Mutex<ConsoleState>,
    live: broadcast::Sender<Arc<str>>,
    metrics: Arc<Metrics>,
}

/// Runs the console until the feed closes; then sends the `end` event, writes the report and
/// gives pages a moment to read the end.
pub(super) fn run(
    listener: Option<std::net::TcpListener>,
    state: ConsoleState,
    mut feed: tokio::sync::mpsc::Receiver<ConsoleInput>,
    report: Option<PathBuf>,
    token: Option<Token>,
    metrics: &Arc<Metrics>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("console: {e}");
            metrics.count(super::CONSOLE);
            return;
        }
    };
    let (live, _) = broadcast::channel(BROADCAST_CAPACITY);
    let shared = Arc::new(Shared { state: Mutex::new(state), live, metrics: metrics.clone() });
    rt.block_on(async {
        let serving = listener.is_some();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(l) = listener {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    let app = Router::new()
                        .route("/", get(|| async { Html(PAGE) }))
                        .route("/events", get(events))
                        .layer(middleware::from_fn(move |req: Request, next: Next| {
                            let token = token.clone();
                            async move { crate::http::guard(token.as_ref(), NEEDS_TOKEN, req, next).await }
                        }))
                        .with_state(shared.clone());
                    let stopped = async move {
                        let _ = stopped.await;
                    };
                    tokio::spawn(crate::http::serve(l, app, LIMITS, metrics.clone(), "console", stopped));
                }
                Err(e) => {
                    tracing::error!("console: {e}");
                    metrics.count(super::CONSOLE);
                }
            }
        }
        while let Some(input) = feed.recv().await {
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            for event in state.process(&input) {
                // No page connected is not an error.
                let _ = shared.live.send(event);
            }
        }
        {
            let state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(path) = &report {
                if let Err(e) = std::fs::write(path, state.report_html(PAGE, Some(path))) {
                    tracing::error!("console: report {}: {e}", path.display());
                    metrics.count(super::REPORT_IO);
                }
            }
            let _ = shared.live.send(state.end_event(report.as_deref()));
        }
        if serving {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let _ = stop.send(());
    });
}

/// `/events`: the backlog, then live events, as server-sent events.
async fn events(State(shared): State<Arc<Shared>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (backlog, rx) = {
        // Subscribing under the lock: nothing is missed or sent twice between the two.
        let state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.backlog(), shared.live.subscribe())
    };
    let metrics = shared.metrics.clone();
    let live = futures_util::stream::unfold((rx, metrics), |(mut rx, metrics)| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((e, (rx, metrics))),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    (0..n).for_each(|_| metrics.count(super::CONSOLE_LAGGED));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures_util::stream::iter(backlog).chain(live).map(|e| Ok(Event::default().data(&*e)));
    Sse::new(stream).keep_alive(KeepAlive::default())
}
