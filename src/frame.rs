//! What travels between stages: a volume, what each stage added to it, and its timestamps.

use std::sync::Arc;

use crate::queue::ByteSize;
use crate::volume::Volume;

/// A point on a frame's path where the runner takes a timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    /// The last byte arrived (or the file/simulator produced the volume).
    Received = 0,
    /// Validated, recorded and queued by ingest.
    Ingested = 1,
    /// Out of the motion stage.
    Motion = 2,
    /// Out of the GLM stage.
    Glm = 3,
    /// Out of the decode stage.
    Decode = 4,
    /// Handed to the publish sockets.
    Published = 5,
}

/// Stage names in path order; stage `i` spans boundary `i` to `i + 1`.
pub const STAGES: [&str; 5] = ["ingest", "motion", "glm", "decode", "publish"];

/// Monotonic timestamps (seconds on [`crate::clock::now`]) at each [`Boundary`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stamps([f64; 6]);

impl Default for Stamps {
    fn default() -> Stamps {
        Stamps([f64::NAN; 6])
    }
}

impl Stamps {
    /// Records `t` at boundary `b`.
    pub fn set(&mut self, b: Boundary, t: f64) {
        self.0[b as usize] = t;
    }

    /// The time at boundary `b`, if reached.
    pub fn get(&self, b: Boundary) -> Option<f64> {
        let t = self.0[b as usize];
        t.is_finite().then_some(t)
    }

    /// Milliseconds spent in each of [`STAGES`] (queue wait included), where both ends are set.
    pub fn stage_ms(&self) -> [Option<f64>; 5] {
        std::array::from_fn(|i| {
            let (a, b) = (self.0[i], self.0[i + 1]);
            (a.is_finite() && b.is_finite()).then_some((b - a) * 1e3)
        })
    }

    /// Milliseconds from receipt to publish.
    pub fn total_ms(&self) -> Option<f64> {
        Some((self.get(Boundary::Published)? - self.get(Boundary::Received)?) * 1e3)
    }
}

/// How a volume's index relates to the ones before it in its run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngestFlags {
    /// The index was already seen in this run (e.g. Siemens PACE resends).
    pub duplicate: bool,
    /// Indices skipped just before this one.
    pub gap_before: u64,
    /// The index is lower than one already seen.
    pub out_of_order: bool,
    /// First volume of a new run id or a new grid.
    pub new_run: bool,
}

/// One volume on its way through the pipeline.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Arrival number in this session (0-based), also the recorder's sequence number.
    pub seq: u64,
    /// The volume as the latest stage left it.
    pub volume: Arc<Volume>,
    /// Index bookkeeping from ingest.
    pub flags: IngestFlags,
    /// Head motion, once the motion stage has estimated it.
    pub motion: Option<crate::motion::MotionEstimate>,
    /// Live events (markers) that arrived before this volume, handed to the GLM stage by the
    /// runner.
    pub events: Vec<crate::glm::events::Event>,
    /// ROI feedback and closed trials, once the GLM stage has run.
    pub glm: Option<crate::glm::GlmOutput>,
    /// Trials decoded from this frame's closed trials.
    pub decoded: Vec<crate::decode::Decoded>,
    /// Calibration-mode events raised while this frame was decoded.
    pub calibration: Vec<crate::calibrate::CalibrationEvent>,
    /// A frame a stage emitted when its input ended: it carries results, not a new volume
    /// (`volume` is the run's last one).
    pub end_of_run: bool,
    /// Errors stages reported for this frame (it still went on).
    pub stage_errors: Vec<String>,
    /// Boundary timestamps.
    pub stamps: Stamps,
}

impl Frame {
    /// A new frame for a volume that has just been received.
    pub fn new(seq: u64, volume: Arc<Volume>, flags: IngestFlags, stamps: Stamps) -> Frame {
        Frame {
            seq,
            volume,
            flags,
            motion: None,
            events: Vec::new(),
            glm: None,
            decoded: Vec::new(),
            calibration: Vec::new(),
            end_of_run: false,
            stage_errors: Vec::new(),
            stamps,
        }
    }

    /// An end-of-run frame after `last`, carrying no results yet.
    pub fn end_of_run_after(last: &Frame) -> Frame {
        Frame {
            end_of_run: true,
            ..Frame::new(last.seq, last.volume.clone(), IngestFlags::default(), last.stamps)
        }
    }
}

impl ByteSize for Frame {
    fn byte_size(&self) -> usize {
        self.volume.byte_size()
    }
}

/// What the recorder is given: every accepted volume with its arrival number.
#[derive(Clone, Debug)]
pub struct RecordItem {
    /// Arrival number.
    pub seq: u64,
    /// The volume as received.
    pub volume: Arc<Volume>,
    /// Index bookkeeping.
    pub flags: IngestFlags,
}

impl ByteSize for RecordItem {
    fn byte_size(&self) -> usize {
        self.volume.byte_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_latencies_from_stamps() {
        let mut s = Stamps::default();
        s.set(Boundary::Received, 10.0);
        s.set(Boundary::Ingested, 10.001);
        s.set(Boundary::Motion, 10.004);
        let ms = s.stage_ms();
        assert!((ms[0].unwrap() - 1.0).abs() < 1e-9);
        assert!((ms[1].unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(ms[2], None);
        assert_eq!(s.total_ms(), None);
        s.set(Boundary::Published, 10.010);
        assert!((s.total_ms().unwrap() - 10.0).abs() < 1e-9);
    }
}
