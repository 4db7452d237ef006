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
    let mut sent = 0;
    while sim.position() < n {
        let Some(due) = pacer.wait_for(sim.position() as u64, Duration::from_secs(1)) else {
            continue;
        };
        let Some(mut v) = sim.next_volume() else {
            break;
        };
        v.acq_time = Some(due);
        v.recv_time = clock::now();
        sender.send(&v)?;
        sent += 1;
    }
    sender.finish();
    eprintln!("mirage: streamed {sent} volumes to {uri}");
    Ok(())
}
