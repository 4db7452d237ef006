//! Calibration mode: fit the domain-alignment head on a few imagery trials so that a decoder
//! trained on seen images works on this participant's imagery today.
//!
//! [`transfer`] is the default fit: closed form, cross-validated over stimuli and guarded, its
//! result an [`Alignment`](crate::decode::align::Alignment). [`fit`](mod@fit) is the older
//! gradient fit of a voxel-space head ([`AlignmentHead`](crate::decode::align::AlignmentHead)),
//! kept as `calibrate.method = "gradient"`; [`protocol`] reads the cue schedules of
//! `calibration/*.toml`. What they fit is read, written and applied by `crate::decode::align`.

pub mod fit;
pub mod live;
pub mod protocol;
pub mod transfer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why calibration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalibrateError {
    /// The calibration trials cannot be used (too few, unknown stimuli, wrong size).
    #[error("calibrate: {0}")]
    Input(String),
    /// An alignment head file is unusable or belongs to another model.
    #[error("calibrate: alignment head: {0}")]
    Head(String),
    /// A protocol file is unusable.
    #[error("calibrate: protocol: {0}")]
    Protocol(String),
    /// A tensor operation failed.
    #[error("calibrate: {0}")]
    Compute(String),
}

impl From<crate::decode::align::AlignError> for CalibrateError {
    fn from(e: crate::decode::align::AlignError) -> CalibrateError {
        use crate::decode::align::AlignError;
        match e {
            AlignError::File(m) => CalibrateError::Head(m),
            AlignError::Compute(m) => CalibrateError::Compute(m),
        }
    }
}

impl CalibrateError {
    /// Counter name of this kind of error.
    pub fn reason(&self) -> &'static str {
        match self {
            CalibrateError::Input(_) => "calibrate_input",
            CalibrateError::Head(_) => "calibrate_head",
            CalibrateError::Protocol(_) => "calibrate_protocol",
            CalibrateError::Compute(_) => "calibrate_compute",
        }
    }
}

/// Calibration trials of one run: betas, the stimulus each showed, each head's targets, and the
/// run's other trials (their betas enter the run's statistics).
#[derive(Clone, Debug, Default)]
pub struct CalibrationSet {
    /// Betas of the calibration trials, `trials × n_voxels`, row-major.
    pub betas: Vec<f32>,
    /// Stimulus id of each calibration trial (held-out folds are by stimulus).
    pub stimuli: Vec<String>,
    /// Per head: targets, `trials × n_outputs`, row-major.
    pub targets: BTreeMap<String, Vec<f32>>,
    /// Betas of the run's other trials, `others × n_voxels` (they enter the run's statistics).
    pub others: Vec<f32>,
    /// The calibration trials' condition (e.g. `imagery`), when known.
    pub condition: Option<String>,
}

impl CalibrationSet {
    /// Number of calibration trials.
    pub fn len(&self) -> usize {
        self.stimuli.len()
    }

    /// Whether there are no calibration trials.
    pub fn is_empty(&self) -> bool {
        self.stimuli.is_empty()
    }

    /// Checks sizes and values against `decoder`, with at least `min_trials` trials.
    pub fn check(
        &self,
        decoder: &crate::decode::model::Decoder,
        min_trials: usize,
    ) -> Result<(), CalibrateError> {
        let (n, v) = (self.len(), decoder.cfg.n_voxels);
        if n < min_trials {
            return Err(CalibrateError::Input(format!(
                "{n} calibration trials; at least {min_trials} are needed"
            )));
        }
        if self.betas.len() != n * v || self.others.len() % v.max(1) != 0 {
            return Err(CalibrateError::Input(format!(
                "{} betas for {n} trials; the model takes {v} voxels per trial (is it the model these betas \
                 were fitted for?)",
                self.betas.len()
            )));
        }
        for (what, x) in [("trial", &self.betas), ("other trial", &self.others)] {
            if let Some(i) = x.iter().position(|b| !b.is_finite()) {
                return Err(CalibrateError::Input(format!(
                    "{what} {}, voxel {}: beta is not finite",
                    i / v,
                    i % v
                )));
            }
        }
        for (name, values) in &self.targets {
            let Some(h) = decoder.heads.iter().find(|h| &h.cfg.name == name) else {
                return Err(CalibrateError::Input(format!(
                    "targets for head {name:?}, which the model lacks"
                )));
            };
            let out = h.cfg.n_outputs();
            if values.len() != n * out {
                return Err(CalibrateError::Input(format!(
                    "head {name}: {} target values for {n} trials of {out}",
                    values.len()
                )));
            }
            if values.iter().any(|x| !x.is_finite()) {
                return Err(CalibrateError::Input(format!("head {name}: targets are not finite")));
            }
        }
        Ok(())
    }
}

