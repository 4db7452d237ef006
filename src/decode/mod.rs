//! The decode stage: each trial's betas through the MIRAGE heads, fusion and gallery
//! retrieval.
//!
//! In: [`crate::glm::TrialBetas`] (betas over the GLM mask). Out: [`Decoded`] — every head's
//! output, MIRAGE's conditioning mix, the top gallery matches and the pixel head's picture.
//! Shapes: betas `(1, n_voxels)` → head `h` `(1, prod(shape_h))`. Budget: `latency_budget_ms`
//! per trial (checked by the runner, which owns the clock).

pub mod gallery;
pub mod image;
pub mod metrics;
pub mod model;
pub mod synthetic;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::gallery::{Gallery, Match};
use self::model::Decoder;
use crate::calibrate::head::{Adapter, RunStats};
use crate::glm::TrialBetas;

/// Why decoding failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The model folder is missing, malformed or inconsistent.
    #[error("decode: model: {0}")]
    Model(String),
    /// The gallery folder is unusable.
    #[error("decode: gallery: {0}")]
    Gallery(String),
    /// The betas do not fit the model.
    #[error("decode: {0}")]
    Input(String),
    /// The device could not be used.
    #[error("decode: device: {0}")]
    Device(String),
    /// A tensor operation failed.
    #[error("decode: {0}")]
    Compute(String),
    /// Training failed.
    #[error("train: {0}")]
    Train(String),
}

impl DecodeError {
    /// Counter name of this kind of error.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Model(_) => "decode_model",
            DecodeError::Gallery(_) => "decode_gallery",
            DecodeError::Input(_) => "decode_input",
            DecodeError::Device(_) => "decode_device",
            DecodeError::Compute(_) => "decode_compute",
            DecodeError::Train(_) => "train",
        }
    }
}

/// `[decode]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// A model folder (`None`: no decoding; trials pass on).
    pub model: Option<PathBuf>,
    /// A gallery folder for retrieval.
    pub gallery: Option<PathBuf>,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Decode time (ms) above which a result is flagged and counted.
    pub latency_budget_ms: f64,
    /// Gallery matches published.
    pub top_k: usize,
    /// Also decode the end-of-run estimates of trials (they are flagged `at_run_end`).
    pub decode_run_end: bool,
    /// Between z-scoring and the heads: `none`, `zscore-run` (MIRAGE's per-run z-scoring) or
    /// the path of a fitted alignment head.
    pub alignment: String,
    /// `decode`, or `calibrate`: collect the protocol's trials, fit the alignment head, then
    /// decode with it.
    pub mode: Mode,
    /// CPU threads a decode may use (0: every core). One leaves the other cores to the volume
    /// path: a decode is bound by memory bandwidth, so more threads barely speed it up.
    pub threads: usize,
    /// Precision the heads' weight matrices are kept in: `f32`, or `bf16` (half the bytes a
    /// decode reads; outputs differ from float32 by about 1 %).
    pub weight_dtype: WeightDtype,
}

/// Precision of the heads' weight matrices in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// float32, as stored in the model.
    #[default]
    F32,
    /// bfloat16 (products accumulate in float32).
    Bf16,
}

impl WeightDtype {
    /// Reads `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<WeightDtype, DecodeError> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            _ => Err(DecodeError::Model(format!("weight dtype {s:?}: use f32 or bf16"))),
        }
    }

    /// candle's dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// What the decode stage does with trials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decode every trial.
    #[default]
    Decode,
    /// Decode every trial, and fit the alignment head once the calibration trials are in.
    Calibrate,
}

impl Default for DecodeConfig {
    fn default() -> DecodeConfig {
        DecodeConfig {
            model: None,
            gallery: None,
            device: "auto".into(),
            latency_budget_ms: 50.0,
            top_k: 5,
            decode_run_end: true,
            alignment: "none".into(),
            mode: Mode::Decode,
            threads: 1,
            weight_dtype: WeightDtype::F32,
        }
    }
}

