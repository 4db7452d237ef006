//! What travels between stages: a volume, what each stage added to it, and its timestamps.

use std::any::{Any, TypeId};
use std::sync::Arc;

use crate::queue::ByteSize;
use crate::volume::Volume;

/// A point on a frame's path where the runner takes a timestamp: received, ingested, after
/// each stage of the volume path in order, then published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boundary(usize);

impl Boundary {
    /// The last byte arrived (or the file/simulator produced the volume).
    pub const RECEIVED: Boundary = Boundary(0);
    /// Validated, recorded and queued by ingest.
    pub const INGESTED: Boundary = Boundary(1);

    /// Out of stage `i` (0-based) of the volume path.
    pub const fn after_stage(i: usize) -> Boundary {
        Boundary(2 + i)
    }
}

/// The latency key of the path's head: receipt to the volume queued for the first stage.
pub const INGEST: &str = "ingest";
/// The latency key of the path's tail: out of the last stage to handed to the sinks.
pub const PUBLISH: &str = "publish";

/// The latency keys of a path through `stages` (the topology's, in order): ingest, each
/// stage, publish; what `latency_ms`, the status, the console and the bench report.
pub fn latency_keys(stages: impl IntoIterator<Item = &'static str>) -> Vec<&'static str> {
    std::iter::once(INGEST).chain(stages).chain(std::iter::once(PUBLISH)).collect()
}

/// Monotonic timestamps (seconds on [`crate::clock::now`]) at each [`Boundary`] of a path of
/// `n` stages, then at publish: `n + 3` points, spanning ingest, the `n` stages and publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamps(Vec<f64>);

impl Default for Stamps {
    /// Stamps for a path with no stages: receipt, ingest and publish.
    fn default() -> Stamps {
        Stamps::new(0)
    }
}

impl Stamps {
    /// No stamps yet, for a path of `n_stages` stages.
    pub fn new(n_stages: usize) -> Stamps {
        Stamps(vec![f64::NAN; n_stages + 3])
    }

    /// Records `t` at boundary `b` (ignored past the path's end).
    pub fn set(&mut self, b: Boundary, t: f64) {
        if let Some(x) = self.0.get_mut(b.0) {
            *x = t;
        }
    }

    /// The time at boundary `b`, if reached.
    pub fn get(&self, b: Boundary) -> Option<f64> {
        self.0.get(b.0).copied().filter(|t| t.is_finite())
    }

    /// Records `t` as the moment the frame was handed to the publish sockets.
    pub fn set_published(&mut self, t: f64) {
        if let Some(x) = self.0.last_mut() {
            *x = t;
        }
    }

    /// The latest time stamped so far (e.g. when the trials a frame carries were closed).
    pub fn latest(&self) -> Option<f64> {
        self.0.iter().copied().filter(|t| t.is_finite()).reduce(f64::max)
    }

    /// Milliseconds spent in ingest, each stage and publish (queue wait included), where both
    /// ends are set.
    pub fn stage_ms(&self) -> Vec<Option<f64>> {
        self.0
            .windows(2)
            .map(|w| (w[0].is_finite() && w[1].is_finite()).then(|| (w[1] - w[0]) * 1e3))
            .collect()
    }

    /// Milliseconds from receipt to publish.
    pub fn total_ms(&self) -> Option<f64> {
        let (first, last) = (self.0.first()?, self.0.last()?);
        (first.is_finite() && last.is_finite()).then(|| (last - first) * 1e3)
    }
}

/// What stages added to a frame, one value per type: a stage puts its output, a later stage or
/// publish reads it by type, so the frame names no stage and a new stage adds nothing here.
#[derive(Clone, Default)]
pub struct Outputs(Vec<(TypeId, &'static str, Arc<dyn Any + Send + Sync>)>);

impl Outputs {
    /// Puts `value`, replacing one of the same type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.remove::<T>();
        self.0.push((TypeId::of::<T>(), std::any::type_name::<T>(), Arc::new(value)));
    }

    /// The value of type `T`, if a stage put one.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.0.iter().find(|(id, _, _)| *id == TypeId::of::<T>()).and_then(|(_, _, v)| v.downcast_ref())
    }

    /// Takes the value of type `T` out (a copy when another frame shares it).
    pub fn take<T: Any + Send + Sync + Clone>(&mut self) -> Option<T> {
        let v = self.remove::<T>()?.downcast::<T>().ok()?;
        Some(Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone()))
    }

    /// Changes the value of type `T` in place, starting from its default when there is none.
    pub fn update<T: Any + Send + Sync + Clone + Default>(&mut self, f: impl FnOnce(&mut T)) {
        let mut v = self.take::<T>().unwrap_or_default();
        f(&mut v);
        self.insert(v);
    }

    fn remove<T: Any>(&mut self) -> Option<Arc<dyn Any + Send + Sync>> {
        let i = self.0.iter().position(|(id, _, _)| *id == TypeId::of::<T>())?;
        Some(self.0.remove(i).2)
    }
}

