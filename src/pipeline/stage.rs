//! The interface the runner drives: a stage is a plain struct with a pure `process`.

use super::frame::Frame;

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
    /// Stage name (`motion`, `glm`, `decode`).
    fn name(&self) -> &'static str;
    /// Transforms the frame in place.
    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError>;
}

/// A stage that passes frames on unchanged, standing in for a step that is not built yet.
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
