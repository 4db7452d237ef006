//! The decode stage's two halves on the runner's side: the dispatch on the volume path, which
//! hands closed trials to the decode worker's thread, and the adapter that thread runs.

use crate::calibrate::CalibrationEvent;
use crate::decode::Decoded;
use crate::frame::{Frame, FrameKind};
use crate::glm::GlmOutput;
use crate::stage::{Stage, StageError};

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
        let (Some(c), Some(decoder)) = (&mut self.calibration, self.stage.decoder().cloned()) else { return };
        let (event, adapter) = c.poll(wait, &decoder);
        let finished = if wait { c.finish() } else { None };
        frame.outputs.update::<Vec<CalibrationEvent>>(|v| v.extend(event.into_iter().chain(finished)));
        if let Some(adapter) = adapter {
            tracing::info!("calibration: switching to the fitted alignment");
            self.stage.set_adapter(adapter);
        }
    }
}

impl Stage for DecodeStageAdapter {
    fn name(&self) -> &'static str {
        "decode"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        let mut first_error = None;
        let (mut decoded, mut events) = (Vec::new(), Vec::new());
        // When the trials were closed: the last stamp before the decode stage.
        let closed_time = frame.stamps.latest();
        if let Some(glm) = frame.outputs.get::<GlmOutput>() {
            for t in glm.trials.iter().filter(|t| self.run_end || !t.at_run_end) {
                let start = (self.now)();
                match self.stage.decode(t) {
                    Ok(mut d) => {
                        d.latency_ms = ((self.now)() - start) * 1e3;
                        // The budget is the live loop's: end-of-run estimates are not held to it.
                        d.over_budget = !t.at_run_end && d.latency_ms > self.budget_ms;
                        d.closed_time = closed_time;
                        decoded.push(d);
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
                if let (Some(c), Some(decoder)) = (&mut self.calibration, self.stage.decoder()) {
                    events.extend(c.observe(t, decoder));
                }
            }
        }
        if !decoded.is_empty() {
            frame.outputs.update::<Vec<Decoded>>(|v| v.extend(decoded));
        }
        if !events.is_empty() {
            frame.outputs.update::<Vec<CalibrationEvent>>(|v| v.extend(events));
        }
        let end = frame.kind == FrameKind::EndOfRun;
        self.poll_calibration(frame, end);
        first_error.map_or(Ok(()), Err)
    }

    fn flush(&mut self, last: &Frame) -> Option<Frame> {
        let mut f = Frame::end_of_run_after(last);
        self.poll_calibration(&mut f, true);
        f.outputs.get::<Vec<CalibrationEvent>>().is_some_and(|v| !v.is_empty()).then_some(f)
    }
}

impl DecodeStageAdapter {
    /// Between trials: calibration progress, and the switch to a fitted head, as a frame of
    /// results after `last` (or nothing to report).
    pub fn idle(&mut self, last: &Frame) -> Option<Frame> {
        let mut f = Frame::results_after(last);
        self.poll_calibration(&mut f, false);
        f.outputs.get::<Vec<CalibrationEvent>>().is_some_and(|v| !v.is_empty()).then_some(f)
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
        let trials = frame.outputs.get::<GlmOutput>().map(|g| g.trials.clone()).unwrap_or_default();
        if !trials.is_empty() || frame.kind == FrameKind::EndOfRun {
            // The worker needs the trials, not the volume's ROI feedback.
            let mut copy = frame.clone();
            copy.outputs.insert(GlmOutput { trials, ..Default::default() });
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
        end.outputs.update::<GlmOutput>(|g| g.trials[0].at_run_end = true);
        adapter.process(&mut live).unwrap();
        adapter.process(&mut end).unwrap();
        let decoded = |f: &Frame| f.outputs.get::<Vec<Decoded>>().unwrap()[0].clone();
        let (l, e) = (&decoded(&live), &decoded(&end));
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
        assert!(!decoded(&again).over_budget);
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
                Recv::Msg(f) => assert_eq!(f.outputs.get::<GlmOutput>().unwrap().trials[0].trial, want),
                other => panic!("{other:?}"),
            }
        }
        let mut empty = frame_with_trial(9);
        empty.outputs = Default::default();
        assert!(dispatch.process(&mut empty).is_ok());
        assert!(matches!(rx.recv_timeout(std::time::Duration::from_millis(50)), Recv::Timeout));
    }
}
