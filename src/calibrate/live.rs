//! Calibration mode, live: collect the protocol's imagery trials as they close, fit the
//! alignment head on a thread of its own (decoding goes on meanwhile), save it, and switch the
//! decoder to it without a restart. [`CalibratingDecoder`] is the decoder doing all that, the
//! worker the decode stage hands its trials to in calibration mode.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::calibrate::protocol::Protocol;
use crate::calibrate::{
    fit, CalibrateConfig, CalibrateError, CalibrationEvent, CalibrationSet, FitSummary, Progress,
};
use crate::decode::align::Adapter;
use crate::decode::gallery::Gallery;
use crate::decode::model::Decoder;
use crate::decode::stage::DecodeWorker;
use crate::frame::{Frame, FrameKind, Tally};
use crate::glm::{GlmOutput, TrialBetas};
use crate::reason::Reason;
use crate::stage::{OffPath, Stage, StageError};
use crate::topic::CalibrationHeader;

/// Calibration mode ended without a fitted alignment.
pub const CALIBRATION_FAILED: Reason =
    Reason::new("calibration_failed", "calibrations that failed or ended incomplete");

type FitResult = Result<(Adapter, FitSummary), CalibrateError>;

/// Most of the run's other trials kept for its statistics.
const MAX_OTHER_TRIALS: usize = 512;

enum State {
    Collecting,
    Fitting { thread: JoinHandle<FitResult>, progress: crossbeam_channel::Receiver<Progress> },
    Finished,
}

/// The live calibration of one session.
pub struct LiveCalibration {
    protocol: Protocol,
    cfg: CalibrateConfig,
    out: PathBuf,
    targets: BTreeMap<String, BTreeMap<String, Vec<f32>>>,
    per_stim: BTreeMap<String, usize>,
    set: CalibrationSet,
    run: Option<String>,
    /// The run's other trials' betas, per condition (the calibration trials' condition's join
    /// the run's statistics in the fit).
    others: BTreeMap<String, Vec<f32>>,
    state: State,
}

impl LiveCalibration {
    /// Checks the protocol against the model and gallery (every cued stimulus must be a
    /// gallery item; the gallery gives the targets) and starts collecting.
    pub fn new(
        protocol: Protocol,
        cfg: CalibrateConfig,
        out: PathBuf,
        decoder: &Decoder,
        gallery: Option<&Gallery>,
    ) -> Result<LiveCalibration, CalibrateError> {
        let g = gallery.ok_or_else(|| {
            CalibrateError::Input("calibration needs a gallery: it holds the cued stimuli's targets".into())
        })?;
        let unknown: Vec<&String> =
            protocol.stimuli.iter().filter(|s| !g.items.iter().any(|i| &i.id == *s)).collect();
        if !unknown.is_empty() {
            return Err(CalibrateError::Input(format!(
                "protocol stimuli {unknown:?} are not in the gallery"
            )));
        }
        let mut targets = BTreeMap::new();
        for s in &protocol.stimuli {
            let Some(k) = g.items.iter().position(|i| &i.id == s) else { continue };
            let mut per_head = BTreeMap::new();
            for h in &decoder.cfg.heads {
                let out = h.n_outputs();
                if let Some((size, values)) = g.embeddings.get(&h.name).filter(|(size, _)| *size == out) {
                    per_head.insert(h.name.clone(), values[k * size..(k + 1) * size].to_vec());
                } else if let Some((shape, pixels)) = g.thumbnails.as_ref().filter(|(shape, _)| {
                    Some(&h.name) == decoder.cfg.fusion.pixel_head.as_ref()
                        && shape.iter().product::<usize>() == out
                }) {
                    let size: usize = shape.iter().product();
                    per_head.insert(h.name.clone(), pixels[k * size..(k + 1) * size].to_vec());
                }
            }
            if per_head.is_empty() {
                return Err(CalibrateError::Input(
                    "the gallery holds targets for none of the model's heads".into(),
                ));
            }
            targets.insert(s.clone(), per_head);
        }
        Ok(LiveCalibration {
            protocol,
            cfg,
            out,
            targets,
            per_stim: BTreeMap::new(),
            set: CalibrationSet::default(),
            run: None,
            others: BTreeMap::new(),
            state: State::Collecting,
        })
    }

