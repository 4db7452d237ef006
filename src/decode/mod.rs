//! The decode stage: each trial's betas through the MIRAGE heads, fusion and gallery
//! retrieval, or through a MindEye2 network.
//!
//! In: [`crate::glm::TrialBetas`] (betas over the GLM mask). Out: [`Decoded`] — every head's
//! output (or, for `latent_heads`, its rank-r latent), MIRAGE's conditioning mix, the top
//! gallery matches (ranked from the latents of low-rank heads) and the pixel head's picture;
//! for MindEye2, its `backbone`, `clip_voxels` and `blurry_latent` as heads, the gallery ranked
//! by `clip_voxels`, and the latent's [`Picture`] made afterwards by [`mindeye2::MindEye2::picture_png`].
//! Shapes: betas `(1, n_voxels)` → head `h` `(1, prod(shape_h))`. Budget: `latency_budget_ms`
//! per trial (checked by the runner, which owns the clock).

pub mod align;
pub mod diffusers;
pub mod gallery;
pub mod image;
pub mod metrics;
pub mod mindeye2;
pub mod model;
pub mod stage;
pub mod synthetic;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::gallery::{Gallery, LatentIndex, Match};
use self::mindeye2::MindEye2;
use self::model::Decoder;
use crate::decode::align::{Adapter, RunStats};
use crate::glm::TrialBetas;
use crate::reason::Reason;

