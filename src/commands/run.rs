//! `mirage run`: the daemon.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::metrics::MetricsSnapshot;
use crate::pipeline::Pipeline;

/// Command-line overrides of the configuration (`mirage run`'s flags).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RunOptions {
    /// Source: pyneal://HOST:PORT, zmq://HOST:PORT, lsl://NAME, file://PATH?speed=…, sim://?…
    #[arg(long)]
    pub ingest: Option<String>,
    /// ZMQ PUB address tcp://HOST:PORT, or `none`.
    #[arg(long)]
    pub publish: Option<String>,
    /// Session folder, or `none`.
    #[arg(long)]
    pub record: Option<String>,
    /// Stop after this many volumes.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// End the run when no volume has come for this many seconds after the last one.
    #[arg(long, value_name = "S")]
    pub idle_exit: Option<f64>,
    /// Do not create the LSL feedback outlet.
    #[arg(long)]
    pub no_lsl: bool,
    /// No live status line.
    #[arg(long)]
    pub quiet: bool,
    /// Serve Prometheus metrics at IP:PORT (GET /metrics).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Serve pyneal-style results (a volume's 4-digit index in, one JSON line out) at IP:PORT,
    /// or `none`.
    #[arg(long)]
    pub results: Option<String>,
    /// Serve the operator's console (a web page) at IP:PORT, or `none`.
    #[arg(long)]
    pub console: Option<String>,
    /// decode, or calibrate: fit the alignment head on the protocol's trials, then decode
    /// with it.
    #[arg(long)]
    pub mode: Option<String>,
    /// Calibration protocol (calibration/*.toml); the simulator follows it.
    #[arg(long)]
    pub protocol: Option<std::path::PathBuf>,
    /// Override any configuration key, SECTION.KEY=VALUE (repeatable), e.g. motion.enabled=false.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
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
        if self.idle_exit.is_some() {
            cfg.ingest.idle_exit_s = self.idle_exit;
        }
        if self.no_lsl {
            cfg.publish.lsl_feedback = None;
        }
        if let Some(m) = &self.metrics {
            cfg.publish.metrics = (m != "none").then(|| m.clone());
        }
        if let Some(r) = &self.results {
            cfg.publish.results = (r != "none").then(|| r.clone());
        }
        if let Some(c) = &self.console {
            cfg.console.listen = (c != "none").then(|| c.clone());
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
    super::sim_model::resolve(&mut cfg, std::io::stderr().is_terminal() && !opts.quiet)?;
    let fail = |errors: Vec<String>| anyhow::anyhow!("{}", errors.join("\n"));
    let resolved = crate::pipeline::resolve::Resolved::new(&cfg).map_err(fail)?;
    let token = resolved.web_token.clone();
    let handle = Pipeline::start(resolved).map_err(fail)?;
    let signalled = watch_signals(handle.stop_flag())?;
    eprintln!("mirage: ingest {} ", handle.source());
    if let Some(ep) = &cfg.publish.uri {
        eprintln!("mirage: publishing on {ep}");
    }
    if let Some(d) = handle.session_dir() {
        eprintln!("mirage: recording to {}", d.display());
    }
    if let Some(addr) = &cfg.publish.results {
        eprintln!("mirage: results server at {addr} (send a volume index as 4 digits, e.g. 0024)");
    }
    // The token is printed once, here, inside the URLs that need it.
    let query = token.as_ref().map(|t| format!("?token={}", t.as_str())).unwrap_or_default();
    if let Some(addr) = &cfg.console.listen {
        eprintln!("mirage: console at http://{addr}/{query} (open it in a browser)");
    }
    if let (Some(addr), Some(_)) = (&cfg.publish.metrics, &token) {
        eprintln!("mirage: metrics at http://{addr}/metrics{query} (or send Authorization: Bearer TOKEN)");
    }
    let report = cfg.console.report_path(handle.session_dir().map(|d| d.as_path()));
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
    if let Some(report) = report.filter(|r| r.exists()) {
        eprintln!("mirage: report {}", report.display());
    }
    Ok(summary)
}

/// SIGINT/SIGTERM set `stop` (a clean, draining shutdown); a second signal exits at once.
/// Returns a flag that tells whether a signal arrived.
pub(crate) fn watch_signals(stop: Arc<AtomicBool>) -> anyhow::Result<Arc<AtomicBool>> {
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
