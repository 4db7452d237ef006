//! The interface the runner drives: a stage is a plain struct with a pure `process`.

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
    /// Stage name (`motion`, `glm`, `decode`).
    fn name(&self) -> &'static str;
    /// Transforms the frame in place.
    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError>;

    /// Called once when the input ends, with the last frame seen: a stage holding results
    /// for the end of a run returns them in a frame (see [`Frame::end_of_run_after`]).
    fn flush(&mut self, _last: &Frame) -> Option<Frame> {
        None
    }
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
            reason: e.reason().name,
            message: e.to_string(),
        })?;
        if let Some(r) = out {
            frame.volume = std::sync::Arc::new(r.volume);
            frame.motion = Some(r.estimate);
        }
        Ok(())
    }
}

/// The GLM stage in the pipeline: takes the live events the runner attached to the frame,
/// fits, and attaches ROI feedback and closed trials.
pub struct GlmStage(pub crate::glm::GlmEstimator);

impl Stage for GlmStage {
    fn name(&self) -> &'static str {
        "glm"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        for e in std::mem::take(&mut frame.events) {
            self.0.add_event(e);
        }
        if frame.end_of_run {
            return Ok(());
        }
        let out = self
            .0
            .process(&frame.volume, frame.motion.as_ref(), frame.flags.new_run)
            .map_err(|e| StageError { stage: "glm", reason: e.reason().name, message: e.to_string() })?;
        frame.glm = Some(out);
        Ok(())
    }

    fn flush(&mut self, last: &Frame) -> Option<Frame> {
        let trials = self.0.finish();
        if trials.is_empty() {
            return None;
        }
        let mut f = Frame::end_of_run_after(last);
        f.glm = Some(crate::glm::GlmOutput { trials, ..Default::default() });
        Some(f)
    }
}

/// The decode stage in the pipeline: decodes every trial the GLM closed in this frame and
/// times each decode against the budget with the clock the runner gives it; in calibration
/// mode it also feeds the live calibration and switches to the fitted head when it is ready.
pub struct DecodeStageAdapter {
    /// The loaded model and gallery.
    pub stage: crate::decode::DecodeStage,
    /// The runner's clock (seconds), for each decode's latency.
    pub now: fn() -> f64,
    /// Budget per trial, ms.
    pub budget_ms: f64,
    /// Also decode end-of-run estimates.
    pub run_end: bool,
    /// Calibration mode's state (`None` in decode mode).
    pub calibration: Option<super::calibration::LiveCalibration>,
}

impl DecodeStageAdapter {
    fn poll_calibration(&mut self, frame: &mut Frame, wait: bool) {
        let Some(c) = &mut self.calibration else { return };
        let (event, adapter) = c.poll(wait, self.stage.decoder());
        frame.calibration.extend(event);
        if let Some(adapter) = adapter {
            tracing::info!("calibration: switching to the fitted alignment");
            self.stage.set_adapter(adapter);
        }
        if wait {
            frame.calibration.extend(c.finish());
        }
    }
}

impl Stage for DecodeStageAdapter {
    fn name(&self) -> &'static str {
        "decode"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        let mut first_error = None;
        if let Some(glm) = &frame.glm {
            for t in glm.trials.iter().filter(|t| self.run_end || !t.at_run_end) {
                let start = (self.now)();
                match self.stage.decode(t) {
                    Ok(mut d) => {
                        d.latency_ms = ((self.now)() - start) * 1e3;
                        // The budget is the live loop's: end-of-run estimates are not held to it.
                        d.over_budget = !t.at_run_end && d.latency_ms > self.budget_ms;
                        d.closed_time = frame.stamps.get(crate::frame::Boundary::Glm);
                        frame.decoded.push(d);
                    }
                    Err(e) => {
                        if first_error.is_none() {
                            first_error = Some(StageError {
                                stage: "decode",
                                reason: e.reason().name,
                                message: e.to_string(),
                            });
                        }
                    }
                }
                if let Some(c) = &mut self.calibration {
                    frame.calibration.extend(c.observe(t, self.stage.decoder()));
                }
            }
        }
        let end = frame.end_of_run;
        self.poll_calibration(frame, end);
        first_error.map_or(Ok(()), Err)
    }

    fn flush(&mut self, last: &Frame) -> Option<Frame> {
        let mut f = Frame::end_of_run_after(last);
        self.poll_calibration(&mut f, true);
        (!f.calibration.is_empty()).then_some(f)
    }
}

impl DecodeStageAdapter {
    /// Between trials: calibration progress, and the switch to a fitted head, as a frame of
    /// results after `last` (or nothing to report).
    pub fn idle(&mut self, last: &Frame) -> Option<Frame> {
        let mut f = Frame::end_of_run_after(last);
        f.end_of_run = false;
        self.poll_calibration(&mut f, false);
        (!f.calibration.is_empty()).then_some(f)
    }
}

