//! The decode stage and its workers beside the volume path.
//!
//! ```text
//! volume path:  … ─► decode (dispatch) ─► publish          frames go on at once
//!                       └─ hand-off (drop newest) ─► decoder ─► publish   each closed trial decoded
//!                                                      └─ hand-off (keep newest) ─► picture ─► publish
//! ```
//!
//! [`DecodeDispatch`] is the stage on the path: it does nothing to a frame and hands a copy of
//! each frame that closes trials to [`DecodeWorker`], which the runner runs off the path
//! ([`crate::stage::OffPath`]). A MindEye2 model with a picture decoder hands each decoded
//! trial's `blurry_latent` on to [`PictureWorker`]; a newer trial replaces a waiting one (a
//! stale picture is stale feedback).

use std::sync::Arc;

use super::mindeye2::MindEye2;
use super::{DecodeConfig, DecodeStage, Decoded, Picture};
use crate::frame::{Frame, FrameKind, Tally};
use crate::glm::{GlmOutput, TrialBetas};
use crate::queue::WhenFull;
use crate::reason::Reason;
use crate::stage::{OffPath, Stage, StageError};

/// A trial whose decode was dropped because the decoder was too far behind.
pub const DECODE_DROPPED: Reason = Reason::new(
    "decode_dropped",
    "trials not decoded: the decode hand-off was full (the volume path never waits)",
);
/// A live trial whose decode took longer than `decode.latency_budget_ms`.
pub const DECODE_OVER_BUDGET: Reason =
    Reason::new("decode_over_budget", "live trials decoded later than decode.latency_budget_ms");
/// A MindEye2 trial's picture that was made later than `decode.latency_budget_ms` after its
/// trial closed (it follows the decode; a CPU takes seconds per picture).
pub const PICTURE_OVER_BUDGET: Reason = Reason::new(
    "picture_over_budget",
    "pictures published later than decode.latency_budget_ms after trial close",
);
/// A MindEye2 trial's picture not made: a newer trial replaced it while the picture worker was
/// busy.
pub const PICTURE_DROPPED: Reason = Reason::new(
    "picture_dropped",
    "pictures not made: a newer trial replaced the waiting one while the picture worker was busy",
);

/// Frames of closed trials that may wait for the decoder.
const DECODE_HANDOFF: usize = 256;

/// The decode stage's place on the volume path: frames go on at once; a copy of each frame
/// that closes trials goes to the decoder beside the path, whose results reach publish on
/// their own. A full hand-off drops the newest trials (counted `decode_dropped`).
pub struct DecodeDispatch {
    worker: Option<Box<dyn Stage>>,
    threads: usize,
}

/// The decode stage over `worker` (a [`DecodeWorker`], or one in calibration mode), whose
/// pool has `threads` threads (`decode.threads`; 0: one per core).
pub fn dispatch(worker: Box<dyn Stage>, threads: usize) -> Box<dyn Stage> {
    Box::new(DecodeDispatch { worker: Some(worker), threads })
}

impl Stage for DecodeDispatch {
    fn name(&self) -> &'static str {
        "decode"
    }

    fn process(&mut self, _frame: &mut Frame) -> Result<(), StageError> {
        Ok(())
    }

    fn off_path(&mut self) -> Option<OffPath> {
        let worker = self.worker.take()?;
        Some(OffPath {
            worker,
            threads: self.threads,
            capacity: DECODE_HANDOFF,
            when_full: WhenFull::DropNewest,
            dropped: DECODE_DROPPED,
        })
    }

    /// A frame's closed trials (not its ROI feedback), and the end of the run.
    fn hand_off(&self, frame: &Frame) -> Vec<Frame> {
        let trials = frame.outputs.get::<GlmOutput>().map(|g| g.trials.clone()).unwrap_or_default();
        if trials.is_empty() && frame.kind != FrameKind::EndOfRun {
            return Vec::new();
        }
        let mut copy = frame.clone();
        copy.outputs.insert(GlmOutput { trials, ..Default::default() });
        vec![copy]
    }
}

/// The decoder: decodes every trial a frame closed (end-of-run estimates when
/// `decode.decode_run_end`), timing each against `decode.latency_budget_ms` on the clock it is
/// given (the runner's monotonic one; tests give their own).
pub struct DecodeWorker {
    /// The loaded model and gallery.
    pub stage: DecodeStage,
    now: fn() -> f64,
    budget_ms: f64,
    run_end: bool,
    threads: usize,
    pictures: Option<PictureWorker>,
}

