//! The interface the runner drives: a stage is a plain struct with a pure `process`. Each
//! stage folder implements it (`motion::stage`, `glm::stage`); the runner knows only boxes.

use crate::frame::Frame;

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

    /// Whether the runner should put the live events (markers) that arrived before each frame
    /// in it (`glm::stage::LiveEvents`); one stage of a path takes them.
    fn takes_live_events(&self) -> bool {
        false
    }

    /// Threads for `process`: above 1, the runner runs the stage in a pool of that many at the
    /// volume path's priority, where `rayon::join` splits a frame's work (see `motion.threads`).
    fn threads(&self) -> usize {
        1
    }

    /// Work the frame `last` left that its outputs do not wait for (the motion reference's
    /// preparation, closing trials): the runner calls it once that frame has gone on, before
    /// the next one, and sends on the results frame it may return ([`Frame::results_after`]).
    fn after(&mut self, _last: &Frame) -> Result<Option<Frame>, StageError> {
        Ok(None)
    }

    /// Called once when the input ends, with the last frame seen: a stage holding results
    /// for the end of a run returns them in a frame (see [`Frame::end_of_run_after`]).
    fn flush(&mut self, _last: &Frame) -> Option<Frame> {
        None
    }
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
