//! The built-in simulator as an in-process source.

use std::time::Duration;

use super::pacer::Pacer;
use super::uri::Playback;
use super::{IngestError, Source, SourceEvent};
use crate::clock;
use crate::sim::{SimConfig, Simulator};

/// Produces the simulator's volumes at the chosen speed; `acq_time` is each volume's
/// scheduled acquisition time.
pub struct SimSource {
    sim: Simulator,
    pacer: Pacer,
}

impl SimSource {
    /// Builds the simulated run.
    pub fn new(cfg: &SimConfig, playback: Playback) -> Result<SimSource, IngestError> {
        let sim = Simulator::new(cfg)?;
        Ok(SimSource { pacer: Pacer::new(playback.speed.interval(cfg.tr), playback.delay), sim })
    }
}

impl Source for SimSource {
    fn next(&mut self, timeout: Duration) -> SourceEvent {
        let i = self.sim.position() as u64;
        if i as usize >= self.sim.n_volumes() {
            return SourceEvent::End;
        }
        let Some(due) = self.pacer.wait_for(i, timeout) else {
            return SourceEvent::Idle;
        };
        match self.sim.next_volume() {
            Some(mut v) => {
                v.acq_time = Some(due);
                v.recv_time = clock::now();
                SourceEvent::Volume(v)
            }
            None => SourceEvent::End,
        }
    }

    fn describe(&self) -> String {
        let c = self.sim.config();
        format!("simulator seed={} volumes={} tr={} s grid={:?}", c.seed, c.volumes, c.tr, self.sim.dims())
    }
}
