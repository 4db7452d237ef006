//! Calibration mode: fit the domain-alignment head on a few imagery trials so that a decoder
//! trained on seen images works on this participant's imagery today.
//!
//! [`head`] is the head and the adapters (none, per-run z-scoring, head); [`fit`] fits it
//! with candle-nn's AdamW; [`protocol`] reads the cue schedules of `calibration/*.toml`.

pub mod fit;
pub mod head;
pub mod protocol;

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

/// How one head's outputs are pulled to their targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadLoss {
    /// `1 − cos(prediction, target)`, per trial.
    Cosine,
    /// Mean squared error over the target's variance.
    Mse,
}

/// `[calibrate]` settings: the head's size and the fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrateConfig {
    /// Rank of the low-rank correction `U·Vᵀ`.
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

impl Default for CalibrateConfig {
    fn default() -> CalibrateConfig {
        CalibrateConfig {
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
        if self.rank > 1024 {
            e.push("calibrate.rank must be at most 1024".into());
        }
        if self.steps == 0 {
            e.push("calibrate.steps must be at least 1".into());
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
        if let Some(p) = &self.protocol {
            if let Err(err) = protocol::Protocol::load(p) {
                e.push(format!("calibrate.protocol: {err}"));
            }
        }
        if self.head_weights.values().any(|w| !(w.is_finite() && *w >= 0.0)) {
            e.push("calibrate.head_weights must be non-negative numbers".into());
        }
        e
    }
}
