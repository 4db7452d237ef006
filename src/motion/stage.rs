//! The motion stage on the volume path: realigns each frame's volume and puts its
//! [`MotionEstimate`] in the frame.

use std::sync::Arc;

use super::{MotionConfig, MotionCorrector, MotionError, MotionEstimate};
use crate::frame::Frame;
use crate::stage::{Identity, Stage, StageError};

/// The motion stage: a [`MotionCorrector`] over frames.
pub struct MotionStage(pub MotionCorrector);

impl Stage for MotionStage {
    fn name(&self) -> &'static str {
        "motion"
    }

    fn threads(&self) -> usize {
        self.0.threads()
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        let out = self.0.process(&frame.volume, frame.flags.new_run).map_err(|e| StageError {
            stage: "motion",
            reason: e.reason().name,
            message: e.to_string(),
        })?;
        if let Some(r) = out {
            frame.volume = Arc::new(r.volume);
            frame.outputs.insert::<MotionEstimate>(r.estimate);
        }
        Ok(())
    }

    fn after(&mut self, _last: &Frame) -> Result<Option<Frame>, StageError> {
        self.0.prepare_reference().map(|()| None).map_err(|e| StageError {
            stage: "motion",
            reason: e.reason().name,
            message: format!("the reference: {e}"),
        })
    }
}

/// The stage `cfg` asks for: realignment, or a pass-through when `motion.enabled` is false.
pub fn build(cfg: &MotionConfig) -> Result<Box<dyn Stage>, MotionError> {
    Ok(match cfg.enabled {
        true => Box::new(MotionStage(MotionCorrector::new(cfg)?)),
        false => Box::new(Identity("motion")),
    })
}
