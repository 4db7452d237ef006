//! The operator's console: a local web page that shows the loop working, live — motion, ROI
//! feedback with trial onsets, each decoded trial beside its best gallery matches and the truth,
//! latency per stage, errors and drops, calibration progress — and, at the end of a recorded
//! run, the same page with the whole run embedded as `report.html`.
//!
//! The publish thread hands each message to [`ConsoleFeed::push`] (never blocking; a full feed
//! drops and counts); the console thread turns messages into page events ([`ConsoleState`]),
//! keeps the run's history and serves `/` (the page) and `/events` (server-sent events: the
//! history, then live events) with axum on a single-threaded tokio runtime.

mod server;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use self::state::{ConsoleInput, ConsoleState};
use crate::decode::gallery::Gallery;
use crate::metrics::{Metrics, Reason};

/// The console's server failed to start or serve.
pub const CONSOLE: Reason = Reason::new("console", "console server failures (runtime, bind, serve)");
/// The offline report could not be written.
pub const REPORT_IO: Reason = Reason::new("report_io", "report.html writes that failed");
/// Page events a slow browser missed.
pub const CONSOLE_LAGGED: Reason =
    Reason::new("console_lagged", "page events a slow browser connection skipped");
/// Events the console's queue had no room for.
pub const CONSOLE_DROPPED: Reason =
    Reason::new("console_dropped", "events dropped: the console's queue was full");
/// What the console counts.
pub const REASONS: &[Reason] = &[CONSOLE, REPORT_IO, CONSOLE_LAGGED, CONSOLE_DROPPED];

/// The page: self-contained (no CDN: scanner networks are offline).
pub const PAGE: &str = include_str!("page.html");

/// Messages waiting for the console thread; beyond this the feed drops (counted).
const FEED_CAPACITY: usize = 4096;

/// `[console]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Address of the web page, `IP:PORT` (`None`, written `"none"`: no page).
    #[serde(with = "crate::settings::none_string")]
    pub listen: Option<String>,
    /// Write `report.html` (the page with the whole run) into the session folder at the end.
    pub report: bool,
}

impl Default for ConsoleConfig {
    fn default() -> ConsoleConfig {
        ConsoleConfig { listen: None, report: true }
    }
}

impl ConsoleConfig {
    /// Where the report of a run recorded into `session_dir` goes, when reports are on.
    pub fn report_path(&self, session_dir: Option<&std::path::Path>) -> Option<PathBuf> {
        session_dir.filter(|_| self.report).map(|d| d.join("report.html"))
    }

    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        match &self.listen {
            Some(a) if a.parse::<std::net::SocketAddr>().is_err() => {
                vec![format!("console.listen {a:?}: use IP:PORT, e.g. 127.0.0.1:8765")]
            }
            _ => Vec::new(),
        }
    }
}

/// The publish thread's end of the console: hands messages over without blocking.
pub struct ConsoleFeed {
    tx: tokio::sync::mpsc::Sender<ConsoleInput>,
    metrics: Arc<Metrics>,
}

impl ConsoleFeed {
    /// Passes a published message on; a full feed drops it and counts `console_dropped`.
    pub fn push(&self, input: ConsoleInput) {
        if self.tx.try_send(input).is_err() {
            self.metrics.count(CONSOLE_DROPPED);
        }
    }
}

/// What the console thread needs.
pub struct ConsoleSetup {
    /// The page's address (`None`: only the report).
    pub listen: Option<String>,
    /// Fields of the page's `hello` event: source, mode, thresholds.
    pub hello: Map<String, Value>,
    /// The known truth decodes are scored against (the decode stage's gallery, shared).
    pub gallery: Option<std::sync::Arc<Gallery>>,
    /// Where to write the report at the end.
    pub report: Option<PathBuf>,
    /// The token every request must present (when the page listens beyond loopback).
    pub token: Option<crate::access::Token>,
}

/// Binds the page's address (so a busy port is an error at start) and starts the console
/// thread; it ends, after writing the report, once the feed is dropped.
pub fn start(setup: ConsoleSetup, metrics: Arc<Metrics>) -> Result<(ConsoleFeed, JoinHandle<()>), String> {
    let listener = match &setup.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("console: cannot listen on {addr}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| format!("console: {addr}: {e}"))?;
            Some(l)
        }
        None => None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(FEED_CAPACITY);
    let feed = ConsoleFeed { tx, metrics: metrics.clone() };
    let state = ConsoleState::new(setup.hello, setup.gallery);
    let (report, token) = (setup.report, setup.token);
    let thread = std::thread::Builder::new()
        .name("mirage/console".into())
        .spawn(move || server::run(listener, state, rx, report, token, &metrics))
        .map_err(|e| format!("console thread: {e}"))?;
    Ok((feed, thread))
}