/// Counted when: a model that could not be used.
pub const DECODE_MODEL: Reason = Reason::new("decode_model", "a model that could not be used");
/// Counted when: a gallery that could not be used.
pub const DECODE_GALLERY: Reason = Reason::new("decode_gallery", "a gallery that could not be used");
/// Counted when: trial betas the model cannot take.
pub const DECODE_INPUT: Reason = Reason::new("decode_input", "trial betas the model cannot take");
/// Counted when: a device that could not be used.
pub const DECODE_DEVICE: Reason = Reason::new("decode_device", "a device that could not be used");
/// Counted when: a decode that failed.
pub const DECODE_COMPUTE: Reason = Reason::new("decode_compute", "a decode that failed");
/// Counted when: a training that failed.
pub const TRAIN: Reason = Reason::new("train", "a training that failed");
/// What decoding counts.
pub const REASONS: &[Reason] = &[
    DECODE_MODEL,
    DECODE_GALLERY,
    DECODE_INPUT,
    DECODE_DEVICE,
    DECODE_COMPUTE,
    TRAIN,
    stage::DECODE_DROPPED,
    stage::DECODE_OVER_BUDGET,
    stage::PICTURE_OVER_BUDGET,
    stage::PICTURE_DROPPED,
];

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
    pub fn reason(&self) -> Reason {
        match self {
            DecodeError::Model(_) => DECODE_MODEL,
            DecodeError::Gallery(_) => DECODE_GALLERY,
            DecodeError::Input(_) => DECODE_INPUT,
            DecodeError::Device(_) => DECODE_DEVICE,
            DecodeError::Compute(_) => DECODE_COMPUTE,
            DecodeError::Train(_) => TRAIN,
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
    /// Precision the heads' weight matrices are kept in: `f32`; `bf16` (half the bytes a
    /// decode reads; outputs differ from float32 by about 1 %); or `q8_0` (CPU: 8-bit copies
    /// of the matrices that read the betas for live trials, a quarter of those bytes).
    pub weight_dtype: WeightDtype,
    /// Low-rank heads decoded live only to their rank-r latent (published as `NAME.latent`),
    /// which skips reading their up-projection; they still rank gallery items, exactly.
    pub latent_heads: Vec<String>,
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
    /// float32, plus 8-bit (Q8_0) copies of the input-side matrices for live CPU decodes.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl WeightDtype {
    /// Reads `f32`, `bf16` or `q8_0`.
    pub fn parse(s: &str) -> Result<WeightDtype, DecodeError> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            "q8_0" => Ok(WeightDtype::Q8_0),
            _ => Err(DecodeError::Model(format!("weight dtype {s:?}: use f32, bf16 or q8_0"))),
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

impl crate::settings::InputFiles for DecodeConfig {
    /// The model and gallery folders and a fitted alignment's file.
    fn resolve_inputs(&mut self, base: &Path) {
        for p in [&mut self.model, &mut self.gallery].into_iter().flatten() {
            crate::settings::rebase(p, base);
        }
        crate::settings::rebase_text(&mut self.alignment, base);
    }
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
            latent_heads: Vec::new(),
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
    /// The rank-r latents of the heads decoded only that far (`decode.latent_heads`): name,
    /// values. The head's output is `up · latent + bias`, renormalised, with the model's tensors.
    pub latents: Vec<(String, Vec<f32>)>,
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
    /// Whether a live decode took longer than the budget (set by the runner; end-of-run
    /// estimates never are).
    pub over_budget: bool,
}

/// A MindEye2 trial's picture, made after its decode (the SD VAE takes seconds on a CPU): it
/// follows on the `picture` topic.
#[derive(Clone, Debug)]
pub struct Picture {
    /// The trial it came from (without its betas).
    pub trial: TrialBetas,
    /// The picture as PNG bytes.
    pub png: Vec<u8>,
    /// Where it ran.
    pub device: String,
    /// Time to make it, ms.
    pub latency_ms: f64,
    /// When the GLM closed the trial, on the monotonic clock.
    pub closed_time: Option<f64>,
    /// Whether trial close → picture took longer than the decode budget.
    pub over_budget: bool,
}

/// What decodes trials.
#[derive(Clone)]
pub enum Network {
    /// MIRAGE's heads (alignment, calibration, latent heads).
    Heads(std::sync::Arc<Decoder>),
    /// A MindEye2 network.
    MindEye2(std::sync::Arc<MindEye2>),
}

/// The trial without its betas and voxels (what a result carries).
fn bare(t: &TrialBetas) -> TrialBetas {
    let mut trial = t.clone();
    trial.betas = Vec::new();
    trial.voxels = Vec::new();
    trial
}

/// Why a trial cannot be decoded by a model of `n_voxels` (`None`: it can).
fn refuse(t: &TrialBetas, n_voxels: usize) -> Option<DecodeError> {
    if t.betas.len() != n_voxels {
        return Some(DecodeError::Input(format!(
            "trial {}: {} betas, the model takes {n_voxels} voxels (is the GLM mask the model's?)",
            t.trial,
            t.betas.len()
        )));
    }
    (!t.estimable).then(|| DecodeError::Input(format!("trial {}: betas not estimable yet", t.trial)))
}

/// Sizes candle's CPU pool for 8-bit products to `threads` (0: every core) through
/// `CANDLE_NUM_THREADS`, unless the environment sets it: candle reads it once, at first use.
/// Call before other threads start.
pub fn limit_candle_threads(threads: usize) {
    if threads > 0 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
}

/// The latent indices of every gallery head that a low-rank head of the decoder (of a rank
/// below its output size) predicts.
fn latent_indices(
    decoder: &Decoder,
    gallery: &Gallery,
) -> Result<BTreeMap<String, LatentIndex>, DecodeError> {
    let mut out = BTreeMap::new();
    for h in &decoder.heads {
        let (Some(r), Some((d, emb))) = (h.rank(), gallery.embeddings.get(&h.cfg.name)) else { continue };
        if *d != h.cfg.n_outputs() || r >= *d {
            continue;
        }
        let err = |e: candle_core::Error| DecodeError::Compute(format!("gallery head {}: {e}", h.cfg.name));
        if let (Some((a, c)), Some(gram)) = (h.output_map().map_err(err)?, h.output_gram().map_err(err)?) {
            out.insert(h.cfg.name.clone(), LatentIndex::new(emb, &a, &c, &gram).map_err(err)?);
        }
    }
    Ok(out)
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
    network: Network,
    adapter: Adapter,
    /// The run's statistics per trial condition (imagery trials are normalised with imagery
    /// trials' statistics).
    run_stats: BTreeMap<String, RunStats>,
    gallery: Option<std::sync::Arc<Gallery>>,
    /// Per gallery head ranked from a low-rank head's latent.
    latent_index: BTreeMap<String, LatentIndex>,
    /// Per head: decoded live only to its latent.
    latent_only: Vec<bool>,
    top_k: usize,
    unconditional: (Option<Vec<f32>>, Option<Vec<f32>>),
    device: String,
}

impl DecodeStage {
    /// Loads the model the configuration names, to rank against `gallery` (the one
    /// `decode.gallery` names, loaded by the caller, which may share it).
    pub fn new(
        cfg: &DecodeConfig,
        gallery: Option<std::sync::Arc<Gallery>>,
    ) -> Result<DecodeStage, DecodeError> {
        let path = cfg.model.as_ref().ok_or_else(|| DecodeError::Model("no model configured".into()))?;
        let device = model::device(&cfg.device)?;
        if let Some(net_cfg) = mindeye2::Config::load_if_mindeye2(path)? {
            let dtype = match cfg.weight_dtype {
                WeightDtype::F32 => candle_core::DType::F32,
                WeightDtype::Bf16 => candle_core::DType::BF16,
                WeightDtype::Q8_0 => {
                    return Err(DecodeError::Model(
                        "decode.weight_dtype q8_0: a mindeye2 model runs in f32 or bf16".into(),
                    ))
                }
            };
            let net = MindEye2::load_dir(path, net_cfg, &device, dtype)?;
            return DecodeStage::with_mindeye2(net, gallery, cfg);
        }
        let decoder = Decoder::load(path, &device)?;
        DecodeStage::with_model(decoder, gallery, cfg)
    }

    /// The stage for a decoder and gallery already loaded (`cfg` gives the rest).
    pub fn with_model(
        mut decoder: Decoder,
        gallery: Option<std::sync::Arc<Gallery>>,
        cfg: &DecodeConfig,
    ) -> Result<DecodeStage, DecodeError> {
        let latent_only =
            decoder.heads.iter().map(|h| cfg.latent_heads.contains(&h.cfg.name)).collect::<Vec<bool>>();
        for name in &cfg.latent_heads {
            let Some(h) = decoder.heads.iter().find(|h| &h.cfg.name == name) else {
                return Err(DecodeError::Model(format!(
                    "decode.latent_heads: the model has no head {name:?}"
                )));
            };
            if h.rank().is_none() {
                return Err(DecodeError::Model(format!(
                    "decode.latent_heads: head {name:?} is not low-rank"
                )));
            }
            if decoder.cfg.fusion.pixel_head.as_ref() == Some(name) {
                return Err(DecodeError::Model(format!(
                    "decode.latent_heads: {name:?} is the pixel head, whose picture is published"
                )));
            }
        }
        decoder.set_weight_dtype(cfg.weight_dtype)?;
        let latent_index = match &gallery {
            Some(g) => latent_indices(&decoder, g)?,
            None => BTreeMap::new(),
        };
        let to_vec = |t: &Option<candle_core::Tensor>| -> Result<Option<Vec<f32>>, DecodeError> {
            t.as_ref()
                .map(|t| t.to_vec1::<f32>().map_err(|e| DecodeError::Compute(e.to_string())))
                .transpose()
        };
        let unconditional = (to_vec(&decoder.unconditional.0)?, to_vec(&decoder.unconditional.1)?);
        let device = if decoder.device.is_cuda() { cfg.device.clone() } else { "cpu".into() };
        let adapter =
            Adapter::parse(&cfg.alignment, &decoder).map_err(|e| DecodeError::Model(e.to_string()))?;
        Ok(DecodeStage {
            network: Network::Heads(std::sync::Arc::new(decoder)),
            adapter,
            run_stats: BTreeMap::new(),
            gallery,
            latent_index,
            latent_only,
            top_k: cfg.top_k,
            unconditional,
            device,
        })
    }

    /// The stage for a MindEye2 network: betas as given (`decode.alignment` `none`) or z-scored
    /// with the run's statistics (`zscore-run`); the gallery, when given, must hold
    /// `clip_voxels` embeddings (`[N, T·D]`).
    pub fn with_mindeye2(
        net: MindEye2,
        gallery: Option<std::sync::Arc<Gallery>>,
        cfg: &DecodeConfig,
    ) -> Result<DecodeStage, DecodeError> {
        let adapter = match cfg.alignment.as_str() {
            "none" => Adapter::None,
            "zscore-run" => Adapter::ZscoreRun,
            other => {
                return Err(DecodeError::Model(format!(
                    "decode.alignment {other:?}: a mindeye2 model takes none or zscore-run"
                )))
            }
        };
        if cfg.mode != Mode::Decode {
            return Err(DecodeError::Model(
                "calibration mode fits MIRAGE heads' alignment, not mindeye2's".into(),
            ));
        }
        if !cfg.latent_heads.is_empty() {
            return Err(DecodeError::Model(
                "decode.latent_heads: a mindeye2 model has no low-rank heads".into(),
            ));
        }
        let tokens = net.cfg.clip_tokens * net.cfg.clip_dim;
        if let Some(g) = &gallery {
            match g.embeddings.get("clip_voxels") {
                Some((d, _)) if *d == tokens => {}
                Some((d, _)) => {
                    return Err(DecodeError::Gallery(format!(
                        "clip_voxels embeddings of {d} values, the model gives {tokens} (T x D)"
                    )))
                }
                None => {
                    return Err(DecodeError::Gallery(
                        "no clip_voxels embeddings ([N, T x D] CLIP image tokens) to rank a mindeye2 decode against"
                            .into(),
                    ))
                }
            }
        }
        let device = if net.is_cuda() { cfg.device.clone() } else { "cpu".into() };
        Ok(DecodeStage {
            network: Network::MindEye2(std::sync::Arc::new(net)),
            adapter,
            run_stats: BTreeMap::new(),
            gallery,
            latent_index: BTreeMap::new(),
            latent_only: Vec::new(),
            top_k: cfg.top_k,
            unconditional: (None, None),
            device,
        })
    }

    /// One decode of zero betas: pages the weights in and warms the kernels (and makes candle's
    /// thread pool, which takes the calling thread's priority), so that the first live trial is
    /// not the slow one.
    pub fn warm_up(&self) -> Result<(), DecodeError> {
        match &self.network {
            Network::Heads(decoder) => {
                let z = decoder.input(&vec![0.0; decoder.cfg.n_voxels], 1)?;
                decoder.live(&z, &self.latent_only, self.adapter.adjusts()).map(|_| ())
            }
            Network::MindEye2(net) => {
                let x = net.input(&vec![0.0; net.cfg.n_voxels], 1)?;
                net.forward(&x).map(|_| ()).map_err(|e| DecodeError::Compute(e.to_string()))
            }
        }
    }

    /// MIRAGE's heads (shared, so that a calibration fit can run beside live decoding);
    /// `None` for a MindEye2 network.
    pub fn decoder(&self) -> Option<&std::sync::Arc<Decoder>> {
        match &self.network {
            Network::Heads(d) => Some(d),
            Network::MindEye2(_) => None,
        }
    }

    /// The network that makes [`Picture`]s of decoded trials' `blurry_latent`, when there is one.
    pub fn picture_network(&self) -> Option<std::sync::Arc<MindEye2>> {
        match &self.network {
            Network::MindEye2(net) if net.has_picture() => Some(net.clone()),
            _ => None,
        }
    }

    /// Where decodes run (`cpu`, `cuda:0`).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The gallery, when one is loaded.
    pub fn gallery(&self) -> Option<&Gallery> {
        self.gallery.as_deref()
    }

    /// What stands between z-scoring and the heads now.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// Replaces the adapter (calibration mode switches to its fitted head this way).
    pub fn set_adapter(&mut self, adapter: Adapter) {
        self.adapter = adapter;
    }

    /// Decodes one trial's betas. Every live trial joins its run's statistics for its
    /// condition first (an adapter that normalises with them may be switched to mid-run).
    pub fn decode(&mut self, t: &TrialBetas) -> Result<Decoded, DecodeError> {
        let decoder = match &self.network {
            Network::Heads(d) => d.clone(),
            Network::MindEye2(net) => return self.decode_mindeye2(&net.clone(), t),
        };
        if let Some(e) = refuse(t, decoder.cfg.n_voxels) {
            return Err(e);
        }
        if let Some(v) = &decoder.voxels {
            if *v != t.voxels {
                return Err(DecodeError::Input(format!(
                    "trial {}: the GLM mask's voxels are not the model's",
                    t.trial
                )));
            }
        }
        let xs = decoder.input(&t.betas, 1)?;
        let run_stats = self.run_stats.entry(t.condition.clone()).or_default();
        if !t.at_run_end {
            run_stats.push(&t.run, &t.betas);
        }
        // A calibrated alignment decodes the trials of its own condition (or of none named).
        let adapter = match &self.adapter {
            Adapter::Calibrated(a) if !a.applies_to(&t.condition) => &Adapter::None,
            a => a,
        };
        let stats = if adapter.uses_run_stats() { run_stats.get() } else { None };
        let z = adapter
            .normalise(&decoder, &xs, stats.as_ref().map(|(m, s)| (m.as_slice(), s.as_slice())))
            .map_err(|e| DecodeError::Compute(e.to_string()))?;
        let live = decoder.live(&z, &self.latent_only, adapter.adjusts())?;
        let by_name: BTreeMap<&str, &crate::decode::model::HeadOutput> =
            decoder.cfg.heads.iter().map(|h| h.name.as_str()).zip(&live).collect();
        let fusion = &decoder.cfg.fusion;
        let output = |name: &Option<String>| {
            name.as_deref().and_then(|n| by_name.get(n)).and_then(|o| o.output.as_deref())
        };
        let fused = match (output(&fusion.image_head), output(&fusion.text_head)) {
            (Some(img), Some(txt)) => Some(mix(
                img,
                txt,
                self.unconditional.0.as_deref(),
                self.unconditional.1.as_deref(),
                fusion.t,
            )),
            _ => None,
        };
        let top = match &self.gallery {
            Some(g) => {
                let per_head: Vec<(f64, Vec<f64>)> = g
                    .head_weights(&fusion.retrieval_weights, |h| by_name.contains_key(h))
                    .into_iter()
                    .filter_map(|(h, w)| {
                        let out = by_name[h.as_str()];
                        let via_latent = self.latent_index.get(&h).zip(out.latent.as_deref());
                        let cos = match via_latent {
                            Some((index, l)) => index.cosines(l),
                            None => out.output.as_deref().and_then(|o| g.cosines(&h, o)),
                        };
                        cos.map(|c| (w, c))
                    })
                    .collect();
                g.rank_by(&per_head, self.top_k)
            }
            None => Vec::new(),
        };
        let pixel_cfg =
            fusion.pixel_head.as_ref().and_then(|p| decoder.cfg.heads.iter().find(|h| &h.name == p));
        let png = match (pixel_cfg, output(&fusion.pixel_head)) {
            (Some(h), Some(values)) => Some(image::png(values, &h.shape)?),
            _ => None,
        };
        let (mut heads, mut latents) = (Vec::new(), Vec::new());
        for (h, out) in decoder.cfg.heads.iter().zip(live) {
            match (out.output, out.latent) {
                (Some(o), _) => heads.push((h.name.clone(), h.shape.clone(), o)),
                (None, Some(l)) => latents.push((h.name.clone(), l)),
                (None, None) => {}
            }
        }
        Ok(Decoded {
            trial: bare(t),
            heads,
            latents,
            fused,
            top,
            png,
            device: self.device.clone(),
            alignment: adapter.name(),
            latency_ms: 0.0,
            closed_time: None,
            over_budget: false,
        })
    }

    /// One trial through a MindEye2 network: `backbone`, `clip_voxels` (`[T, D]`) and
    /// `blurry_latent` as heads, the gallery ranked by cosine over the flattened `clip_voxels`.
    fn decode_mindeye2(&mut self, net: &MindEye2, t: &TrialBetas) -> Result<Decoded, DecodeError> {
        if let Some(e) = refuse(t, net.cfg.n_voxels) {
            return Err(e);
        }
        let run_stats = self.run_stats.entry(t.condition.clone()).or_default();
        if !t.at_run_end {
            run_stats.push(&t.run, &t.betas);
        }
        let stats = if self.adapter.uses_run_stats() { run_stats.get() } else { None };
        let betas: Vec<f32> = match stats {
            Some((m, s)) => t.betas.iter().zip(m.iter().zip(&s)).map(|(b, (m, s))| (b - m) / s).collect(),
            None => t.betas.clone(),
        };
        let compute = |e: candle_core::Error| DecodeError::Compute(e.to_string());
        let out = net.forward(&net.input(&betas, 1)?).map_err(compute)?;
        let host = |x: &candle_core::Tensor| -> Result<(Vec<usize>, Vec<f32>), DecodeError> {
            let values = x
                .to_dtype(candle_core::DType::F32)
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1::<f32>())
                .map_err(compute)?;
            Ok((x.dims()[1..].to_vec(), values))
        };
        let (clip_shape, clip_voxels) = host(&out.clip_voxels)?;
        let top = match &self.gallery {
            Some(g) => g
                .cosines("clip_voxels", &clip_voxels)
                .map(|c| g.rank_by(&[(1.0, c)], self.top_k))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let (backbone_shape, backbone) = host(&out.backbone)?;
        let mut heads = vec![
            ("backbone".to_string(), backbone_shape, backbone),
            ("clip_voxels".to_string(), clip_shape, clip_voxels),
        ];
        if let Some(latent) = &out.blurry_latent {
            let (shape, values) = host(latent)?;
            heads.push(("blurry_latent".to_string(), shape, values));
        }
        Ok(Decoded {
            trial: bare(t),
            heads,
            latents: Vec::new(),
            fused: None,
            top,
            png: None,
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

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use crate::decode::model::{FusionConfig, HeadConfig, ModelConfig, FORMAT};
    use crate::rng::Rng;

    const VOXELS: usize = 300;

    /// A model with random weights and renormalisation statistics: low-rank `image` (rank 6
    /// of 40) and `text` (rank 5 of 3 × 10), full `pixels` (1 × 4 × 4).
    fn model(rng: &mut Rng) -> Decoder {
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        let mut rand = |shape: &[usize], lo: f64, hi: f64| {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (lo + (hi - lo) * rng.uniform()) as f32).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        t.insert("input.mean".to_string(), rand(&[VOXELS], -1.0, 1.0));
        t.insert("input.std".to_string(), rand(&[VOXELS], 0.5, 2.0));
        let heads =
            [("image", vec![40], Some(6)), ("text", vec![3, 10], Some(5)), ("pixels", vec![1, 4, 4], None)];
        for (name, shape, rank) in &heads {
            let out: usize = shape.iter().product();
            let p = format!("heads.{name}");
            match rank {
                Some(r) => {
                    t.insert(format!("{p}.down"), rand(&[*r, VOXELS], -0.1, 0.1));
                    t.insert(format!("{p}.up"), rand(&[out, *r], -1.0, 1.0));
                }
                None => {
                    t.insert(format!("{p}.weight"), rand(&[out, VOXELS], -0.1, 0.1));
                }
            }
            for s in ["bias", "pred_mean", "target_mean"] {
                t.insert(format!("{p}.{s}"), rand(&[out], -0.5, 0.5));
            }
            for s in ["pred_std", "target_std"] {
                t.insert(format!("{p}.{s}"), rand(&[out], 0.3, 3.0));
            }
        }
        let cfg = ModelConfig {
            format: FORMAT.into(),
            n_voxels: VOXELS,
            zscore_input: true,
            heads: heads
                .iter()
                .map(|(n, s, r)| HeadConfig {
                    name: n.to_string(),
                    shape: s.clone(),
                    rank: *r,
                    renorm: true,
                    input: Default::default(),
                })
                .collect(),
            fusion: FusionConfig { pixel_head: Some("pixels".into()), ..FusionConfig::default() },
            provenance: serde_json::Value::Null,
        };
        Decoder::new(cfg, &VarBuilder::from_tensors(t, DType::F32, &dev), &dev).unwrap()
    }

    fn betas(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n * VOXELS).map(|_| rng.normal() as f32).collect()
    }

    /// A gallery of the model's outputs for 20 random items, and those items' betas.
    fn gallery(decoder: &Decoder, rng: &mut Rng) -> (Gallery, Vec<f32>) {
        let b = betas(rng, 20);
        (synthetic::gallery_of_outputs(decoder, &b, 20).unwrap(), b)
    }

    fn stage(cfg: DecodeConfig, seed: u64) -> (DecodeStage, Gallery, Vec<f32>) {
        let mut rng = Rng::new(seed, 1);
        let decoder = model(&mut rng);
        let (g, b) = gallery(&decoder, &mut rng);
        (DecodeStage::with_model(decoder, Some(std::sync::Arc::new(g.clone())), &cfg).unwrap(), g, b)
    }

    #[test]
    fn latent_heads_publish_latents_that_give_the_outputs_and_rank_like_the_outputs() {
        let cfg = DecodeConfig { device: "cpu".into(), top_k: 20, ..DecodeConfig::default() };
        let latent = DecodeConfig { latent_heads: vec!["image".into(), "text".into()], ..cfg.clone() };
        let (mut full, g, item_betas) = stage(cfg, 3);
        let (mut part, _, _) = stage(latent, 3);
        let mut rng = Rng::new(5, 2);
        for (i, noise) in betas(&mut rng, 6).chunks_exact(VOXELS).enumerate() {
            let item = &item_betas[i * VOXELS..][..VOXELS];
            let b: Vec<f32> = item.iter().zip(noise).map(|(x, e)| x + 0.5 * e).collect();
            let (a, p) = (
                full.decode(&synthetic::trial(i as u64, &b)).unwrap(),
                part.decode(&synthetic::trial(i as u64, &b)).unwrap(),
            );
            let names = |d: &Decoded| d.heads.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>();
            assert_eq!(names(&a), ["image", "text", "pixels"]);
            assert_eq!(names(&p), ["pixels"]);
            assert_eq!(p.latents.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["image", "text"]);
            assert_eq!(a.png, p.png);
            // Each latent through the head's (renormalisation-folded) output map is the output.
            for (name, l) in &p.latents {
                let head = part.decoder().unwrap().heads.iter().find(|h| &h.cfg.name == name).unwrap();
                let y = head.output_of_latent(l).unwrap().unwrap();
                let want = &a.heads.iter().find(|(n, _, _)| n == name).unwrap().2;
                for (x, w) in y.iter().zip(want) {
                    assert!((x - w).abs() <= 1e-4 * (1.0 + w.abs()), "{name}: {x} vs {w}");
                }
            }
            // Ranked from latents, the gallery comes out as from the outputs by plain cosines.
            let by_name = a.heads.iter().map(|(n, _, v)| (n.clone(), v.clone())).collect();
            let direct = g.rank(&by_name, &BTreeMap::new(), 20);
            assert_eq!(direct[0].index, i, "the trial's own item first");
            for (x, y) in direct.iter().zip(&p.top) {
                assert_eq!(x.index, y.index);
                assert!((x.score - y.score).abs() < 1e-5, "{} vs {}", x.score, y.score);
            }
            for (x, y) in direct.iter().zip(&a.top) {
                assert!((x.score - y.score).abs() < 1e-5, "{} vs {}", x.score, y.score);
            }
        }
    }

    #[test]
    fn a_calibrated_alignment_corrects_latents_and_outputs_alike_and_spares_other_conditions() {
        use crate::decode::align::{Alignment, InputNorm};
        use crate::decode::model::HeadAdjust;
        let cfg = DecodeConfig { device: "cpu".into(), top_k: 20, ..DecodeConfig::default() };
        let latent = DecodeConfig { latent_heads: vec!["image".into(), "text".into()], ..cfg.clone() };
        let (mut full, g, item_betas) = stage(cfg, 6);
        let (mut part, _, _) = stage(latent, 6);
        // A random correction of rank 3 on every head (latent space for the low-rank ones),
        // fitted for the imagery condition.
        let mut rng = Rng::new(8, 3);
        let mut rand = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_vec(
                (0..n).map(|_| 0.2 * rng.normal() as f32).collect::<Vec<f32>>(),
                shape,
                &Device::Cpu,
            )
            .unwrap()
        };
        let dec = full.decoder().unwrap().clone();
        let adjusts: Vec<Option<HeadAdjust>> = dec
            .heads
            .iter()
            .map(|h| {
                let (latent, d) = match h.rank() {
                    Some(r) => (true, r),
                    None => (false, h.cfg.n_outputs()),
                };
                Some(HeadAdjust::new(latent, &rand(&[3, d]), &rand(&[3]), &rand(&[3, d])).unwrap())
            })
            .collect();
        let run = (vec![0.0; VOXELS], vec![1.0; VOXELS]);
        let alignment = Alignment::new(
            &dec,
            InputNorm::Model,
            run,
            None,
            adjusts,
            Some("imagery".into()),
            Default::default(),
        )
        .unwrap();
        full.set_adapter(Adapter::Calibrated(alignment.clone()));
        part.set_adapter(Adapter::Calibrated(alignment));
        let (mut plain, _, _) =
            stage(DecodeConfig { device: "cpu".into(), top_k: 20, ..DecodeConfig::default() }, 6);
        for i in 0..4 {
            let b = &item_betas[i * VOXELS..][..VOXELS];
            let mut t = synthetic::trial(i as u64, b);
            t.condition = "imagery".into();
            let (a, p, n) = (full.decode(&t).unwrap(), part.decode(&t).unwrap(), plain.decode(&t).unwrap());
            assert_eq!((a.alignment, p.alignment, n.alignment), ("head", "head", "none"));
            // The corrected latent through the head's output map is the corrected output.
            for (name, l) in &p.latents {
                let head = part.decoder().unwrap().heads.iter().find(|h| &h.cfg.name == name).unwrap();
                let y = head.output_of_latent(l).unwrap().unwrap();
                let want = &a.heads.iter().find(|(n, _, _)| n == name).unwrap().2;
                for (x, w) in y.iter().zip(want) {
                    assert!((x - w).abs() <= 1e-4 * (1.0 + w.abs()), "{name}: {x} vs {w}");
                }
                let before = &n.heads.iter().find(|(n, _, _)| n == name).unwrap().2;
                assert!(want.iter().zip(before).any(|(x, y)| (x - y).abs() > 1e-3), "{name}: not corrected");
            }
            // Ranked from corrected latents as from corrected outputs.
            let by_name = a.heads.iter().map(|(n, _, v)| (n.clone(), v.clone())).collect();
            for (x, y) in g.rank(&by_name, &BTreeMap::new(), 20).iter().zip(&p.top) {
                assert_eq!(x.index, y.index);
                assert!((x.score - y.score).abs() < 1e-5, "{} vs {}", x.score, y.score);
            }
            // A seen trial is decoded without the imagery alignment.
            t.condition = "seen".into();
            let s = full.decode(&t).unwrap();
            assert_eq!(s.alignment, "none");
            assert_eq!(s.heads, n.heads);
        }
    }

    #[test]
    fn eight_bit_input_weights_stay_within_a_few_percent_of_float32() {
        let cfg = DecodeConfig { device: "cpu".into(), top_k: 20, ..DecodeConfig::default() };
        let q8 = DecodeConfig { weight_dtype: WeightDtype::Q8_0, ..cfg.clone() };
        let (mut f32_stage, _, item_betas) = stage(cfg, 4);
        let (mut q8_stage, _, _) = stage(q8, 4);
        for i in 0..5 {
            let b = &item_betas[i * VOXELS..][..VOXELS];
            let (a, q) = (
                f32_stage.decode(&synthetic::trial(0, b)).unwrap(),
                q8_stage.decode(&synthetic::trial(0, b)).unwrap(),
            );
            assert_eq!(a.top[0].index, i);
            assert_eq!(q.top[0].index, i);
            for ((name, _, x), (_, _, y)) in a.heads.iter().zip(&q.heads) {
                let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                let diff = x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum::<f32>().sqrt();
                assert!(diff / norm < 0.03, "{name}: relative difference {}", diff / norm);
                assert!(diff > 0.0, "{name}: the 8-bit path was not taken");
            }
        }
    }

    #[test]
    fn latent_heads_must_be_low_rank_heads_of_the_model_and_not_the_picture() {
        for (heads, want) in [(vec!["nope"], "no head \"nope\""), (vec!["pixels"], "not low-rank")] {
            let cfg = DecodeConfig {
                device: "cpu".into(),
                latent_heads: heads.iter().map(|h| h.to_string()).collect(),
                ..DecodeConfig::default()
            };
            let mut rng = Rng::new(1, 1);
            let err = DecodeStage::with_model(model(&mut rng), None, &cfg).err().unwrap().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn mix_follows_mirage() {
        let (ci, ct) = mix(&[1.0, 2.0], &[4.0], Some(&[10.0, 10.0]), Some(&[2.0]), 0.5);
        assert!((ci[0] - (0.5 + 10.0 * 0.03125)).abs() < 1e-6 && (ci[1] - (1.0 + 0.3125)).abs() < 1e-6);
        assert!((ct[0] - (2.0 + 2.0 * 0.03125)).abs() < 1e-6);
        assert_eq!(mix(&[1.0], &[1.0], None, None, 0.0), (vec![1.0], vec![0.0]));
    }
}

#[cfg(test)]
mod mindeye2_tests {
    use super::*;

    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use crate::rng::Rng;

    const VOXELS: usize = 12;

    fn net(weights: &VarMap) -> MindEye2 {
        let cfg = mindeye2::Config {
            architecture: mindeye2::ARCHITECTURE.into(),
            n_voxels: VOXELS,
            hidden: 8,
            seq_len: 1,
            n_blocks: 1,
            clip_tokens: 2,
            clip_dim: 4,
            subject: 0,
            blurry: None,
            vae: None,
            provenance: serde_json::Value::Null,
        };
        MindEye2::load(cfg, VarBuilder::from_varmap(weights, DType::F32, &Device::Cpu)).unwrap()
    }

    #[test]
    fn zscore_run_gives_a_mindeye2_network_the_runs_z_scores_once_it_has_three_trials() {
        let weights = VarMap::new();
        let (reference, live) = (net(&weights), net(&weights));
        let cfg = DecodeConfig { alignment: "zscore-run".into(), ..DecodeConfig::default() };
        let mut stage = DecodeStage::with_mindeye2(live, None, &cfg).unwrap();
        let mut rng = Rng::new(3, 0);
        let rows: Vec<Vec<f32>> =
            (0..4).map(|_| (0..VOXELS).map(|v| (rng.normal() + v as f64) as f32).collect()).collect();
        let clip_of = |x: &[f32]| {
            let out = reference.forward(&reference.input(x, 1).unwrap()).unwrap();
            out.clip_voxels.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        for (k, row) in rows.iter().enumerate() {
            let d = stage.decode(&synthetic::trial(k as u64, row)).unwrap();
            assert_eq!(d.heads.iter().map(|h| h.0.as_str()).collect::<Vec<_>>(), ["backbone", "clip_voxels"]);
            // Before three trials the betas go as given; then z-scored over the trials so far.
            let input: Vec<f32> = if k + 1 < 3 {
                row.clone()
            } else {
                (0..VOXELS)
                    .map(|v| {
                        let xs: Vec<f64> = rows[..=k].iter().map(|r| f64::from(r[v])).collect();
                        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
                        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
                        ((f64::from(row[v]) - mean) / var.sqrt()) as f32
                    })
                    .collect()
            };
            let want = clip_of(&input);
            for (a, b) in d.heads[1].2.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "trial {k}: {a} vs {b}");
            }
        }
        assert!(stage.decoder().is_none() && stage.picture_network().is_none());
        let bad = DecodeConfig { alignment: "head.safetensors".into(), ..DecodeConfig::default() };
        assert!(DecodeStage::with_mindeye2(net(&weights), None, &bad).is_err());
    }
}