    /// Takes a closed trial: collects it when it is one of the protocol's cues still
    /// wanted (any other trial of the run joins the run's statistics), and starts the fit once
    /// all are in.
    pub fn observe(&mut self, t: &TrialBetas, decoder: &Arc<Decoder>) -> Option<CalibrationEvent> {
        // Trials the model cannot take were refused (and counted) by decode already.
        let fits = t.betas.len() == decoder.cfg.n_voxels && t.betas.iter().all(|b| b.is_finite());
        if !matches!(self.state, State::Collecting) || t.at_run_end || !t.estimable || !fits {
            return None;
        }
        if self.run.as_deref() != Some(t.run.as_str()) {
            // A new run: its statistics start over (collected cues stay).
            self.run = Some(t.run.clone());
            self.others.clear();
        }
        let cue = t.stim.map(|s| s.to_string()).filter(|s| {
            self.targets.contains_key(s) && self.per_stim.get(s).copied().unwrap_or(0) < self.protocol.repeats
        });
        let Some(stim) = cue else {
            let others = self.others.entry(t.condition.clone()).or_default();
            if others.len() < MAX_OTHER_TRIALS * t.betas.len() {
                others.extend_from_slice(&t.betas);
            }
            return None;
        };
        self.set.condition.get_or_insert_with(|| t.condition.clone());
        let targets = self.targets.get(&stim)?;
        let count = self.per_stim.entry(stim.clone()).or_default();
        *count += 1;
        self.set.betas.extend_from_slice(&t.betas);
        self.set.stimuli.push(stim.clone());
        for (head, values) in targets {
            self.set.targets.entry(head.clone()).or_default().extend_from_slice(values);
        }
        let mut ev = self.event("collecting");
        ev.trial = Some(t.trial);
        ev.stim = t.stim;
        if self.set.len() == self.protocol.n_trials() {
            let condition = self.set.condition.clone().unwrap_or_default();
            self.set.others = self.others.remove(&condition).unwrap_or_default();
            let (tx, rx) = crossbeam_channel::bounded(1024);
            let (decoder, set, cfg) = (decoder.clone(), std::mem::take(&mut self.set), self.cfg.clone());
            let spawned = std::thread::Builder::new().name("mirage/calibrate".into()).spawn(move || {
                fit(&decoder, &set, &cfg, &mut |p| {
                    let _ = tx.try_send(p.clone());
                })
            });
            match spawned {
                Ok(thread) => {
                    self.state = State::Fitting { thread, progress: rx };
                    ev.phase = "fitting";
                }
                Err(e) => {
                    self.state = State::Finished;
                    ev.phase = "failed";
                    ev.error = Some(format!("could not start the fit: {e}"));
                }
            }
        }
        Some(ev)
    }

    /// Reports fit progress and, once the fit is over (waiting for it when `wait`), the
    /// saved alignment to switch to.
    pub fn poll(&mut self, wait: bool, decoder: &Decoder) -> (Option<CalibrationEvent>, Option<Adapter>) {
        let State::Fitting { thread, progress } = &self.state else { return (None, None) };
        if !wait && !thread.is_finished() {
            let last = progress.try_iter().last();
            return (
                last.map(|p| {
                    let mut ev = self.event("fitting");
                    ev.step = Some((p.step, p.steps));
                    ev.fit_stage = Some(match p.fold {
                        Some((k, n)) => format!("fold {k}/{n}"),
                        None => p.phase.to_string(),
                    });
                    ev.loss = p.loss;
                    ev.heldout_loss = p.heldout_loss;
                    ev
                }),
                None,
            );
        }
        let State::Fitting { thread, .. } = std::mem::replace(&mut self.state, State::Finished) else {
            return (None, None);
        };
        let result =
            thread.join().unwrap_or_else(|_| Err(CalibrateError::Compute("the fit panicked".into())));
        let mut ev = self.event("done");
        match result.and_then(|(head, report)| {
            head.save(&self.out, decoder).map(|()| (head, report)).map_err(CalibrateError::from)
        }) {
            Ok((head, report)) => {
                ev.report = Some(report);
                ev.path = Some(self.out.display().to_string());
                (Some(ev), Some(head))
            }
            Err(e) => {
                ev.phase = "failed";
                ev.error = Some(e.to_string());
                (Some(ev), None)
            }
        }
    }

    /// At the end of the input: an `incomplete` event when trials were still missing.
    pub fn finish(&mut self) -> Option<CalibrationEvent> {
        if matches!(self.state, State::Collecting) {
            self.state = State::Finished;
            let mut ev = self.event("incomplete");
            ev.error = Some(format!(
                "the run ended after {} of {} calibration trials; no head was fitted",
                self.set.len(),
                self.protocol.n_trials()
            ));
            return Some(ev);
        }
        None
    }

