//! What a closed-form fit reports: held-out estimates of each component's gain, and what was
//! kept.

use serde::Serialize;

use crate::decode::align::InputNorm;

/// A held-out estimate: mean over held-out pairs of stimuli, its standard error (see
/// `Folds::estimate`) and `n` stimuli.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    /// Mean.
    pub mean: f64,
    /// Standard error of the mean.
    pub se: f64,
    /// Held-out stimuli.
    pub n: usize,
}

/// What was decided about the input normalisation and voxel modes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InputReport {
    /// The baseline normalisation.
    pub baseline: InputNorm,
    /// The normalisation used.
    pub input: InputNorm,
    /// Voxel modes removed.
    pub modes: usize,
    /// Whether a choice other than the baseline was kept.
    pub kept: bool,
    /// The best candidate, kept or not.
    pub best: (InputNorm, usize),
    /// Level of its one-sided test: `guard_p` over the candidates other than the baseline
    /// (the best of several is what is tested).
    pub level: f64,
    /// Held-out gain of the whole pipeline with the choice over the pipeline with the
    /// baseline, in identification margin (the choice itself nested).
    pub margin_gain: Estimate,
    /// The same gain in 2-way identification of held-out pairs.
    pub two_way_gain: Estimate,
}

/// What was decided about one head's correction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeadReport {
    /// The head.
    pub head: String,
    /// `latent` (a low-rank head's latent) or `output`.
    pub space: &'static str,
    /// Whether the correction was kept.
    pub kept: bool,
    /// Its penalty (relative to the Gram matrix's mean diagonal), when kept.
    pub alpha: Option<f64>,
    /// Held-out gain of the correction, in identification margin.
    pub margin_gain: Estimate,
    /// The same gain in 2-way identification of held-out pairs.
    pub two_way_gain: Estimate,
}

/// Held-out 2-way identification of pairs of calibration stimuli (mean over heads).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TwoWayReport {
    /// With the baseline normalisation only.
    pub baseline: f64,
    /// With what was kept.
    pub calibrated: f64,
    /// Per held-out stimulus, calibrated − baseline.
    pub gain: Estimate,
}

/// How a closed-form fit went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransferReport {
    /// `closed-form`.
    pub method: &'static str,
    /// Calibration trials.
    pub n_trials: usize,
    /// Distinct stimuli among them.
    pub n_stimuli: usize,
    /// Trials of the run (calibration trials and others: statistics and modes).
    pub n_run_trials: usize,
    /// Level of the guard's one-sided test.
    pub guard_p: f64,
    /// The input stage (absent when too few stimuli to test anything).
    pub input: Option<InputReport>,
    /// Each head with targets.
    pub heads: Vec<HeadReport>,
    /// Held-out 2-way with and without what was kept.
    pub two_way: Option<TwoWayReport>,
    /// Why nothing was tested, when so.
    pub note: Option<String>,
    /// Wall time of the fit, s.
    pub seconds: f64,
}
