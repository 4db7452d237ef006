//! The GLM stage on the volume path: takes the live events the runner put in the frame, fits,
//! and puts the [`GlmOutput`] (ROI feedback and closed trials) in it.

use std::path::Path;

use super::events::Event;
use super::{GlmConfig, GlmEstimator, GlmOutput, SIM_ROI};
use crate::frame::Frame;
use crate::motion::MotionEstimate;
use crate::stage::{Identity, Stage, StageError};

/// Live events (markers) that arrived before a frame, put in it by the runner.
#[derive(Clone, Debug, Default)]
pub struct LiveEvents(pub Vec<Event>);

/// The GLM stage: a [`GlmEstimator`] over frames.
pub struct GlmStage(pub GlmEstimator);

impl Stage for GlmStage {
    fn name(&self) -> &'static str {
        "glm"
    }

    fn takes_live_events(&self) -> bool {
        true
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        for e in frame.outputs.take::<LiveEvents>().unwrap_or_default().0 {
            self.0.add_event(e);
        }
        if frame.end_of_run {
            return Ok(());
        }
        let out =
            self.0
                .process(&frame.volume, frame.outputs.get::<MotionEstimate>(), frame.flags.new_run)
                .map_err(|e| StageError { stage: "glm", reason: e.reason().name, message: e.to_string() })?;
        frame.outputs.insert(out);
        Ok(())
    }

    fn flush(&mut self, last: &Frame) -> Option<Frame> {
        let trials = self.0.finish();
        if trials.is_empty() {
            return None;
        }
        let mut f = Frame::end_of_run_after(last);
        f.outputs.insert(GlmOutput { trials, ..Default::default() });
        Some(f)
    }
}

/// The simulated brain's grid and visual ROI, which `glm.mask = "sim"` and ROIs at `"sim"` name.
pub type SimRoi<'a> = ([usize; 3], &'a [usize]);

/// The stage `cfg` asks for: the estimator with its mask and ROIs (those at `"sim"` from
/// `sim`), or a pass-through when `glm.enabled` is false.
pub fn build(cfg: &GlmConfig, sim: Option<SimRoi>) -> Result<Box<dyn Stage>, String> {
    if !cfg.enabled {
        return Ok(Box::new(Identity("glm")));
    }
    let mut est = GlmEstimator::new(cfg).map_err(|e| e.to_string())?;
    let sim_rois: Vec<&str> =
        cfg.rois.iter().filter(|r| r.path == Path::new(SIM_ROI)).map(|r| r.name.as_str()).collect();
    if cfg.mask != SIM_ROI && sim_rois.is_empty() {
        return Ok(Box::new(GlmStage(est)));
    }
    let Some((dims, roi)) = sim else {
        return Err("glm.mask or glm.rois = \"sim\" needs sim:// ingest; give a mask file".into());
    };
    for name in sim_rois {
        est = est.with_roi(name, dims, roi);
    }
    if cfg.mask == SIM_ROI {
        est = est.with_mask(dims, roi.to_vec());
    }
    Ok(Box::new(GlmStage(est)))
}