/// One step of a fit, for progress reports.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    /// What the fit is doing: `prepare`, `inputs` (closed form); `select`, `refit` (gradient).
    pub phase: &'static str,
    /// Step number (1-based).
    pub step: usize,
    /// Steps of this phase.
    pub steps: usize,
    /// Training loss (gradient fit).
    pub loss: Option<f64>,
    /// Held-out loss (gradient fit, `select`).
    pub heldout_loss: Option<f64>,
    /// Cross-validation fold (1-based) and number of folds (gradient fit, `select`).
    pub fold: Option<(usize, usize)>,
}

impl Progress {
    /// A step of a phase without losses.
    pub fn stage(phase: &'static str, step: usize, steps: usize) -> Progress {
        Progress { phase, step, steps, loss: None, heldout_loss: None, fold: None }
    }
}

/// One `calibration` message: where calibration stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CalibrationEvent {
    /// `collecting`, `fitting`, `done`, `failed` or `incomplete` (the run ended first).
    pub phase: &'static str,
    /// Calibration trials collected so far.
    pub collected: usize,
    /// Trials the protocol cues.
    pub needed: usize,
    /// The trial just collected.
    pub trial: Option<u64>,
    /// Its stimulus number (as in `betas` and `decode`; the gallery id is its decimal).
    pub stim: Option<u64>,
    /// Fit progress: step and most steps of the current phase.
    pub step: Option<(usize, usize)>,
    /// What the fit is doing: closed form, `prepare` (each head's predictions) then `inputs`
    /// (each input candidate's pipeline, the heads' corrections included); gradient, `fold k/n`
    /// (choosing the step count on held-out stimuli; each fold counts its steps from 1) or
    /// `refit`.
    pub fit_stage: Option<String>,
    /// Current training loss.
    pub loss: Option<f64>,
    /// Current held-out loss.
    pub heldout_loss: Option<f64>,
    /// The finished fit: what was kept and its held-out estimates (closed form), or the
    /// gradient fit's losses.
    pub report: Option<FitSummary>,
    /// Where the alignment was saved.
    pub path: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}

impl CalibrationEvent {
    /// The `calibration` topic's header of this event.
    pub fn header(&self) -> crate::topic::CalibrationHeader {
        crate::topic::CalibrationHeader {
            phase: self.phase.to_string(),
            collected: self.collected,
            needed: self.needed,
            trial: self.trial,
            stim: self.stim,
            step: self.step,
            fit_stage: self.fit_stage.clone(),
            loss: self.loss,
            heldout_loss: self.heldout_loss,
            report: self.report.as_ref().and_then(|r| serde_json::to_value(r).ok()),
            path: self.path.clone(),
            error: self.error.clone(),
        }
    }
}

/// Which fit calibration runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Closed form, cross-validated over stimuli and guarded ([`transfer`]).
    #[default]
    ClosedForm,
    /// The gradient fit of a voxel-space head ([`fit`](mod@fit)).
    Gradient,
}

/// How a fit went, whichever method ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FitSummary {
    /// The closed-form fit.
    ClosedForm(transfer::TransferReport),
    /// The gradient fit.
    Gradient(fit::FitReport),
}

/// Fits an alignment for `decoder` on `set` with the configured method; `progress` hears each
/// step. Returns the adapter to decode with and how the fit went.
pub fn fit(
    decoder: &crate::decode::model::Decoder,
    set: &CalibrationSet,
    cfg: &CalibrateConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(crate::decode::align::Adapter, FitSummary), CalibrateError> {
    match cfg.method {
        Method::ClosedForm => {
            let (a, r) = transfer::fit(decoder, set, cfg, progress)?;
            Ok((crate::decode::align::Adapter::Calibrated(a), FitSummary::ClosedForm(r)))
        }
        Method::Gradient => {
            let (h, r) = fit::fit(decoder, set, cfg, progress)?;
            Ok((crate::decode::align::Adapter::Head(h), FitSummary::Gradient(r)))
        }
    }
}

/// How one head's outputs are pulled to their targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadLoss {
    /// `1 − cos(prediction, target)`, per trial.
    Cosine,
    /// Mean squared error over the target's variance.
    Mse,
}