impl std::fmt::Debug for Outputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(_, name, _)| name)).finish()
    }
}

/// What a stage counted for a frame without failing it (voxels gone NaN, events too late), by
/// counter name: the runner adds it to the run's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally(pub Vec<(&'static str, u64)>);

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
    /// The index is implausible for the run (see [`crate::ingest::intake::IndexTracker`]): the
    /// volume is recorded and set aside, never sent down the path.
    #[serde(default)]
    pub implausible_index: bool,
}

/// What a frame carries: a new volume, or results, not a new volume (its `volume` is then the
/// last one seen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A volume just received.
    Volume,
    /// Results a stage sent on after a volume's frame (trials closed off its path).
    Results,
    /// Results a stage held for the end of its input.
    EndOfRun,
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
    /// What the stages added (head motion, ROI feedback and closed trials, decoded trials,
    /// calibration events, the live events handed to the GLM), by type.
    pub outputs: Outputs,
    /// A new volume, or results a stage sent on after one.
    pub kind: FrameKind,
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
            outputs: Outputs::default(),
            kind: FrameKind::Volume,
            stage_errors: Vec::new(),
            stamps,
        }
    }

    /// A results frame after `last`, carrying no results yet.
    pub fn results_after(last: &Frame) -> Frame {
        Frame {
            kind: FrameKind::Results,
            ..Frame::new(last.seq, last.volume.clone(), IngestFlags::default(), last.stamps.clone())
        }
    }

    /// An end-of-run frame after `last`, carrying no results yet.
    pub fn end_of_run_after(last: &Frame) -> Frame {
        Frame { kind: FrameKind::EndOfRun, ..Frame::results_after(last) }
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
    /// The markers (trial events, as JSON) received since the previous volume.
    pub markers: Vec<serde_json::Value>,
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
        let mut s = Stamps::new(3);
        s.set(Boundary::RECEIVED, 10.0);
        s.set(Boundary::INGESTED, 10.001);
        s.set(Boundary::after_stage(0), 10.004);
        let ms = s.stage_ms();
        assert_eq!(ms.len(), latency_keys(["a", "b", "c"]).len());
        assert!((ms[0].unwrap() - 1.0).abs() < 1e-9);
        assert!((ms[1].unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(ms[2], None);
        assert_eq!(s.total_ms(), None);
        assert_eq!(s.latest(), Some(10.004));
        s.set_published(10.010);
        assert!((s.total_ms().unwrap() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn outputs_are_found_by_type_and_shared_ones_are_copied_on_take() {
        let mut o = Outputs::default();
        assert!(o.get::<u32>().is_none());
        o.insert(3u32);
        o.insert(String::from("a"));
        o.insert(4u32);
        assert_eq!((o.get::<u32>(), o.get::<String>().map(String::as_str)), (Some(&4), Some("a")));
        let shared = o.clone();
        o.update::<Vec<u8>>(|v| v.push(1));
        o.update::<String>(|s| s.push('b'));
        assert_eq!(o.take::<String>().as_deref(), Some("ab"));
        assert_eq!(shared.get::<String>().map(String::as_str), Some("a"), "a copy is not changed");
        assert_eq!(o.get::<Vec<u8>>(), Some(&vec![1]));
        assert_eq!(format!("{o:?}"), "[\"u32\", \"alloc::vec::Vec<u8>\"]");
    }
}
