//! Neurofeedback signals from the ROI means: a `feedback` value per volume by a configured
//! recipe, after the GLM: OpenNFT's own PSC ([`opennft`]), so a lab moving from OpenNFT sees the
//! number it knows, or mirage's composable steps ([`steps`]), whose defaults the feedback worlds
//! chose; `psc` stays beside them.

pub mod opennft;
pub mod stage;
pub mod steps;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::reason::Reason;

/// A volume the feedback recipe could not take (no TR, past the planned run length).
pub const FEEDBACK: Reason =
    Reason::new("feedback", "volumes the feedback recipe could not take (no TR, past feedback.volumes)");

/// A live block marker the recipe could not place (past the planned run, overlapping a block).
pub const FEEDBACK_MARKER: Reason = Reason::new(
    "feedback_marker",
    "live block markers the feedback recipe refused (outside the planned run, overlapping)",
);

/// What the feedback stage counts.
pub const REASONS: &[Reason] = &[FEEDBACK, FEEDBACK_MARKER];

/// Which recipe makes the `feedback` value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// No feedback value (the stage is not on the path).
    #[default]
    None,
    /// OpenNFT's continuous PSC, step for step ([`opennft`]).
    Opennft,
    /// OpenNFT's intermittent PSC: one value per regulation block, shown at its end and through
    /// the display volumes after it.
    #[serde(rename = "opennft_intermittent")]
    OpennftIntermittent,
    /// mirage's own recipe: detrend, despike, smooth, normalise, show, each optional ([`steps`]).
    Steps,
}

/// How the ROIs' values become one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CombineRois {
    /// Their mean (OpenNFT's GUI default).
    #[default]
    Mean,
    /// Their median.
    Median,
    /// The first ROI's minus the second's (differential feedback).
    Difference,
    /// A weighted sum: `feedback.weights`, one per ROI.
    Weighted,
}

/// `[feedback]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// The recipe.
    pub recipe: Recipe,
    /// A BIDS events file whose `regulation` rows are the regulation blocks (none: `glm.events`);
    /// every other volume is baseline.
    pub protocol: Option<PathBuf>,
    /// The `trial_type` of the regulation blocks.
    pub regulation: String,
    /// The `trial_type` of the baseline blocks (none: every volume in no other block).
    pub baseline: Option<String>,
    /// `steps`: blocks also from the live events (`glm.markers`) as they arrive.
    pub markers: bool,
    /// The `trial_type` of the feedback display blocks (intermittent feedback shows its value there).
    pub display: String,
    /// The `glm.rois` the value is made of, by name, in order (empty: all of them).
    pub rois: Vec<String>,
    /// How they are combined.
    pub combine: CombineRois,
    /// The weights of `combine = "weighted"`, one per ROI, in order.
    pub weights: Vec<f64>,
    /// The six motion parameters in the recipe's fit (OpenNFT has them; for `steps` the
    /// feedback worlds chose them).
    pub motion_regressors: bool,
    /// `steps`: a linear trend in the fit.
    pub trend: bool,
    /// `steps`: the task regressor in the fit, its fit kept in the signal.
    pub task_regressors: bool,
    /// `steps`: a `glm.rois` name whose mean enters the fit (white matter, whole brain).
    pub nuisance: Option<String>,
    /// `steps`: clip values beyond this many robust σ (0: off).
    pub despike: f64,
    /// `steps`: exponential smoothing's time constant in seconds (0: off).
    pub smooth_s: f64,
    /// `steps`: minus the last baseline block's median.
    pub normalise: bool,
    /// `steps`: the percent change shown as `max` (0: the percent itself, unclipped).
    pub full_scale: f64,
    /// The planned run length in volumes (OpenNFT's linear trend spans it; none: `ingest.stop_after`).
    pub volumes: Option<usize>,
    /// The value shown for a full-scale change (OpenNFT's `MaxFeedbackVal`).
    pub max: f64,
    /// The lowest value shown with `negative` (`MinFeedbackVal`).
    pub min: f64,
    /// Decimals kept (`FeedbackValDec`).
    pub decimals: i32,
    /// Values below 0 are shown (`NegFeedback`), else clipped to 0.
    pub negative: bool,
}

impl Default for FeedbackConfig {
    fn default() -> FeedbackConfig {
        FeedbackConfig {
            recipe: Recipe::None,
            protocol: None,
            regulation: "regulation".into(),
            baseline: None,
            markers: false,
            display: "display".into(),
            rois: Vec::new(),
            combine: CombineRois::Mean,
            weights: Vec::new(),
            motion_regressors: true,
            trend: true,
            task_regressors: true,
            nuisance: None,
            despike: 3.0,
            smooth_s: 2.0,
            normalise: true,
            full_scale: 1.0,
            volumes: None,
            max: 100.0,
            min: -100.0,
            decimals: 0,
            negative: false,
        }
    }
}

impl crate::settings::InputFiles for FeedbackConfig {
    /// The protocol file.
    fn resolve_inputs(&mut self, base: &std::path::Path) {
        self.protocol.iter_mut().for_each(|p| crate::settings::rebase(p, base));
    }
}

impl FeedbackConfig {
    /// Every mistake in the section (the ROIs, their number and the protocol are checked when the
    /// stage is built).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !(self.max.is_finite() && self.max > 0.0 && self.min.is_finite() && self.min < 0.0) {
            errors.push(format!("feedback.max = {}, min = {}: want max > 0 > min", self.max, self.min));
        }
        for (key, v) in
            [("despike", self.despike), ("smooth_s", self.smooth_s), ("full_scale", self.full_scale)]
        {
            if !(v.is_finite() && v >= 0.0) {
                errors.push(format!("feedback.{key} = {v}: want a number ≥ 0 (0: off)"));
            }
        }
        if !(0..=6).contains(&self.decimals) {
            errors.push(format!("feedback.decimals = {}: want 0 to 6", self.decimals));
        }
        if self.combine == CombineRois::Weighted
            && (self.weights.is_empty() || self.weights.iter().any(|w| !w.is_finite()))
        {
            errors.push(
                "feedback.combine = \"weighted\" needs feedback.weights, a finite number per ROI".into(),
            );
        }
        errors
    }
}

/// A volume's feedback, as its recipe made it.
#[derive(Clone, Debug, PartialEq)]
pub struct Feedback {
    /// The value shown (`dispValue`): 0 outside regulation blocks, `None` where it is undefined
    /// (no baseline block before this regulation block yet, or a missing ROI mean).
    pub value: Option<f64>,
    /// Each of the recipe's ROIs' own value, shown alike, by ROI name.
    pub rois: Vec<(String, Option<f64>)>,
}

impl Feedback {
    /// The own value of the ROI `name`, when the recipe uses it.
    pub fn of(&self, name: &str) -> Option<f64> {
        self.rois.iter().find(|(n, _)| n == name).and_then(|(_, v)| *v)
    }
}
