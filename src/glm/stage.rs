//! The GLM stage on the volume path: takes the live events ingest put in the frame, fits, and
//! puts the [`GlmOutput`] (ROI feedback and closed trials) in it, with a [`Tally`] of what it
//! set aside (voxels gone NaN, events too late or refused).

use std::path::Path;

use super::{GlmConfig, GlmEstimator, GlmOutput, SIM_ROI};
use crate::event::LiveEvents;
use crate::frame::{Frame, FrameKind, Tally};
use crate::motion::MotionEstimate;
use crate::stage::{Identity, Stage, StageError};

/// The GLM stage: a [`GlmEstimator`] over frames.
pub struct GlmStage(pub GlmEstimator);

impl Stage for GlmStage {
    fn name(&self) -> &'static str {
        "glm"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        // Left in the frame: the feedback recipe reads block markers from it too.
        for e in frame.outputs.get::<LiveEvents>().map(|l| l.0.clone()).unwrap_or_default() {
            self.0.add_event(e);
        }
        if frame.kind != FrameKind::Volume {
            return Ok(());
        }
        let out = self
            .0
            .update(&frame.volume, frame.outputs.get::<MotionEstimate>(), frame.flags.new_run)
            .map_err(|e| StageError { stage: "glm", reason: e.reason().name, message: e.to_string() })?;
        let tally: Vec<(&'static str, u64)> = [
            (super::NAN_VOXELS.name, out.new_nan_voxels),
            (super::LATE_EVENTS.name, out.late_events),
            (super::REJECTED_EVENTS.name, out.rejected_events),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| (reason, n as u64))
        .collect();
        if !tally.is_empty() {
            frame.outputs.update::<Tally>(|t| t.0.extend(tally));
        }
        frame.outputs.insert(out);
        Ok(())
    }

    /// The trials the volume closed go on in a frame of their own, right after the volume's:
    /// their betas (a solve per mask voxel) do not hold back its feedback.
    fn after(&mut self, last: &Frame) -> Result<Option<Frame>, StageError> {
        let trials = self.0.close_due_trials();
        if trials.is_empty() {
            return Ok(None);
        }
        let mut f = Frame::results_after(last);
        f.outputs.insert(GlmOutput { trials, ..Default::default() });
        Ok(Some(f))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{Event, Onset};
    use crate::frame::{IngestFlags, Stamps};

    fn frame(index: u64) -> Frame {
        // A drifting image with a response to the trial at 3 s in every voxel.
        let v = crate::glm::tests::volume(index, |v| {
            let t = index as f32;
            let response = if (3.0..6.0).contains(&t) { 5.0 } else { 0.0 };
            1000.0 + v as f32 + 0.3 * t + response * (1.0 + (v % 5) as f32)
        });
        let mut f = Frame::new(index, Arc::new(v), IngestFlags::default(), Stamps::new(2));
        f.flags.new_run = index == 0;
        f
    }

    #[test]
    fn a_closing_trial_goes_on_after_its_volume_with_the_betas_process_gives() {
        let cfg = crate::glm::tests::config();
        let event = Event {
            trial: Some(7),
            stim: Some(7),
            condition: "seen".into(),
            onset: Onset::Relative(3.0),
            duration: Some(2.0),
        };
        let mut stage = GlmStage(GlmEstimator::new(&cfg).unwrap());
        let mut whole = GlmEstimator::new(&cfg).unwrap();
        stage.0.add_event(event.clone());
        whole.add_event(event);
        let (mut deferred, mut direct) = (Vec::new(), Vec::new());
        for i in 0..30 {
            let mut f = frame(i);
            stage.process(&mut f).unwrap();
            let g = f.outputs.get::<GlmOutput>().unwrap();
            assert!(g.trials.is_empty());
            if let Some(r) = stage.after(&Frame::results_after(&f)).unwrap() {
                assert!(r.kind == FrameKind::Results && r.volume.index == i);
                deferred.push((i, r.outputs.get::<GlmOutput>().unwrap().trials.clone()));
            }
            let out = whole.process(&frame(i).volume, None, i == 0).unwrap();
            if !out.trials.is_empty() {
                direct.push((i, out.trials));
            }
        }
        assert_eq!(deferred.len(), 1);
        assert_eq!(deferred[0].1[0].trial, 7);
        assert_eq!(deferred, direct);
    }
}