impl DecodeWorker {
    /// The decoder of `stage` with `cfg`'s budget, end-of-run and thread settings, on the
    /// monotonic clock; with a picture worker when the model makes pictures.
    pub fn new(stage: DecodeStage, cfg: &DecodeConfig) -> DecodeWorker {
        let pictures = stage.picture_network().map(|net| PictureWorker {
            net,
            device: stage.device().to_string(),
            budget_ms: cfg.latency_budget_ms,
            now: crate::clock::now,
        });
        DecodeWorker {
            stage,
            now: crate::clock::now,
            budget_ms: cfg.latency_budget_ms,
            run_end: cfg.decode_run_end,
            threads: cfg.threads,
            pictures,
        }
    }

    /// The same decoder timed on `now` (seconds).
    pub fn with_clock(mut self, now: fn() -> f64) -> DecodeWorker {
        self.now = now;
        if let Some(p) = &mut self.pictures {
            p.now = now;
        }
        self
    }

    /// Decodes one trial, timed; `None` for an end-of-run estimate it is not to decode.
    fn decode(&mut self, t: &TrialBetas, closed_time: Option<f64>) -> Option<Result<Decoded, StageError>> {
        if t.at_run_end && !self.run_end {
            return None;
        }
        let start = (self.now)();
        Some(match self.stage.decode(t) {
            Ok(mut d) => {
                d.latency_ms = ((self.now)() - start) * 1e3;
                // The budget is the live loop's: end-of-run estimates are not held to it.
                d.over_budget = !t.at_run_end && d.latency_ms > self.budget_ms;
                d.closed_time = closed_time;
                Ok(d)
            }
            Err(e) => Err(StageError { stage: "decode", reason: e.reason().name, message: e.to_string() }),
        })
    }
}

impl Stage for DecodeWorker {
    fn name(&self) -> &'static str {
        "decoder"
    }

    /// The first decode (paging weights in, making candle's pool) happens here, on a decode
    /// thread at its lower priority, before any trial waits for it.
    fn warm_up(&mut self) -> Result<(), StageError> {
        self.stage.warm_up().map_err(|e| StageError {
            stage: "decode",
            reason: e.reason().name,
            message: format!("warm-up: {e}"),
        })
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        // When the trials were closed: the last stamp before the decode stage.
        let closed_time = frame.stamps.latest();
        let trials = frame.outputs.get::<GlmOutput>().map(|g| g.trials.clone()).unwrap_or_default();
        let (mut decoded, mut first_error) = (Vec::new(), None);
        for t in &trials {
            match self.decode(t, closed_time) {
                Some(Ok(d)) => decoded.push(d),
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => {}
            }
        }
        let over_budget = decoded.iter().filter(|d| d.over_budget).count() as u64;
        if over_budget > 0 {
            frame.outputs.update::<Tally>(|t| t.0.push((DECODE_OVER_BUDGET.name, over_budget)));
        }
        if !decoded.is_empty() {
            frame.outputs.update::<Vec<Decoded>>(|v| v.extend(decoded));
        }
        first_error.map_or(Ok(()), Err)
    }

    fn off_path(&mut self) -> Option<OffPath> {
        let worker = self.pictures.take()?;
        Some(OffPath {
            worker: Box::new(worker),
            threads: self.threads,
            capacity: 1,
            when_full: WhenFull::DropOldest,
            dropped: PICTURE_DROPPED,
        })
    }

    /// Each live decoded trial's `blurry_latent`, for its picture.
    fn hand_off(&self, frame: &Frame) -> Vec<Frame> {
        let decoded = frame.outputs.get::<Vec<Decoded>>().map(Vec::as_slice).unwrap_or_default();
        decoded
            .iter()
            .filter(|d| !d.trial.at_run_end)
            .filter_map(|d| {
                let (_, _, latent) = d.heads.iter().find(|(name, _, _)| name == "blurry_latent")?;
                let mut job = Frame::results_after(frame);
                job.outputs.insert(PictureJob {
                    trial: d.trial.clone(),
                    latent: latent.clone(),
                    closed_time: d.closed_time,
                });
                Some(job)
            })
            .collect()
    }
}

/// A decoded trial's blurry latent on its way to the picture worker.
#[derive(Clone, Debug)]
pub struct PictureJob {
    /// The trial (without its betas).
    pub trial: TrialBetas,
    /// Its `blurry_latent`.
    pub latent: Vec<f32>,
    /// When the GLM closed it, on the monotonic clock.
    pub closed_time: Option<f64>,
}

/// The picture worker: makes each handed-over trial's picture (the SD VAE) after its decode.
pub struct PictureWorker {
    net: Arc<MindEye2>,
    device: String,
    budget_ms: f64,
    now: fn() -> f64,
}