impl DecodeConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        // "sim": the simulator's own model and gallery, made at start (`commands::sim_model`).
        let sim = |p: &Path| p == Path::new("sim");
        if let Some(m) = self.model.as_deref().filter(|m| !sim(m)) {
            if !m.join(model::CONFIG_FILE).exists() {
                e.push(format!("decode.model: {} has no {}", m.display(), model::CONFIG_FILE));
            }
        }
        if let Some(g) = self.gallery.as_deref().filter(|g| !sim(g)) {
            if !g.join("gallery.json").exists() {
                e.push(format!("decode.gallery: {} has no gallery.json", g.display()));
            }
        }
        if !matches!(self.alignment.as_str(), "none" | "zscore-run") && !Path::new(&self.alignment).exists() {
            e.push(format!(
                "decode.alignment {:?}: use none, zscore-run or the path of an alignment head",
                self.alignment
            ));
        }
        if !(self.latency_budget_ms.is_finite() && self.latency_budget_ms > 0.0) {
            e.push("decode.latency_budget_ms must be positive".into());
        }
        if !matches!(self.device.as_str(), "auto" | "cpu") && !self.device.starts_with("cuda:") {
            e.push(format!("decode.device {:?}: use auto, cpu or cuda:N", self.device));
        }
        e
    }
}

/// One decoded trial.
#[derive(Clone, Debug)]
pub struct Decoded {
    /// The trial it came from (without its betas).
    pub trial: TrialBetas,
    /// Each head's renormalised output: name, shape, values.
    pub heads: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// MIRAGE's conditioning mix `(c_img, c_txt)`, when the model names both heads.
    pub fused: Option<(Vec<f32>, Vec<f32>)>,
    /// Best gallery matches.
    pub top: Vec<Match>,
    /// The pixel head's picture as PNG bytes.
    pub png: Option<Vec<u8>>,
    /// Where it ran.
    pub device: String,
    /// What aligned the betas to the model (`none`, `zscore-run` or `head`).
    pub alignment: &'static str,
    /// Decode time in ms (set by the runner).
    pub latency_ms: f64,
    /// When the GLM closed the trial, on the monotonic clock (set by the runner).
    pub closed_time: Option<f64>,
    /// Whether the decode took longer than the budget (set by the runner).
    pub over_budget: bool,
}

/// MIRAGE's conditioning mix: `c_img = img·(1−t) + u_img·t⁵`, `c_txt = txt·t + u_txt·(1−t)⁵`.
pub fn mix(
    img: &[f32],
    txt: &[f32],
    u_img: Option<&[f32]>,
    u_txt: Option<&[f32]>,
    t: f64,
) -> (Vec<f32>, Vec<f32>) {
    let (a, b) = ((1.0 - t) as f32, t.powi(5) as f32);
    let (c, d) = (t as f32, (1.0 - t).powi(5) as f32);
    let c_img = img.iter().enumerate().map(|(i, x)| x * a + u_img.map_or(0.0, |u| u[i]) * b).collect();
    let c_txt = txt.iter().enumerate().map(|(i, x)| x * c + u_txt.map_or(0.0, |u| u[i]) * d).collect();
    (c_img, c_txt)
}

/// The decode stage: a loaded model and gallery, and what aligns trials to the model.
pub struct DecodeStage {
    decoder: std::sync::Arc<Decoder>,
    adapter: Adapter,
    run_stats: RunStats,
    gallery: Option<Gallery>,
    top_k: usize,
    unconditional: (Option<Vec<f32>>, Option<Vec<f32>>),
    device: String,
}

impl DecodeStage {
    /// Loads the model (and gallery) the configuration names.
    pub fn new(cfg: &DecodeConfig) -> Result<DecodeStage, DecodeError> {
        let path = cfg.model.as_ref().ok_or_else(|| DecodeError::Model("no model configured".into()))?;
        let device = model::device(&cfg.device)?;
        let mut decoder = Decoder::load(path, &device)?;
        if cfg.weight_dtype != WeightDtype::F32 {
            decoder.set_weight_dtype(cfg.weight_dtype.dtype())?;
        }
        let gallery = cfg.gallery.as_ref().map(|g| Gallery::load(g)).transpose()?;
        let to_vec = |t: &Option<candle_core::Tensor>| -> Result<Option<Vec<f32>>, DecodeError> {
            t.as_ref()
                .map(|t| t.to_vec1::<f32>().map_err(|e| DecodeError::Compute(e.to_string())))
                .transpose()
        };
        let unconditional = (to_vec(&decoder.unconditional.0)?, to_vec(&decoder.unconditional.1)?);
        let device = if device.is_cuda() { cfg.device.clone() } else { "cpu".into() };
        // One decode at load time pages the weights in and warms the kernels, so the first
        // live trial is not the slow one.
        decoder.predict(&vec![0.0; decoder.cfg.n_voxels], 1)?;
        let adapter =
            Adapter::parse(&cfg.alignment, &decoder).map_err(|e| DecodeError::Model(e.to_string()))?;
        Ok(DecodeStage {
            decoder: std::sync::Arc::new(decoder),
            adapter,
            run_stats: RunStats::default(),
            gallery,
            top_k: cfg.top_k,
            unconditional,
            device,
        })
    }