/// `[calibrate]` settings: which fit, its candidates and guard, and (gradient fit) the head's
/// size and optimiser.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrateConfig {
    /// `closed-form` (default) or `gradient`.
    pub method: Method,
    /// Input normalisations tried; the first (centring on the run's mean) is the baseline kept
    /// unless another reliably wins. `zscore-run` is not a default: its spread includes the
    /// held-out trials, which makes its cross-validated score optimistic.
    pub inputs: Vec<crate::decode::align::InputNorm>,
    /// Numbers of the calibration run's largest voxel modes tried for removal.
    pub modes: Vec<usize>,
    /// Penalties tried for each head's correction, relative to its Gram matrix's mean diagonal.
    pub alphas: Vec<f64>,
    /// Level of the guard's one-sided paired t-test over held-out stimuli (the input
    /// candidate, the best of several: this over their number).
    pub guard_p: f64,
    /// Fewest distinct stimuli with which anything is tested (else nothing is fitted and the run
    /// is z-scored, MIRAGE's zero-shot baseline).
    pub min_stimuli: usize,
    /// Gradient fit: rank of the low-rank correction `U·Vᵀ`.
    pub rank: usize,
    /// Most AdamW steps.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Weight of the penalty toward identity.
    pub identity_penalty: f64,
    /// Weight of the moment-alignment (CORAL-style) term.
    pub coral_weight: f64,
    /// Heads whose latents are moment-aligned (empty: the fusion image head, else the first).
    pub coral_heads: Vec<String>,
    /// Weight of each head's target loss (heads not named: 1; 0 leaves a head out).
    pub head_weights: BTreeMap<String, f64>,
    /// Loss of each head (heads not named: `mse` for image-shaped `[c, h, w]` heads, else
    /// `cosine`).
    pub head_losses: BTreeMap<String, HeadLoss>,
    /// Fraction of the calibration stimuli held out per fold (folds = 1 / holdout) when the
    /// step count is chosen by cross-validation; 0 takes `steps` steps.
    pub holdout: f64,
    /// Steps without a better held-out loss before stopping.
    pub patience: usize,
    /// Fewest calibration trials accepted.
    pub min_trials: usize,
    /// Seed of the held-out split and the head's initialisation.
    pub seed: u64,
    /// Calibration protocol for `decode.mode = "calibrate"` (`calibration/*.toml`).
    pub protocol: Option<PathBuf>,
    /// Where calibration mode saves the head (default: `alignment.safetensors` in the session
    /// folder, or `alignment-<time>.safetensors` in the model folder when not recording).
    pub out: Option<PathBuf>,
}

impl crate::settings::InputFiles for CalibrateConfig {
    /// The protocol (the fitted head's `out` is an output: it stays relative to the working
    /// directory).
    fn resolve_inputs(&mut self, base: &std::path::Path) {
        if let Some(p) = &mut self.protocol {
            crate::settings::rebase(p, base);
        }
    }
}

impl Default for CalibrateConfig {
    fn default() -> CalibrateConfig {
        CalibrateConfig {
            method: Method::ClosedForm,
            inputs: vec![crate::decode::align::InputNorm::CentreRun, crate::decode::align::InputNorm::Model],
            modes: vec![0, 1, 2, 4],
            alphas: vec![10.0, 3.0, 1.0, 0.3, 0.1, 0.03],
            guard_p: 0.2,
            min_stimuli: 10,
            rank: 8,
            steps: 600,
            lr: 0.003,
            identity_penalty: 0.1,
            coral_weight: 0.1,
            coral_heads: Vec::new(),
            head_weights: BTreeMap::new(),
            head_losses: BTreeMap::new(),
            holdout: 0.25,
            patience: 40,
            min_trials: 4,
            seed: 1,
            protocol: None,
            out: None,
        }
    }
}

impl CalibrateConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.rank == 0 || self.rank > 1024 {
            e.push("calibrate.rank must be between 1 and 1024".into());
        }
        if self.inputs.is_empty() {
            e.push(
                "calibrate.inputs must name at least one normalisation (the first is the baseline)".into(),
            );
        }
        if (1..self.inputs.len()).any(|i| self.inputs[..i].contains(&self.inputs[i])) {
            e.push("calibrate.inputs lists a normalisation twice".into());
        }
        if self.modes.is_empty() || self.modes.iter().any(|&k| k > 64) {
            e.push("calibrate.modes must list numbers of modes from 0 to 64 (0: none)".into());
        }
        if self.alphas.is_empty() || self.alphas.iter().any(|a| !(a.is_finite() && *a > 0.0)) {
            e.push("calibrate.alphas must list positive penalties".into());
        }
        if !(self.guard_p > 0.0 && self.guard_p <= 0.5) {
            e.push("calibrate.guard_p must be in (0, 0.5]".into());
        }
        if self.min_stimuli < 3 {
            e.push("calibrate.min_stimuli must be at least 3".into());
        }
        if self.steps == 0 {
            e.push("calibrate.steps must be at least 1".into());
        }
        // Its contents are read and checked once, where a run resolves its inputs.
        if let Some(p) = self.protocol.as_deref().filter(|p| !p.exists()) {
            e.push(format!("calibrate.protocol: {} does not exist", p.display()));
        }
        for (name, v) in [
            ("lr", self.lr),
            ("identity_penalty", self.identity_penalty),
            ("coral_weight", self.coral_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                e.push(format!("calibrate.{name} must be a non-negative number"));
            }
        }
        if self.lr == 0.0 {
            e.push("calibrate.lr must be positive".into());
        }
        if !(0.0..0.9).contains(&self.holdout) {
            e.push("calibrate.holdout must be in [0, 0.9)".into());
        }
        if self.min_trials < 2 {
            e.push("calibrate.min_trials must be at least 2".into());
        }
        if self.head_weights.values().any(|w| !(w.is_finite() && *w >= 0.0)) {
            e.push("calibrate.head_weights must be non-negative numbers".into());
        }
        e
    }
}
