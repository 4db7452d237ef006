//! `mirage run`: the daemon.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::pipeline::metrics::MetricsSnapshot;
use crate::pipeline::Pipeline;

/// Command-line overrides of the configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `--ingest URI`.
    pub ingest: Option<String>,
    /// `--publish URI` (`none` disables the PUB socket).
    pub publish: Option<String>,
    /// `--record DIR` (`none` disables recording).
    pub record: Option<String>,
    /// `--stop-after N`.
    pub stop_after: Option<u64>,
    /// `--no-lsl`: no feedback outlet.
    pub no_lsl: bool,
    /// `--quiet`: no live status line.
    pub quiet: bool,
    /// `--metrics IP:PORT`: the Prometheus endpoint.
    pub metrics: Option<String>,
    /// `--mode decode|calibrate`.
    pub mode: Option<String>,
    /// `--protocol FILE`: the calibration protocol (the simulator, as ingest, follows it).
    pub protocol: Option<std::path::PathBuf>,
    /// `--set SECTION.KEY=VALUE` overrides, applied last.
    pub set: Vec<String>,
}

impl RunOptions {
    /// Applies the overrides to a loaded configuration.
    pub fn apply(&self, cfg: &mut Config) -> anyhow::Result<()> {
        if let Some(u) = &self.ingest {
            cfg.ingest.uri = u.clone();
        }
        if let Some(p) = &self.publish {
            cfg.publish.uri = (p != "none").then(|| p.clone());
        }
        if let Some(r) = &self.record {
            cfg.record.dir = (r != "none").then(|| r.clone());
        }
        if self.stop_after.is_some() {
            cfg.ingest.stop_after = self.stop_after;
        }
        if self.no_lsl {
            cfg.publish.lsl_feedback = None;
        }
        if let Some(m) = &self.metrics {
            cfg.publish.metrics = (m != "none").then(|| m.clone());
        }
        match self.mode.as_deref() {
            None => {}
            Some("decode") => cfg.decode.mode = crate::decode::Mode::Decode,
            Some("calibrate") => cfg.decode.mode = crate::decode::Mode::Calibrate,
            Some(m) => anyhow::bail!("--mode {m:?}: use decode or calibrate"),
        }
        if let Some(p) = &self.protocol {
            cfg.calibrate.protocol = Some(p.clone());
        }
        for s in &self.set {
            cfg.set(s)?;
        }
        if cfg.decode.mode == crate::decode::Mode::Calibrate && cfg.sim.protocol.is_none() {
            cfg.sim.protocol = cfg.calibrate.protocol.clone();
        }
        Ok(())
    }
}

/// Runs the pipeline until the source ends, `--stop-after` is reached or SIGINT/SIGTERM;
/// prints a live status line and, at exit, the latency summary.
pub fn run(mut cfg: Config, opts: &RunOptions) -> anyhow::Result<MetricsSnapshot> {
    opts.apply(&mut cfg)?;
    let handle = Pipeline::build(&cfg).map_err(|errors| anyhow::anyhow!("{}", errors.join("\n")))?;
    let signalled = watch_signals(handle.stop_flag())?;
    eprintln!("mirage: ingest {} ", handle.source());
    if let Some(ep) = &cfg.publish.uri {
        eprintln!("mirage: publishing on {ep}");
    }
    if let Some(d) = handle.session_dir() {
        eprintln!("mirage: recording to {}", d.display());
    }
    let tty = std::io::stderr().is_terminal();
    let mut ticks = 0u64;
    while !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        ticks += 1;
        if opts.quiet || ticks % 4 != 0 {
            continue;
        }
        let line = handle.metrics().snapshot().status_line();
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if ticks % 40 == 0 {
            eprintln!("{line}");
        }
    }
    let summary = handle.wait();
    if tty && !opts.quiet {
        eprintln!();
    }
    if signalled.load(Ordering::Acquire) {
        eprintln!("mirage: stopped by signal");
    }
    eprint!("{}", summary.summary());
    Ok(summary)
}

/// SIGINT/SIGTERM set `stop` (a clean, draining shutdown); a second signal exits at once.
/// Returns a flag that tells whether a signal arrived.
fn watch_signals(stop: Arc<AtomicBool>) -> anyhow::Result<Arc<AtomicBool>> {
    let signalled = Arc::new(AtomicBool::new(false));
    let seen = signalled.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("mirage/signals".into()).spawn(move || {
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                tracing::warn!("cannot install signal handlers");
                return;
            };
            for n in 0.. {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                if n > 0 {
                    eprintln!("\nmirage: second signal, exiting without draining");
                    std::process::exit(130);
                }
                eprintln!("\nmirage: stopping (signal); draining queues");
                seen.store(true, Ordering::Release);
                stop.store(true, Ordering::Release);
            }
        });
    })?;
    Ok(signalled)
}