/// A trial whose decode was dropped because the decode worker was too far behind.
pub const DECODE_DROPPED: crate::metrics::Reason = crate::metrics::Reason::new(
    "decode_dropped",
    "trials not decoded: the decode hand-off was full (the volume path never waits)",
);

/// The decode stage's place on the volume path: frames go on at once; a copy of each frame
/// that closes trials goes to the decode worker, whose results reach publish on their own; a
/// full hand-off drops the trial (counted), so volume feedback never waits for a decode.
pub struct DecodeDispatch {
    /// The decode worker's input: a bounded edge that drops rather than waits.
    pub worker: crate::queue::EdgeTx<Frame>,
}

impl Stage for DecodeDispatch {
    fn name(&self) -> &'static str {
        "decode"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        let has_trials = frame.glm.as_ref().is_some_and(|g| !g.trials.is_empty());
        if has_trials || frame.end_of_run {
            let mut copy = frame.clone();
            copy.glm.iter_mut().for_each(|g| g.roi.clear());
            match self.worker.push(copy) {
                Ok(()) => {}
                Err(crate::queue::PushError::Dropped) => {
                    return Err(StageError {
                        stage: "decode",
                        reason: DECODE_DROPPED.name,
                        message:
                            "the decode worker is a full queue behind: this frame's trials are not decoded"
                                .into(),
                    })
                }
                Err(crate::queue::PushError::Closed) => {
                    return Err(StageError {
                        stage: "decode",
                        reason: "decode_worker",
                        message: "the decode worker has stopped".into(),
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::glm::{GlmOutput, TrialBetas};
    use crate::queue::{edge, Recv, WhenFull};

    fn frame_with_trial(trial: u64) -> Frame {
        let volume = crate::volume::Volume {
            data: vec![0.0; 8],
            dims: [2, 2, 2],
            affine: [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
            index: trial,
            run: "r".into(),
            tr: Some(1.0),
            acq_time: None,
            recv_time: 0.0,
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
        f.glm = Some(GlmOutput { trials: vec![t], ..Default::default() });
        f
    }

    /// A clock that moves 40 ms each time it is read.
    fn slow_clock() -> f64 {
        static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64 * 0.04
    }

    #[test]
    fn only_live_decodes_are_held_to_the_budget_timed_on_the_runners_clock() {
        let (decoder, _) =
            crate::decode::synthetic::random_decoder(&[("image", &[8])], None, 8, &candle_core::Device::Cpu)
                .unwrap();
        let stage =
            crate::decode::DecodeStage::with_model(decoder, None, &crate::decode::DecodeConfig::default())
                .unwrap();
        let mut adapter =
            DecodeStageAdapter { stage, now: slow_clock, budget_ms: 10.0, run_end: true, calibration: None };
        let mut live = frame_with_trial(1);
        let mut end = frame_with_trial(2);
        if let Some(g) = end.glm.as_mut() {
            g.trials[0].at_run_end = true;
        }
        adapter.process(&mut live).unwrap();
        adapter.process(&mut end).unwrap();
        let (l, e) = (&live.decoded[0], &end.decoded[0]);
        assert!(
            (l.latency_ms - 40.0).abs() < 1e-6 && (e.latency_ms - 40.0).abs() < 1e-6,
            "{} {}",
            l.latency_ms,
            e.latency_ms
        );
        assert!(l.over_budget && !e.over_budget);
        adapter.budget_ms = 100.0;
        let mut again = frame_with_trial(3);
        adapter.process(&mut again).unwrap();
        assert!(!again.decoded[0].over_budget);
    }

    #[test]
    fn the_decode_hand_off_drops_and_counts_rather_than_waits() {
        let (tx, mut rx) = edge::<Frame>("decode hand-off", 2, 1 << 20, WhenFull::DropNewest);
        let stats = tx.stats();
        let mut dispatch = DecodeDispatch { worker: tx };
        // Nobody decodes: two frames fit, the rest are refused at once, never waited for.
        let start = std::time::Instant::now();
        let results: Vec<_> = (0..5).map(|i| dispatch.process(&mut frame_with_trial(i))).collect();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(results[..2].iter().all(Result::is_ok));
        assert!(results[2..].iter().all(|r| r.as_ref().is_err_and(|e| e.reason == "decode_dropped")));
        assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 3);
        // The worker then gets the two that fit, in order; a frame without trials is not handed over.
        for want in 0..2 {
            match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                Recv::Msg(f) => assert_eq!(f.glm.unwrap().trials[0].trial, want),
                other => panic!("{other:?}"),
            }
        }
        let mut empty = frame_with_trial(9);
        empty.glm = None;
        assert!(dispatch.process(&mut empty).is_ok());
        assert!(matches!(rx.recv_timeout(std::time::Duration::from_millis(50)), Recv::Timeout));
    }
}
