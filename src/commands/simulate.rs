//! `mirage simulate`: write a simulated run with its truth, or stream it to a daemon.

use std::path::PathBuf;
use std::time::Duration;

use crate::clock;
use crate::ingest::pacer::Pacer;
use crate::ingest::{IngestUri, Speed};
use crate::sender::VolumeSender;
use crate::sim::{SimConfig, Simulator};

/// Where the simulated run goes.
#[derive(Clone, Debug)]
pub enum SimTarget {
    /// `--out DIR`: bold.nii.gz, events.tsv and truth/.
    Folder(PathBuf),
    /// `--stream URI`: send to a daemon at `speed`, waiting up to `timeout` s for it.
    Stream {
        /// pyneal://, zmq:// or lsl:// destination.
        uri: String,
        /// Pace.
        speed: Speed,
        /// Seconds to wait for the daemon.
        timeout: f64,
    },
}

/// Runs the simulator into `target`.
pub fn simulate(cfg: &SimConfig, target: &SimTarget) -> anyhow::Result<()> {
    let sim = Simulator::new(cfg)?;
    match target {
        SimTarget::Folder(dir) => {
            let (n, dims) = (sim.n_volumes(), sim.dims());
            let files = sim.write_run(dir)?;
            eprintln!(
                "mirage: wrote {n} volumes of {dims:?} to {} (events: {}, truth: {})",
                files.bold.display(),
                files.events.display(),
                files.truth.display()
            );
            Ok(())
        }
        SimTarget::Stream { uri, speed, timeout } => stream(sim, uri, *speed, *timeout),
    }
}

fn stream(mut sim: Simulator, uri: &str, speed: Speed, timeout: f64) -> anyhow::Result<()> {
    let dest = IngestUri::parse(uri, &SimConfig::default()).map_err(|e| anyhow::anyhow!("--stream: {e}"))?;
    let mut sender = VolumeSender::connect(&dest, timeout)?;
    let mut pacer = Pacer::new(speed.interval(sim.config().tr), 0.0);
    let n = sim.n_volumes();
    let (mut sent, mut markers, mut next_marker) = (0, 0, 0);
    let trials = sim.trials().to_vec();
    while sim.position() < n {
        let Some(due) = pacer.wait_for(sim.position() as u64, Duration::from_secs(1)) else {
            continue;
        };
        // Markers for the trials that started before this volume, with their exact onsets.
        let now = sim.position() as f64 * sim.config().tr;
        while let Some(t) = trials.get(next_marker).filter(|t| t.onset < now) {
            let marker = format!(
                "trial={};stim={};cond={};dur={};onset={}",
                t.id,
                t.stim,
                t.condition.label(),
                t.duration,
                t.onset
            );
            markers += usize::from(sender.send_marker(&marker)?);
            next_marker += 1;
        }
        let Some(mut v) = sim.next_volume() else {
            break;
        };
        v.acq_time = Some(due);
        v.recv_time = clock::now();
        sender.send(&v)?;
        sent += 1;
    }
    sender.finish();
    eprintln!("mirage: streamed {sent} volumes and {markers} trial markers to {uri}");
    Ok(())
}
