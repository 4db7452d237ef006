//! Alignments as the decode stage applies them: what stands between a trial's betas and the
//! heads. Calibration (`crate::calibrate`) fits them; this folder reads, writes and applies them.

use std::path::Path;

use candle_core::Tensor;

use super::model::Decoder;

pub mod alignment;
pub mod head;

pub use self::alignment::{Alignment, InputNorm};
pub use self::head::AlignmentHead;

/// Why an alignment file cannot be used or applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AlignError {
    /// The file is unusable or belongs to another model.
    #[error("alignment: {0}")]
    File(String),
    /// A tensor operation failed.
    #[error("alignment: {0}")]
    Compute(String),
}

/// Reads a fitted file (`format`, named `what` in errors) and checks that it was fitted for
/// `decoder`: its bytes and its safetensors metadata.
pub(crate) fn read_fitted(
    path: &std::path::Path,
    decoder: &Decoder,
    format: &str,
    what: &str,
) -> Result<(Vec<u8>, std::collections::HashMap<String, String>), AlignError> {
    let err = |m: String| AlignError::File(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(format) {
        return Err(err(format!("not {what} (format {:?})", meta.get("format"))));
    }
    let fingerprint = decoder.fingerprint();
    match meta.get("model") {
        Some(m) if *m == fingerprint => Ok((bytes, meta)),
        Some(m) => Err(err(format!(
            "fitted for model {m}, this model is {fingerprint}; calibrate again with this model"
        ))),
        None => Err(err("no model fingerprint".into())),
    }
}

/// Running per-voxel mean and variance of one run's trials (Welford), for per-run z-scoring.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    run: String,
    count: usize,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

/// Trials a run needs before its own statistics replace the model's.
pub const RUN_ZSCORE_MIN_TRIALS: usize = 3;

impl RunStats {
    /// Adds one trial's betas of `run` (a new run id starts over).
    pub fn push(&mut self, run: &str, betas: &[f32]) {
        if self.run != run || self.mean.len() != betas.len() {
            *self = RunStats {
                run: run.to_string(),
                count: 0,
                mean: vec![0.0; betas.len()],
                m2: vec![0.0; betas.len()],
            };
        }
        self.count += 1;
        let k = self.count as f64;
        for ((m, s), b) in self.mean.iter_mut().zip(&mut self.m2).zip(betas) {
            let x = f64::from(*b);
            let d = x - *m;
            *m += d / k;
            *s += d * (x - *m);
        }
    }

    /// Mean and sample standard deviation per voxel, once enough trials are in.
    pub fn get(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        if self.count < RUN_ZSCORE_MIN_TRIALS {
            return None;
        }
        let k = (self.count - 1) as f64;
        let std = self.m2.iter().map(|s| (s / k).sqrt()).map(|s| if s > 1e-12 { s as f32 } else { 1.0 });
        Some((self.mean.iter().map(|m| *m as f32).collect(), std.collect()))
    }
}

/// What stands between a trial's betas and the heads (and, for a calibrated alignment, what
/// corrects the heads' outputs).
#[derive(Clone, Debug)]
pub enum Adapter {
    /// The model's z-scoring only (zero-shot).
    None,
    /// MIRAGE's zero-shot baseline: z-score with the run's own statistics (all of a batch's
    /// trials offline; the run's trials so far live).
    ZscoreRun,
    /// The model's z-scoring, then a gradient-fitted alignment head.
    Head(AlignmentHead),
    /// A calibrated alignment (the closed-form fit).
    Calibrated(alignment::Alignment),
}

impl Adapter {
    /// Reads `none`, `zscore-run` or the path of an alignment file fitted for `decoder` (a
    /// calibrated alignment or a gradient-fitted head, told apart by its format).
    pub fn parse(spec: &str, decoder: &Decoder) -> Result<Adapter, AlignError> {
        match spec {
            "none" => Ok(Adapter::None),
            "zscore-run" => Ok(Adapter::ZscoreRun),
            path => {
                let path = Path::new(path);
                let bytes =
                    std::fs::read(path).map_err(|e| AlignError::File(format!("{}: {e}", path.display())))?;
                let format = safetensors::SafeTensors::read_metadata(&bytes)
                    .ok()
                    .and_then(|(_, m)| m.metadata().as_ref().and_then(|m| m.get("format").cloned()));
                match format.as_deref() {
                    Some(alignment::FORMAT) => {
                        Ok(Adapter::Calibrated(alignment::Alignment::load(path, decoder)?))
                    }
                    _ => Ok(Adapter::Head(AlignmentHead::load(path, decoder)?)),
                }
            }
        }
    }

    /// Short name for messages: `none`, `zscore-run` or `head` (a fitted alignment of either
    /// kind).
    pub fn name(&self) -> &'static str {
        match self {
            Adapter::None => "none",
            Adapter::ZscoreRun => "zscore-run",
            Adapter::Head(_) | Adapter::Calibrated(_) => "head",
        }
    }

    /// Writes a fitted alignment to `path` (nothing to write for `none` and `zscore-run`).
    pub fn save(&self, path: &Path, decoder: &Decoder) -> Result<(), AlignError> {
        match self {
            Adapter::Head(h) => h.save(path),
            Adapter::Calibrated(a) => a.save(path, decoder),
            Adapter::None | Adapter::ZscoreRun => Err(AlignError::File(format!(
                "{}: {} is not a fitted alignment",
                path.display(),
                self.name()
            ))),
        }
    }

    /// Whether it normalises with the run's own statistics.
    pub fn uses_run_stats(&self) -> bool {
        match self {
            Adapter::ZscoreRun => true,
            Adapter::Calibrated(a) => a.input.uses_run(),
            Adapter::None | Adapter::Head(_) => false,
        }
    }

    /// Per head of the model: the output correction of a calibrated alignment (empty: none).
    pub fn adjusts(&self) -> &[Option<crate::decode::model::HeadAdjust>] {
        match self {
            Adapter::Calibrated(a) => &a.adjusts,
            _ => &[],
        }
    }

    /// Normalised, aligned inputs for the heads from betas `xs` `(batch, n)`. `run_stats`
    /// (mean, std) are the run's statistics; without them per-run z-scoring uses the batch's
    /// own (or the model's, for a single trial) and a calibrated alignment its calibration
    /// run's.
    pub fn normalise(
        &self,
        decoder: &Decoder,
        xs: &Tensor,
        run_stats: Option<(&[f32], &[f32])>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Adapter::None => decoder.normalise(xs),
            Adapter::Head(h) => h.forward(&decoder.normalise(xs)?),
            Adapter::Calibrated(a) => a.normalise(decoder, xs, run_stats),
            Adapter::ZscoreRun => match run_stats {
                Some((m, s)) => {
                    let dev = xs.device();
                    let m = Tensor::from_slice(m, m.len(), dev)?;
                    let s = Tensor::from_slice(s, s.len(), dev)?;
                    xs.broadcast_sub(&m)?.broadcast_div(&s)
                }
                None if xs.dim(0)? >= RUN_ZSCORE_MIN_TRIALS => {
                    let mean = xs.mean_keepdim(0)?;
                    let c = xs.broadcast_sub(&mean)?;
                    let var = (c.sqr()?.sum_keepdim(0)? / (xs.dim(0)? - 1) as f64)?;
                    let std = var.sqrt()?.maximum(1e-6)?;
                    c.broadcast_div(&std)
                }
                None => decoder.normalise(xs),
            },
        }
    }
}