impl Stage for PictureWorker {
    fn name(&self) -> &'static str {
        "picture"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        let Some(job) = frame.outputs.take::<PictureJob>() else { return Ok(()) };
        let start = (self.now)();
        let png = self.net.picture_png(&job.latent).map_err(|e| StageError {
            stage: "decode",
            reason: e.reason().name,
            message: format!("picture of trial {}: {e}", job.trial.trial),
        })?;
        let now = (self.now)();
        let over_budget = job.closed_time.is_some_and(|c| (now - c) * 1e3 > self.budget_ms);
        if over_budget {
            frame.outputs.update::<Tally>(|t| t.0.push((PICTURE_OVER_BUDGET.name, 1)));
        }
        let picture = Picture {
            trial: job.trial,
            png,
            device: self.device.clone(),
            latency_ms: (now - start) * 1e3,
            closed_time: job.closed_time,
            over_budget,
        };
        frame.outputs.insert(vec![picture]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::glm::{GlmOutput, TrialBetas};

    fn frame_with_trial(trial: u64) -> Frame {
        let volume = crate::volume::Volume {
            data: vec![0.0; 8],
            dims: [2, 2, 2],
            affine: crate::volume::IDENTITY_AFFINE,
            index: trial,
            run: "r".into(),
            tr: Some(1.0),
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        };
        let mut f = Frame::new(trial, Arc::new(volume), Default::default(), Default::default());
        let t = TrialBetas {
            run: "r".into(),
            trial,
            stim: Some(1),
            condition: "seen".into(),
            onset: 0.0,
            duration: 1.0,
            n_volumes: 1,
            estimable: true,
            at_run_end: false,
            betas: vec![1.0; 8],
            voxels: (0..8).collect(),
        };
        f.outputs.insert(GlmOutput { trials: vec![t], ..Default::default() });
        f
    }

    /// A clock that moves 40 ms each time it is read.
    fn slow_clock() -> f64 {
        static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64 * 0.04
    }

    fn worker(budget_ms: f64) -> DecodeWorker {
        let (decoder, _) =
            crate::decode::synthetic::random_decoder(&[("image", &[8])], None, 8, &candle_core::Device::Cpu)
                .unwrap();
        let cfg = DecodeConfig { latency_budget_ms: budget_ms, ..DecodeConfig::default() };
        let stage = DecodeStage::with_model(decoder, None, &cfg).unwrap();
        DecodeWorker::new(stage, &cfg).with_clock(slow_clock)
    }

    #[test]
    fn only_live_decodes_are_held_to_the_budget_timed_on_the_runners_clock() {
        let mut w = worker(10.0);
        let mut live = frame_with_trial(1);
        let mut end = frame_with_trial(2);
        end.outputs.update::<GlmOutput>(|g| g.trials[0].at_run_end = true);
        w.process(&mut live).unwrap();
        w.process(&mut end).unwrap();
        let decoded = |f: &Frame| f.outputs.get::<Vec<Decoded>>().unwrap()[0].clone();
        let (l, e) = (&decoded(&live), &decoded(&end));
        assert!(
            (l.latency_ms - 40.0).abs() < 1e-6 && (e.latency_ms - 40.0).abs() < 1e-6,
            "{} {}",
            l.latency_ms,
            e.latency_ms
        );
        assert!(l.over_budget && !e.over_budget);
        assert_eq!(live.outputs.get::<Tally>(), Some(&Tally(vec![(DECODE_OVER_BUDGET.name, 1)])));
        assert_eq!(end.outputs.get::<Tally>(), None);
        w.budget_ms = 100.0;
        let mut again = frame_with_trial(3);
        w.process(&mut again).unwrap();
        assert!(!decoded(&again).over_budget);
    }

    #[test]
    fn the_dispatch_hands_off_only_closed_trials_and_the_run_end_and_passes_the_frame_on() {
        let mut dispatch = dispatch(Box::new(worker(50.0)), 1);
        let mut f = frame_with_trial(4);
        f.outputs.update::<GlmOutput>(|g| {
            g.roi.push(crate::glm::RoiValue { name: "v1".into(), mean: 1.0, psc: Some(0.5) })
        });
        let before = format!("{:?}", f.outputs);
        dispatch.process(&mut f).unwrap();
        assert_eq!(format!("{:?}", f.outputs), before, "the frame goes on unchanged");
        let handed = dispatch.hand_off(&f);
        assert_eq!(handed.len(), 1);
        let g = handed[0].outputs.get::<GlmOutput>().unwrap();
        assert_eq!((g.trials.len(), g.roi.len()), (1, 0), "the worker takes the trials, not the feedback");
        let mut empty = frame_with_trial(5);
        empty.outputs = Default::default();
        assert!(dispatch.hand_off(&empty).is_empty());
        assert_eq!(dispatch.hand_off(&Frame::end_of_run_after(&empty)).len(), 1);
        let off = dispatch.off_path().expect("the decoder goes off the path");
        assert_eq!(
            (off.worker.name(), off.when_full, off.dropped),
            ("decoder", WhenFull::DropNewest, DECODE_DROPPED)
        );
        assert!(dispatch.off_path().is_none(), "taken once");
    }
}
