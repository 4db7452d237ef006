//! The smoothing stage on the volume path: replaces each frame's volume by its smoothed copy.

use std::sync::Arc;

use super::{GaussianSmoother, SmoothConfig};
use crate::frame::{Frame, FrameKind};
use crate::stage::{Stage, StageError};

/// The smoothing stage: a [`GaussianSmoother`] over frames.
pub struct SmoothStage(pub GaussianSmoother);

impl Stage for SmoothStage {
    fn name(&self) -> &'static str {
        "smooth"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        if frame.kind == FrameKind::Volume {
            frame.volume = Arc::new(self.0.process(&frame.volume));
        }
        Ok(())
    }
}

/// The stage `cfg` asks for; none when smoothing is off, so that it costs the path nothing.
pub fn build(cfg: &SmoothConfig) -> Option<Box<dyn Stage>> {
    cfg.enabled.then(|| Box::new(SmoothStage(GaussianSmoother::new(cfg.fwhm_mm))) as Box<dyn Stage>)
}
