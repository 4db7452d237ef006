//! The built-in simulator as an in-process source.

use std::time::Duration;

use super::pacer::Pacer;
use super::uri::Playback;
use super::{IngestError, Source, SourceEvent};
use crate::clock;
use crate::event::{Event, Onset};
use crate::sim::{SimConfig, Simulator};

/// Produces the simulator's volumes at the chosen speed; `acq_time` is each volume's
/// scheduled acquisition time. Each trial's marker comes just before the first volume
/// acquired after its onset, as stimulus software would send it.
pub struct SimSource {
    sim: Simulator,
    pacer: Pacer,
    next_marker: usize,
}

impl SimSource {
    /// Builds the simulated run.
    pub fn new(cfg: &SimConfig, playback: Playback) -> Result<SimSource, IngestError> {
        Ok(SimSource::with_simulator(Simulator::new(cfg)?, playback))
    }

    /// Plays a simulated run already made.
    pub fn with_simulator(sim: Simulator, playback: Playback) -> SimSource {
        let tr = sim.config().tr;
        SimSource { pacer: Pacer::new(playback.speed.interval(tr), playback.delay), sim, next_marker: 0 }
    }
}

/// The marker a stimulus program would send for a simulated trial.
pub fn trial_marker(t: &crate::sim::Trial) -> Event {
    Event {
        trial: Some(t.id as u64),
        stim: Some(t.stim as u64),
        condition: t.condition.label().to_string(),
        onset: Onset::Relative(t.onset),
        duration: Some(t.duration),
    }
}

impl Source for SimSource {
    fn next(&mut self, timeout: Duration) -> SourceEvent {
        let i = self.sim.position() as u64;
        if i as usize >= self.sim.n_volumes() {
            return SourceEvent::End;
        }
        if let Some(t) = self.sim.trials().get(self.next_marker) {
            if t.onset < i as f64 * self.sim.config().tr {
                self.next_marker += 1;
                return SourceEvent::Marker(trial_marker(t));
            }
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