    /// The model (shared, so that a calibration fit can run beside live decoding).
    pub fn decoder(&self) -> &std::sync::Arc<Decoder> {
        &self.decoder
    }

    /// The gallery, when one is loaded.
    pub fn gallery(&self) -> Option<&Gallery> {
        self.gallery.as_ref()
    }

    /// What stands between z-scoring and the heads now.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// Replaces the adapter (calibration mode switches to its fitted head this way).
    pub fn set_adapter(&mut self, adapter: Adapter) {
        self.adapter = adapter;
    }

    /// Decodes one trial's betas (with per-run z-scoring, the trial joins its run's
    /// statistics first).
    pub fn decode(&mut self, t: &TrialBetas) -> Result<Decoded, DecodeError> {
        let n = self.decoder.cfg.n_voxels;
        if t.betas.len() != n {
            return Err(DecodeError::Input(format!(
                "trial {}: {} betas, the model takes {n} voxels (is the GLM mask the model's?)",
                t.trial,
                t.betas.len()
            )));
        }
        if let Some(v) = &self.decoder.voxels {
            if *v != t.voxels {
                return Err(DecodeError::Input(format!(
                    "trial {}: the GLM mask's voxels are not the model's",
                    t.trial
                )));
            }
        }
        if !t.estimable {
            return Err(DecodeError::Input(format!("trial {}: betas not estimable yet", t.trial)));
        }
        let xs = self.decoder.input(&t.betas, 1)?;
        let stats = match self.adapter {
            Adapter::ZscoreRun => {
                if !t.at_run_end {
                    self.run_stats.push(&t.run, &t.betas);
                }
                self.run_stats.get()
            }
            _ => None,
        };
        let z = self
            .adapter
            .normalise(&self.decoder, &xs, stats.as_ref().map(|(m, s)| (m.as_slice(), s.as_slice())))
            .map_err(|e| DecodeError::Compute(e.to_string()))?;
        let outputs = self.decoder.predict_normalised(&z)?;
        let heads: Vec<(String, Vec<usize>, Vec<f32>)> = self
            .decoder
            .cfg
            .heads
            .iter()
            .zip(outputs)
            .map(|(h, o)| (h.name.clone(), h.shape.clone(), o))
            .collect();
        let by_name: BTreeMap<String, Vec<f32>> =
            heads.iter().map(|(n, _, v)| (n.clone(), v.clone())).collect();
        let fusion = &self.decoder.cfg.fusion;
        let fused = match (
            fusion.image_head.as_ref().and_then(|h| by_name.get(h)),
            fusion.text_head.as_ref().and_then(|h| by_name.get(h)),
        ) {
            (Some(img), Some(txt)) => Some(mix(
                img,
                txt,
                self.unconditional.0.as_deref(),
                self.unconditional.1.as_deref(),
                fusion.t,
            )),
            _ => None,
        };
        let top = self
            .gallery
            .as_ref()
            .map(|g| g.rank(&by_name, &fusion.retrieval_weights, self.top_k))
            .unwrap_or_default();
        let png = match fusion.pixel_head.as_ref().and_then(|p| heads.iter().find(|(n, _, _)| n == p)) {
            Some((_, shape, values)) => Some(image::png(values, shape)?),
            None => None,
        };
        let mut trial = t.clone();
        trial.betas = Vec::new();
        trial.voxels = Vec::new();
        Ok(Decoded {
            trial,
            heads,
            fused,
            top,
            png,
            device: self.device.clone(),
            alignment: self.adapter.name(),
            latency_ms: 0.0,
            closed_time: None,
            over_budget: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_follows_mirage() {
        let (ci, ct) = mix(&[1.0, 2.0], &[4.0], Some(&[10.0, 10.0]), Some(&[2.0]), 0.5);
        assert!((ci[0] - (0.5 + 10.0 * 0.03125)).abs() < 1e-6 && (ci[1] - (1.0 + 0.3125)).abs() < 1e-6);
        assert!((ct[0] - (2.0 + 2.0 * 0.03125)).abs() < 1e-6);
        assert_eq!(mix(&[1.0], &[1.0], None, None, 0.0), (vec![1.0], vec![0.0]));
    }
}
