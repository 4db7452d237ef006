//! `mirage simulate`: write a simulated run with its truth, or stream it to a daemon.

use std::path::PathBuf;
use std::time::Duration;

use crate::clock;
use crate::ingest::pacer::Pacer;
use crate::ingest::{IngestUri, Speed};
use crate::sender::{Delivered, VolumeSender};
use crate::sim::{SimConfig, Simulator, Trial};
use crate::volume::Volume;

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
        /// CURVE keys, for a daemon whose ingest has `ingest.curve`.
        curve: Option<crate::curve::ClientCurve>,
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
        SimTarget::Stream { uri, speed, timeout, curve } => {
            let (trials, tr) = (sim.trials().to_vec(), sim.config().tr);
            let mut sim = sim;
            let volumes = std::iter::from_fn(|| sim.next_volume());
            let (sent, markers) =
                stream(volumes, &trials, tr, uri, *speed, (*timeout, curve.as_ref()), &mut |_, _| {})?;
            eprintln!("mirage: streamed {sent} volumes and {markers} trial markers to {uri}");
            Ok(())
        }
    }
}

/// Sends volumes to a daemon at `speed` (one per `tr` in real time), with a marker for each
/// of `trials` before the first volume acquired after its onset (where the protocol carries
/// markers); `on_send(index, acquisition time)` hears each volume as it goes. Each volume is
/// in hand, its data frame encoded, before its slot, as a scanner has it at acquisition time.
/// Returns (volumes, markers) sent.
#[allow(clippy::too_many_arguments)]
pub fn stream(
    volumes: impl Iterator<Item = Volume>,
    trials: &[Trial],
    tr: f64,
    uri: &str,
    speed: Speed,
    (timeout, curve): (f64, Option<&crate::curve::ClientCurve>),
    on_send: &mut dyn FnMut(u64, f64),
) -> anyhow::Result<(usize, usize)> {
    let dest = IngestUri::parse(uri, &SimConfig::default()).map_err(|e| anyhow::anyhow!("--stream: {e}"))?;
    let mut sender = VolumeSender::connect_with(&dest, timeout, curve)?;
    let mut pacer = Pacer::new(speed.interval(tr), 0.0);
    let (mut sent, mut markers, mut next_marker) = (0, 0, 0);
    for (i, mut v) in volumes.enumerate() {
        let payload = sender.payload(&v);
        let due = loop {
            if let Some(due) = pacer.wait_for(i as u64, Duration::from_secs(1)) {
                break due;
            }
        };
        // Markers for the trials that started before this volume, with their exact onsets.
        let now = i as f64 * tr;
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
        v.acq_time = Some(due);
        v.recv_time = clock::now();
        on_send(v.index, due);
        let delivered = sender.send_payload(&v, &payload)?;
        sent += 1;
        if delivered == Delivered::Last {
            tracing::info!("the daemon's run is over (STOP): stopping after {sent} volumes");
            break;
        }
    }
    sender.finish();
    Ok((sent, markers))
}
