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

/// The motion stage in the pipeline: realigns `frame.volume` and records its motion.
pub struct MotionStage(pub crate::motion::MotionCorrector);

impl Stage for MotionStage {
    fn name(&self) -> &'static str {
        "motion"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        let out = self.0.process(&frame.volume, frame.flags.new_run).map_err(|e| StageError {
            stage: "motion",
            reason: e.reason(),
            message: e.to_string(),
        })?;
        if let Some(r) = out {
            frame.volume = std::sync::Arc::new(r.volume);
            frame.motion = Some(r.estimate);
        }
        Ok(())
    }
}