    fn event(&self, phase: &'static str) -> CalibrationEvent {
        let collected = match self.state {
            State::Collecting => self.set.len(),
            _ => self.protocol.n_trials(),
        };
        CalibrationEvent { phase, collected, needed: self.protocol.n_trials(), ..Default::default() }
    }
}

/// The decoder in calibration mode: decodes as [`DecodeWorker`] does, feeds each closed trial to
/// the live calibration, reports its progress as `calibration` headers in the frame, and
/// switches the decoder to the fitted alignment once it is saved.
pub struct CalibratingDecoder {
    decoder: DecodeWorker,
    calibration: LiveCalibration,
}

impl CalibratingDecoder {
    /// Calibration mode around `decoder`: `protocol` checked against its model and gallery, the
    /// fitted head saved to `out`.
    pub fn new(
        decoder: DecodeWorker,
        protocol: Protocol,
        cfg: CalibrateConfig,
        out: PathBuf,
    ) -> Result<CalibratingDecoder, String> {
        let heads = decoder
            .stage
            .decoder()
            .ok_or("calibration mode fits MIRAGE heads' alignment, not a mindeye2 model's")?;
        let calibration = LiveCalibration::new(protocol, cfg, out, heads, decoder.stage.gallery())
            .map_err(|e| e.to_string())?;
        Ok(CalibratingDecoder { decoder, calibration })
    }

    /// Puts into `frame` the fit's progress (waiting for the fit when `wait`), and switches to
    /// the fitted alignment when it is ready.
    fn poll(&mut self, frame: &mut Frame, wait: bool) {
        let Some(heads) = self.decoder.stage.decoder().cloned() else { return };
        let (event, adapter) = self.calibration.poll(wait, &heads);
        let finished = if wait { self.calibration.finish() } else { None };
        report(frame, event.into_iter().chain(finished));
        if let Some(adapter) = adapter {
            tracing::info!("calibration: switching to the fitted alignment");
            self.decoder.stage.set_adapter(adapter);
        }
    }
}

/// Adds `events` to the frame's `calibration` headers, counting those that failed.
fn report(frame: &mut Frame, events: impl IntoIterator<Item = CalibrationEvent>) {
    let headers: Vec<CalibrationHeader> = events.into_iter().map(|e| e.header()).collect();
    let failed = headers.iter().filter(|h| matches!(h.phase.as_str(), "failed" | "incomplete")).count();
    if failed > 0 {
        frame.outputs.update::<Tally>(|t| t.0.push((CALIBRATION_FAILED.name, failed as u64)));
    }
    if !headers.is_empty() {
        frame.outputs.update::<Vec<CalibrationHeader>>(|v| v.extend(headers));
    }
}

impl Stage for CalibratingDecoder {
    fn name(&self) -> &'static str {
        self.decoder.name()
    }

    fn warm_up(&mut self) -> Result<(), StageError> {
        self.decoder.warm_up()
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        let decoded = self.decoder.process(frame);
        let trials = frame.outputs.get::<GlmOutput>().map(|g| g.trials.clone()).unwrap_or_default();
        if let Some(heads) = self.decoder.stage.decoder().cloned() {
            let events: Vec<CalibrationEvent> =
                trials.iter().filter_map(|t| self.calibration.observe(t, &heads)).collect();
            report(frame, events);
        }
        let end = frame.kind == FrameKind::EndOfRun;
        self.poll(frame, end);
        decoded
    }

    /// Between trials: calibration progress, and the switch to a fitted head.
    fn idle(&mut self, last: &Frame) -> Option<Frame> {
        let mut f = Frame::results_after(last);
        self.poll(&mut f, false);
        f.outputs.get::<Vec<CalibrationHeader>>().is_some_and(|v| !v.is_empty()).then_some(f)
    }

    fn flush(&mut self, last: &Frame) -> Option<Frame> {
        let mut f = Frame::end_of_run_after(last);
        self.poll(&mut f, true);
        f.outputs.get::<Vec<CalibrationHeader>>().is_some_and(|v| !v.is_empty()).then_some(f)
    }

    fn off_path(&mut self) -> Option<OffPath> {
        self.decoder.off_path()
    }

    fn hand_off(&self, frame: &Frame) -> Vec<Frame> {
        self.decoder.hand_off(frame)
    }
}
