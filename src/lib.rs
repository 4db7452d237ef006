//! mirage-rt: a scanner-side daemon that turns a live fMRI series into decoded mental images.
//!
//! A volume travels `ingest → motion → glm → decode → publish`, each stage a plain struct on
//! its own thread (see [`pipeline`]); every received volume is recorded first ([`io::session`]).
//! [`sim`] stands in for the scanner with exact ground truth.
#![deny(missing_docs)]
// Geometry code indexes 3x3 and 4x4 matrices by row and column; iterators would hide that.
#![allow(clippy::needless_range_loop)]

pub mod access;
pub mod bench;
pub mod bids;
pub mod calibrate;
pub mod clock;
pub mod commands;
pub mod config;
pub mod console;
pub mod curve;
pub mod decode;
pub mod event;
pub mod feedback;
pub mod frame;
pub mod fuzzing;
pub mod glm;
pub mod http;
pub mod ingest;
pub mod io;
pub mod listen;
pub mod message;
pub mod metrics;
pub mod motion;
pub mod pipeline;
pub mod publish;
pub mod queue;
pub mod reason;
pub mod rng;
pub mod scanner;
pub mod sender;
pub mod settings;
pub mod sim;
pub mod smooth;
pub mod stage;
pub mod topic;
pub mod volume;

/// Logs to stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || LogWriter { clear_line: tty })
        .with_ansi(tty)
        .with_target(false)
        .try_init();
}

/// stderr for one log event; on a terminal it first clears the line, so that a log line does
/// not run into the status line `mirage run` redraws in place (which comes back at its next tick).
struct LogWriter {
    clear_line: bool,
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if std::mem::take(&mut self.clear_line) {
            err.write_all(b"\r\x1b[2K")?;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
