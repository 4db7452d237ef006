//! The interface the runner drives: a stage is a plain struct with a pure `process`. Each
//! stage folder implements it and builds it from its own settings; the runner knows only boxes.

use crate::frame::Frame;
use crate::queue::WhenFull;
use crate::reason::Reason;

/// A per-frame failure; the runner logs it, counts it under `reason` and passes the frame on.
#[derive(Debug, thiserror::Error)]
#[error("{stage}: {message}")]
pub struct StageError {
    /// Stage name.
    pub stage: &'static str,
    /// Counter name.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
}

/// A processing step with no I/O, threads or clocks: time arrives in the frame.
pub trait Stage: Send {
    /// Stage name (`motion`, `glm`, `decode`): its thread, its edges and its latency key.
    fn name(&self) -> &'static str;

    /// Transforms the frame in place.
    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError>;

    /// Threads for `process`: above 1, the runner runs the stage in a pool of that many at its
    /// thread's priority, where `rayon::join` splits a frame's work (see `motion.threads`).
    fn threads(&self) -> usize {
        1
    }

    /// Work done once on the stage's own thread before its first frame (paging a model's
    /// weights in), so that the first frame is not the slow one.
    fn warm_up(&mut self) -> Result<(), StageError> {
        Ok(())
    }

    /// Work the frame `last` left that its outputs do not wait for (the motion reference's
    /// preparation, closing trials): the runner calls it once that frame has gone on, before
    /// the next one, and sends on the results frame it may return ([`Frame::results_after`]).
    fn after(&mut self, _last: &Frame) -> Result<Option<Frame>, StageError> {
        Ok(None)
    }

    /// Called when no frame has come for a while (the runner's poll interval), with the last
    /// frame seen: progress of work in the background to report, as a results frame.
    fn idle(&mut self, _last: &Frame) -> Option<Frame> {
        None
    }

    /// Called once when the input ends, with the last frame seen: a stage holding results
    /// for the end of a run returns them in a frame (see [`Frame::end_of_run_after`]).
    fn flush(&mut self, _last: &Frame) -> Option<Frame> {
        None
    }

    /// The work this stage sends off the volume path, taken once before the threads start
    /// (see [`OffPath`]).
    fn off_path(&mut self) -> Option<OffPath> {
        None
    }

    /// What of a processed frame its off-path worker is to take (copies; none: nothing to do).
    fn hand_off(&self, _frame: &Frame) -> Vec<Frame> {
        Vec::new()
    }
}

/// Work a stage does beside the volume path instead of on it: the runner runs `worker` on a
/// thread of its own inside a pool of `threads`, below the volume path's priority, fed through
/// a bounded hand-off that never makes the path wait; the worker's frames go to publish. A
/// worker may hand work on to a worker of its own the same way.
pub struct OffPath {
    /// The stage that does the work; its name names its thread (`mirage/NAME`).
    pub worker: Box<dyn Stage>,
    /// Threads of its pool, which its `rayon` (and candle's) work uses (0: one per core).
    pub threads: usize,
    /// Frames the hand-off holds.
    pub capacity: usize,
    /// What a full hand-off does: [`WhenFull::DropNewest`] (the new work is not done) or
    /// [`WhenFull::DropOldest`] (the oldest waiting work is replaced: stale results are useless).
    pub when_full: WhenFull,
    /// What each frame a full hand-off drops is counted as.
    pub dropped: Reason,
}

/// A stage that passes frames on unchanged: a step switched off keeps its place (its thread,
/// edges and latency key), so every run publishes the same schema.
#[derive(Clone, Copy, Debug)]
pub struct Identity(pub &'static str);

impl Stage for Identity {
    fn name(&self) -> &'static str {
        self.0
    }

    fn process(&mut self, _frame: &mut Frame) -> Result<(), StageError> {
        Ok(())
    }
}
