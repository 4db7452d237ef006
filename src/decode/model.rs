//! The MIRAGE decoder: linear heads from z-scored betas to embeddings and images, loaded
//! from a model folder.
//!
//! A model is a folder:
//!
//! ```text
//! config.json          heads, shapes, input size, preprocessing, fusion, provenance
//! model.safetensors    input.mean, input.std          [n_voxels]        (z-scoring)
//!                      input.voxels (optional, u32)    [n_voxels]        (grid indices)
//!                      heads.NAME.weight [out, in] + heads.NAME.bias [out]          full
//!                      heads.NAME.down [r, in], heads.NAME.up [out, r], .bias [out]  low rank
//!                      heads.NAME.target_mean/target_std/pred_mean/pred_std [out]   renorm
//!                      fusion.u_img, fusion.u_txt (optional unconditional embeddings)
//! ```
//!
//! `weight` is sklearn's `coef_` / PyTorch `Linear` layout. Outputs are renormalised like
//! MIRAGE's `normalize_preds` — `(pred − pred_mean) / pred_std · target_std + target_mean` —
//! with statistics stored at training time instead of a test batch. The safetensors file is
//! memory-mapped, so a large head is read into tensor storage once, not through a buffer.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::DecodeError;

/// Name of the configuration file in a model folder.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the weights file in a model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Format tag written into every model's configuration.
pub const FORMAT: &str = "mirage-model/1";

/// One head's description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Name (`image`, `text`, `lowlevel`, `retrieval`, `pixels`, …).
    pub name: String,
    /// Output shape: `[d]`, `[tokens, d]` or `[c, h, w]`.
    pub shape: Vec<usize>,
    /// Rank of a low-rank head (`None`: full).
    #[serde(default)]
    pub rank: Option<usize>,
    /// Whether outputs are renormalised to the stored target statistics.
    #[serde(default = "yes")]
    pub renorm: bool,
    /// What the head reads (MIRAGE's retrieval head was fitted on L2-normalised betas).
    #[serde(default, skip_serializing_if = "HeadInput::is_default")]
    pub input: HeadInput,
}

fn yes() -> bool {
    true
}

/// A head's input normalisation, applied to the decoder's normalised (and aligned) betas `z`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadInput {
    /// `z` itself: betas z-scored with the model's statistics (or the run's, live).
    #[default]
    Zscore,
    /// `z` scaled to unit L2 norm per trial.
    L2,
    /// The betas on their own scale: `z · input.std + input.mean`.
    None,
}

impl HeadInput {
    fn is_default(&self) -> bool {
        *self == HeadInput::Zscore
    }

    /// The name in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            HeadInput::Zscore => "zscore",
            HeadInput::L2 => "l2",
            HeadInput::None => "none",
        }
    }

    /// Parses a name of [`HeadInput::name`].
    pub fn parse(s: &str) -> Option<HeadInput> {
        [HeadInput::Zscore, HeadInput::L2, HeadInput::None].into_iter().find(|h| h.name() == s)
    }

    /// Whether the head's input is an affine function of `z` (calibration's closed form
    /// corrects only such heads).
    pub fn is_affine(self) -> bool {
        self != HeadInput::L2
    }
}

impl HeadConfig {
    /// Number of outputs (the product of the shape).
    pub fn n_outputs(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How the heads are combined.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FusionConfig {
    /// MIRAGE's mixing strength `t`.
    pub t: f64,
    /// Head giving the image conditioning (`c_img`).
    pub image_head: Option<String>,
    /// Head giving the text conditioning (`c_txt`).
    pub text_head: Option<String>,
    /// Head predicting a small image directly.
    pub pixel_head: Option<String>,
    /// Weight of each head's cosine similarity in gallery retrieval.
    pub retrieval_weights: BTreeMap<String, f64>,
}

impl Default for FusionConfig {
    fn default() -> FusionConfig {
        FusionConfig {
            t: 0.5,
            image_head: None,
            text_head: None,
            pixel_head: None,
            retrieval_weights: BTreeMap::new(),
        }
    }
}

/// `config.json` of a model folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Always [`FORMAT`].
    pub format: String,
    /// Number of input voxels (betas per trial).
    pub n_voxels: usize,
    /// Whether betas are z-scored with `input.mean` / `input.std` first.
    #[serde(default = "yes")]
    pub zscore_input: bool,
    /// The heads, in output order.
    pub heads: Vec<HeadConfig>,
    /// Fusion and retrieval settings.
    #[serde(default)]
    pub fusion: FusionConfig,
    /// Where the model came from (training data, alpha, tool versions…).
    #[serde(default)]
    pub provenance: serde_json::Value,
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig, DecodeError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DecodeError::Model(format!("{}: {e}", path.display())))?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| DecodeError::Model(format!("{}: {e}", path.display())))?;
        if cfg.format != FORMAT {
            return Err(DecodeError::Model(format!(
                "{}: format {:?}, expected {FORMAT:?}",
                path.display(),
                cfg.format
            )));
        }
        if cfg.n_voxels == 0 || cfg.heads.is_empty() {
            return Err(DecodeError::Model(format!("{}: no voxels or no heads", path.display())));
        }
        for h in &cfg.heads {
            if h.n_outputs() == 0 || h.rank == Some(0) {
                return Err(DecodeError::Model(format!("head {}: empty shape or rank 0", h.name)));
            }
        }
        Ok(cfg)
    }
}

/// The linear map of one head.
enum Map {
    Full { weight: Tensor, bias: Tensor },
    LowRank { down: Tensor, up: Tensor, bias: Tensor },
}

/// `x · wᵀ (+ b)` in the weights' precision, returned as float32.
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let y = x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A latent through a latent-space adjust (unchanged otherwise).
fn adjust_latent(l: &Tensor, adjust: Option<&HeadAdjust>) -> candle_core::Result<Tensor> {
    match adjust {
        Some(a) if a.latent => a.apply(l),
        _ => Ok(l.clone()),
    }
}

/// An output through an output-space adjust (unchanged otherwise).
fn adjust_output(y: &Tensor, adjust: Option<&HeadAdjust>) -> candle_core::Result<Tensor> {
    match adjust {
        Some(a) if !a.latent => a.apply(y),
        _ => Ok(y.clone()),
    }
}

/// Per-output renormalisation statistics.
struct Renorm {
    pred_mean: Tensor,
    pred_std: Tensor,
    target_mean: Tensor,
    target_std: Tensor,
    pred_corr: Option<Tensor>,
}

/// An 8-bit (Q8_0: blocks of 32 weights with one scale) copy of the matrix that reads the
/// betas, for live decodes on a CPU; `pad` zero columns make the input a whole number of blocks.
struct FastInput {
    matmul: QMatMul,
    pad: usize,
}

/// The betas are padded to a multiple of this for the 8-bit product: Q8_0 blocks are 32
/// long, and candle's CPU kernel runs about twice as fast on whole 256-blocks (measured).
const Q8_PAD: usize = 256;

/// One head's part of a live decode.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadOutput {
    /// The rank-r latent `down · z` of a low-rank head.
    pub latent: Option<Vec<f32>>,
    /// The renormalised output (absent when only the latent was asked for).
    pub output: Option<Vec<f32>>,
}

/// A fitted correction around one head (calibration's output alignment): identity plus rank
/// `n`, `v + (v·leftᵀ + shift)·right`, on a low-rank head's latent or on a head's renormalised
/// output. `left`, `right`: `[n, d]`; `shift`: `[n]`.
#[derive(Clone, Debug)]
pub struct HeadAdjust {
    /// Whether it acts on the latent (a low-rank head) rather than on the output.
    pub latent: bool,
    left_t: Tensor,
    shift: Tensor,
    right: Tensor,
}

impl HeadAdjust {
    /// The map `v + (v·leftᵀ + shift)·right`.
    pub fn new(
        latent: bool,
        left: &Tensor,
        shift: &Tensor,
        right: &Tensor,
    ) -> candle_core::Result<HeadAdjust> {
        let (n, d) = left.dims2()?;
        if right.dims2()? != (n, d) || shift.dims1()? != n {
            candle_core::bail!(
                "adjust: left {:?}, shift {:?}, right {:?} do not agree",
                left.dims(),
                shift.dims(),
                right.dims()
            );
        }
        Ok(HeadAdjust {
            latent,
            left_t: left.t()?.contiguous()?,
            shift: shift.clone(),
            right: right.contiguous()?,
        })
    }

    /// Its factors `(left, shift, right)`.
    pub fn factors(&self) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        Ok((self.left_t.t()?.contiguous()?, self.shift.clone(), self.right.clone()))
    }

    /// Maps `v` `(batch, d)`.
    pub fn apply(&self, v: &Tensor) -> candle_core::Result<Tensor> {
        let k = v.contiguous()?.matmul(&self.left_t)?.broadcast_add(&self.shift)?;
        v + k.matmul(&self.right)?
    }
}

/// `AᵀA` `[r, r]` of a float32 CPU matrix `a` `[n, r]`: only the lower half is computed (faer's
/// triangular product, half the work of a full one, which dominates a cold calibration), then
/// mirrored.
fn gram_lower_mirrored(a: &Tensor) -> candle_core::Result<Tensor> {
    let (n, r) = a.dims2()?;
    let a = a.contiguous()?;
    let (storage, layout) = a.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("gram: not a CPU tensor") };
    let values = cpu.as_slice::<f32>()?;
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("gram: not contiguous") };
    let m = faer::MatRef::from_row_major_slice(&values[start..end], n, r);
    let mut g = faer::Mat::<f32>::zeros(r, r);
    faer::linalg::matmul::triangular::matmul(
        g.as_mut(),
        faer::linalg::matmul::triangular::BlockStructure::TriangularLower,
        faer::Accum::Replace,
        m.transpose(),
        faer::linalg::matmul::triangular::BlockStructure::Rectangular,
        m,
        faer::linalg::matmul::triangular::BlockStructure::Rectangular,
        1.0,
        faer::Par::rayon(0),
    );
    let out: Vec<f32> =
        (0..r).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| g[(i.max(j), i.min(j))]).collect();
    Tensor::from_vec(out, (r, r), a.device())
}

/// One loaded head.
pub struct Head {
    /// Its description.
    pub cfg: HeadConfig,
    map: Map,
    renorm: Option<Renorm>,
    fast_input: Option<FastInput>,
    /// How it turns the decoder's normalised betas into its own input.
    prepare: Prepare,
    /// `AᵀA` of a low-rank head's output map, computed once on first use.
    gram: std::sync::OnceLock<Tensor>,
    span: tracing::Span,
}

/// A head's [`HeadInput`] as it is applied.
enum Prepare {
    /// `z` itself.
    AsIs,
    /// `z` scaled to unit L2 norm per trial.
    UnitNorm,
    /// `z · std + mean` with the model's input statistics.
    Unscale(Tensor, Tensor),
}

impl Head {
    /// Loads head `cfg.name` from `vb` (prefix `heads.NAME`); `input_stats` are the model's
    /// input statistics `(mean, std)`, which a head reading `none` undoes.
    pub fn new(
        cfg: &HeadConfig,
        n_in: usize,
        vb: VarBuilder,
        input_stats: (&Tensor, &Tensor),
    ) -> Result<Head, DecodeError> {
        let vb = vb.pp(&cfg.name);
        let out = cfg.n_outputs();
        let err = |e: candle_core::Error| DecodeError::Model(format!("head {}: {e}", cfg.name));
        let bias = vb.get(out, "bias").map_err(err)?;
        let map = match cfg.rank {
            None => Map::Full { weight: vb.get((out, n_in), "weight").map_err(err)?, bias },
            Some(r) => Map::LowRank {
                down: vb.get((r, n_in), "down").map_err(err)?,
                up: vb.get((out, r), "up").map_err(err)?,
                bias,
            },
        };
        let renorm = if cfg.renorm {
            Some(Renorm {
                pred_mean: vb.get(out, "pred_mean").map_err(err)?,
                pred_std: vb.get(out, "pred_std").map_err(err)?,
                target_mean: vb.get(out, "target_mean").map_err(err)?,
                target_std: vb.get(out, "target_std").map_err(err)?,
                pred_corr: if vb.contains_tensor("pred_corr") {
                    Some(vb.get((out, out), "pred_corr").map_err(err)?)
                } else {
                    None
                },
            })
        } else {
            None
        };
        Ok(Head {
            cfg: cfg.clone(),
            map,
            renorm,
            fast_input: None,
            prepare: match cfg.input {
                HeadInput::Zscore => Prepare::AsIs,
                HeadInput::L2 => Prepare::UnitNorm,
                HeadInput::None => Prepare::Unscale(input_stats.0.clone(), input_stats.1.clone()),
            },
            gram: std::sync::OnceLock::new(),
            span: tracing::trace_span!("head", name = %cfg.name),
        })
    }

    /// The head's own input from the decoder's normalised betas `z` `(batch, n_voxels)`.
    pub fn prepare(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        match &self.prepare {
            Prepare::AsIs => Ok(z.clone()),
            Prepare::UnitNorm => {
                let norm = z.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
                z.broadcast_div(&norm)
            }
            Prepare::Unscale(mean, std) => z.broadcast_mul(std)?.broadcast_add(mean),
        }
    }

    /// Its rank (`None`: a full head).
    pub fn rank(&self) -> Option<usize> {
        match &self.map {
            Map::Full { .. } => None,
            Map::LowRank { down, .. } => down.dim(0).ok(),
        }
    }

    /// Keeps an 8-bit copy of the matrix that reads the betas (`down`, or a full head's
    /// `weight`) for [`Head::live`]; the float32 weights stay for training-side callers.
    pub fn quantise_input(&mut self) -> candle_core::Result<()> {
        let w = match &self.map {
            Map::Full { weight, .. } => weight,
            Map::LowRank { down, .. } => down,
        };
        let n_in = w.dim(1)?;
        let pad = n_in.next_multiple_of(Q8_PAD) - n_in;
        let w = w.to_dtype(DType::F32)?.pad_with_zeros(1, 0, pad)?;
        let matmul = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        self.fast_input = Some(FastInput { matmul, pad });
        Ok(())
    }

    /// The live path for normalised betas `z` `(1, n_voxels)`: the latent of a low-rank head
    /// and, unless `latent_only`, the renormalised output, both through `adjust` when given.
    /// Uses the 8-bit input copy if kept.
    pub fn live(
        &self,
        z: &Tensor,
        latent_only: bool,
        adjust: Option<&HeadAdjust>,
    ) -> candle_core::Result<HeadOutput> {
        let _g = self.span.enter();
        let z = &self.prepare(z)?;
        let first = match &self.fast_input {
            Some(f) => f.matmul.forward(&z.pad_with_zeros(1, 0, f.pad)?)?,
            None => match &self.map {
                Map::Full { weight, .. } => affine(z, weight, None)?,
                Map::LowRank { down, .. } => affine(z, down, None)?,
            },
        };
        let (latent, raw) = match &self.map {
            Map::Full { bias, .. } => (None, Some(first.broadcast_add(bias)?)),
            Map::LowRank { up, bias, .. } => {
                let latent = adjust_latent(&first, adjust)?;
                let raw = if latent_only { None } else { Some(affine(&latent, up, Some(bias))?) };
                (Some(latent), raw)
            }
        };
        let output = match raw {
            Some(raw) => {
                Some(adjust_output(&self.renormalise(&raw, None)?, adjust)?.flatten_all()?.to_vec1::<f32>()?)
            }
            None => None,
        };
        Ok(HeadOutput { latent: latent.map(|l| l.flatten_all()?.to_vec1::<f32>()).transpose()?, output })
    }

    /// Renormalised outputs `(batch, n_outputs)` for normalised betas `z`, through `adjust`
    /// when given (float32 weights: the offline and calibration path).
    pub fn predict(&self, z: &Tensor, adjust: Option<&HeadAdjust>) -> candle_core::Result<Tensor> {
        let z = &self.prepare(z)?;
        let raw = match &self.map {
            Map::Full { weight, bias } => affine(z, weight, Some(bias))?,
            Map::LowRank { down, up, bias } => {
                affine(&adjust_latent(&affine(z, down, None)?, adjust)?, up, Some(bias))?
            }
        };
        adjust_output(&self.renormalise(&raw, None)?, adjust)
    }

    /// The rank-r latents `down · z` `(batch, r)` of a low-rank head (float32 weights).
    pub fn latent(&self, z: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let z = &self.prepare(z)?;
        match &self.map {
            Map::Full { .. } => Ok(None),
            Map::LowRank { down, .. } => affine(z, down, None).map(Some),
        }
    }

    /// Mean of the training targets (`None` without renormalisation).
    pub fn target_mean(&self) -> Option<&Tensor> {
        self.renorm.as_ref().map(|r| &r.target_mean)
    }

    /// `AᵀA` `[r, r]` of a low-rank head's output map `y = A·l + c` ([`Head::output_map`]),
    /// computed once and kept: the gallery's latent index and calibration both need it.
    pub fn output_gram(&self) -> candle_core::Result<Option<Tensor>> {
        if let Some(g) = self.gram.get() {
            return Ok(Some(g.clone()));
        }
        let Some((a, _)) = self.output_map()? else { return Ok(None) };
        let g =
            if a.device().is_cpu() { gram_lower_mirrored(&a)? } else { a.t()?.contiguous()?.matmul(&a)? };
        Ok(Some(self.gram.get_or_init(|| g).clone()))
    }

    /// A low-rank head's renormalised output as an affine map of its latent, `y = A·l + c`
    /// (`A` `[out, r]`, `c` `[out]`), in float32 on its device: the renormalisation folded into
    /// `up` and `bias`.
    pub fn output_map(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let Map::LowRank { up, bias, .. } = &self.map else { return Ok(None) };
        let up = up.to_dtype(DType::F32)?;
        Ok(Some(match &self.renorm {
            None => (up, bias.clone()),
            Some(r) => {
                let scale = r.target_std.broadcast_div(&r.pred_std)?;
                let a = up.broadcast_mul(&scale.unsqueeze(1)?)?;
                let c = (bias - &r.pred_mean)?.broadcast_mul(&scale)?.broadcast_add(&r.target_mean)?;
                (a, c)
            }
        }))
    }

    /// The renormalised output for latent `l` of a low-rank head (`None` for a full head), as a
    /// subscriber forms it from a published `NAME.latent`: `A·l + c` of [`Head::output_map`].
    pub fn output_of_latent(&self, l: &[f32]) -> candle_core::Result<Option<Vec<f32>>> {
        let Some((a, c)) = self.output_map()? else { return Ok(None) };
        let l = Tensor::from_slice(l, (l.len(), 1), a.device())?;
        Ok(Some((a.matmul(&l)?.squeeze(1)? + c)?.to_vec1::<f32>()?))
    }

    /// `xs`: z-scored betas `(batch, n_voxels)` → raw predictions `(batch, n_outputs)` (through
    /// the head's own input normalisation).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _g = self.span.enter();
        let (_batch, _n_in) = xs.dims2()?;
        let xs = &self.prepare(xs)?;
        match &self.map {
            Map::Full { weight, bias } => affine(xs, weight, Some(bias)),
            Map::LowRank { down, up, bias } => affine(&affine(xs, down, None)?, up, Some(bias)),
        }
    }

    /// Stores its weight matrices in `dtype` (e.g. bf16, half the bytes a decode reads);
    /// biases and statistics stay float32, and outputs are float32.
    pub fn set_weight_dtype(&mut self, dtype: DType) -> candle_core::Result<()> {
        match &mut self.map {
            Map::Full { weight, .. } => *weight = weight.to_dtype(dtype)?,
            Map::LowRank { down, up, .. } => {
                *down = down.to_dtype(dtype)?;
                *up = up.to_dtype(dtype)?;
            }
        }
        Ok(())
    }

    /// Renormalises raw predictions with the stored statistics (or `pred` statistics given).
    pub fn renormalise(
        &self,
        raw: &Tensor,
        pred_stats: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let Some(r) = &self.renorm else { return Ok(raw.clone()) };
        let (mean, std) = pred_stats.unwrap_or((&r.pred_mean, &r.pred_std));
        raw.broadcast_sub(mean)?
            .broadcast_div(std)?
            .broadcast_mul(&r.target_std)?
            .broadcast_add(&r.target_mean)
    }

    /// Its tensors under their model-file names (`heads.NAME.…`).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let p = format!("heads.{}", self.cfg.name);
        let mut t = Vec::new();
        match &self.map {
            Map::Full { weight, bias } => {
                t.push((format!("{p}.weight"), weight.clone()));
                t.push((format!("{p}.bias"), bias.clone()));
            }
            Map::LowRank { down, up, bias } => {
                t.push((format!("{p}.down"), down.clone()));
                t.push((format!("{p}.up"), up.clone()));
                t.push((format!("{p}.bias"), bias.clone()));
            }
        }
        if let Some(r) = &self.renorm {
            for (s, v) in [
                ("pred_mean", &r.pred_mean),
                ("pred_std", &r.pred_std),
                ("target_mean", &r.target_mean),
                ("target_std", &r.target_std),
            ] {
                t.push((format!("{p}.{s}"), v.clone()));
            }
            t.extend(r.pred_corr.as_ref().map(|c| (format!("{p}.pred_corr"), c.clone())));
        }
        t
    }

    /// Whether the head renormalises its outputs.
    pub fn renorms(&self) -> bool {
        self.renorm.is_some()
    }

    /// Mean and standard deviation of its raw predictions on the seen training set.
    pub fn pred_stats(&self) -> Option<(&Tensor, &Tensor)> {
        self.renorm.as_ref().map(|r| (&r.pred_mean, &r.pred_std))
    }

    /// Correlation matrix of its standardised training predictions, when the model stores it.
    pub fn pred_corr(&self) -> Option<&Tensor> {
        self.renorm.as_ref().and_then(|r| r.pred_corr.as_ref())
    }
}

/// A loaded model.
pub struct Decoder {
    /// Its configuration.
    pub cfg: ModelConfig,
    /// Where it runs.
    pub device: Device,
    input_mean: Tensor,
    input_std: Tensor,
    /// Grid indices of the input voxels, when the model records them.
    pub voxels: Option<Vec<u32>>,
    /// The heads, in `cfg.heads` order.
    pub heads: Vec<Head>,
    /// Unconditional image and text embeddings for fusion.
    pub unconditional: (Option<Tensor>, Option<Tensor>),
}

impl Decoder {
    /// Loads a model folder onto `device` (the weights are memory-mapped).
    pub fn load(dir: &Path, device: &Device) -> Result<Decoder, DecodeError> {
        let cfg = ModelConfig::load(dir)?;
        let path = dir.join(WEIGHTS_FILE);
        if !path.exists() {
            return Err(DecodeError::Model(format!("{} is missing", path.display())));
        }
        // SAFETY: the model file is mapped read-only and must not be modified while loaded;
        // model folders are written once by `mirage train` or the export tool.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device) }
            .map_err(|e| DecodeError::Model(format!("{}: {e}", path.display())))?;
        Decoder::new(cfg, &vb, device)
    }

    /// Builds the decoder `cfg` describes from the tensors of `vb` (see the module docs for
    /// their names).
    pub fn new(cfg: ModelConfig, vb: &VarBuilder, device: &Device) -> Result<Decoder, DecodeError> {
        let n = cfg.n_voxels;
        let err = |e: candle_core::Error| DecodeError::Model(format!("input: {e}"));
        let (input_mean, input_std) = if cfg.zscore_input {
            (vb.get(n, "input.mean").map_err(err)?, vb.get(n, "input.std").map_err(err)?)
        } else {
            (
                Tensor::zeros(n, DType::F32, device).map_err(err)?,
                Tensor::ones(n, DType::F32, device).map_err(err)?,
            )
        };
        // Voxel indices are stored as float32 (exact below 2²⁴).
        let voxels = if vb.contains_tensor("input.voxels") {
            let t = vb
                .get(n, "input.voxels")
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| DecodeError::Model(format!("input.voxels: {e}")))?;
            Some(t.into_iter().map(|v| v as u32).collect::<Vec<u32>>())
        } else {
            None
        };
        let heads = cfg
            .heads
            .iter()
            .map(|h| Head::new(h, n, vb.pp("heads"), (&input_mean, &input_std)))
            .collect::<Result<Vec<_>, _>>()?;
        let fetch = |name: &str, head: &Option<String>| -> Result<Option<Tensor>, DecodeError> {
            let Some(h) = head.as_ref().and_then(|h| cfg.heads.iter().find(|c| &c.name == h)) else {
                return Ok(None);
            };
            if vb.contains_tensor(name) {
                Ok(Some(vb.get(h.n_outputs(), name).map_err(|e| DecodeError::Model(format!("{name}: {e}")))?))
            } else {
                Ok(None)
            }
        };
        let unconditional =
            (fetch("fusion.u_img", &cfg.fusion.image_head)?, fetch("fusion.u_txt", &cfg.fusion.text_head)?);
        Ok(Decoder { cfg, device: device.clone(), input_mean, input_std, voxels, heads, unconditional })
    }

    /// A short fingerprint of the model (configuration and input statistics), so that files
    /// fitted for one model are not used with another.
    pub fn fingerprint(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        h.update(serde_json::to_string(&self.cfg).unwrap_or_default().as_bytes());
        for t in [&self.input_mean, &self.input_std] {
            if let Ok(v) = t.to_vec1::<f32>() {
                h.update(&crate::volume::f32_le_view(&v));
            }
        }
        format!("{:08x}", h.finalize())
    }

    /// Keeps the heads' weights in `dtype`: bf16 replaces them (see
    /// [`Head::set_weight_dtype`]); q8_0 adds 8-bit input copies for live decodes on a CPU
    /// (see [`Head::quantise_input`]).
    pub fn set_weight_dtype(&mut self, dtype: super::WeightDtype) -> Result<(), DecodeError> {
        use super::WeightDtype;
        if dtype == WeightDtype::Q8_0 && !self.device.is_cpu() {
            return Err(DecodeError::Device(
                "weight dtype q8_0 is for CPU decoding; use bf16 on a GPU".into(),
            ));
        }
        for h in &mut self.heads {
            let done = match dtype {
                WeightDtype::F32 => Ok(()),
                WeightDtype::Bf16 => h.set_weight_dtype(DType::BF16),
                WeightDtype::Q8_0 => h.quantise_input(),
            };
            done.map_err(|e| DecodeError::Device(format!("head {}: {e}", h.cfg.name)))?;
        }
        Ok(())
    }

    /// Its tensors under their model-file names, so that it can be rebuilt elsewhere.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut t = vec![
            ("input.mean".to_string(), self.input_mean.clone()),
            ("input.std".to_string(), self.input_std.clone()),
        ];
        if let Some(v) = &self.voxels {
            let v: Vec<f32> = v.iter().map(|&i| i as f32).collect();
            t.extend(
                Tensor::from_vec(v, self.cfg.n_voxels, &self.device).ok().map(|v| ("input.voxels".into(), v)),
            );
        }
        t.extend(self.heads.iter().flat_map(Head::named_tensors));
        let (u_img, u_txt) = &self.unconditional;
        t.extend(u_img.as_ref().map(|u| ("fusion.u_img".to_string(), u.clone())));
        t.extend(u_txt.as_ref().map(|u| ("fusion.u_txt".to_string(), u.clone())));
        t
    }

    /// The training statistics of the betas `(mean, std)`, `[n_voxels]` each.
    pub fn input_stats(&self) -> (&Tensor, &Tensor) {
        (&self.input_mean, &self.input_std)
    }

    /// Z-scores betas `(batch, n_voxels)` with the training statistics.
    pub fn normalise(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.broadcast_sub(&self.input_mean)?.broadcast_div(&self.input_std)
    }

    /// Raw predictions of every head for betas `(batch, n_voxels)`.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let z = self.normalise(xs)?;
        self.heads.iter().map(|h| h.forward(&z)).collect()
    }

    /// Renormalised predictions of every head for normalised (and aligned) inputs `z`
    /// `(batch, n_voxels)`, one `(batch, n_outputs)` array per head; `adjusts[h]` (when
    /// present) corrects head `h`.
    pub fn predict_normalised(
        &self,
        z: &Tensor,
        adjusts: &[Option<HeadAdjust>],
    ) -> Result<Vec<Vec<f32>>, DecodeError> {
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            self.heads
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    h.predict(z, adjusts.get(i).and_then(Option::as_ref))?.flatten_all()?.to_vec1::<f32>()
                })
                .collect()
        };
        run().map_err(|e| DecodeError::Compute(e.to_string()))
    }

    /// The live path of every head for one trial's normalised (and aligned) betas `z`
    /// `(1, n_voxels)`; `latent_only[h]` leaves low-rank head `h` at its latent, `adjusts[h]`
    /// (when present) corrects it.
    pub fn live(
        &self,
        z: &Tensor,
        latent_only: &[bool],
        adjusts: &[Option<HeadAdjust>],
    ) -> Result<Vec<HeadOutput>, DecodeError> {
        self.heads
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let adjust = adjusts.get(i).and_then(Option::as_ref);
                h.live(z, latent_only.get(i).copied().unwrap_or(false), adjust)
                    .map_err(|e| DecodeError::Compute(format!("head {}: {e}", h.cfg.name)))
            })
            .collect()
    }

    /// Checks betas `(batch, n_voxels)` (size, finiteness) and puts them on the device.
    pub fn input(&self, betas: &[f32], batch: usize) -> Result<Tensor, DecodeError> {
        let n = self.cfg.n_voxels;
        if betas.len() != batch * n {
            return Err(DecodeError::Input(format!(
                "{} betas for {batch} trials of {n} voxels",
                betas.len()
            )));
        }
        if let Some(i) = betas.iter().position(|b| !b.is_finite()) {
            return Err(DecodeError::Input(format!("trial {}, voxel {}: beta is not finite", i / n, i % n)));
        }
        Tensor::from_slice(betas, (batch, n), &self.device).map_err(|e| DecodeError::Compute(e.to_string()))
    }

    /// Predictions of every head for betas `(batch, n_voxels)`, renormalised with the stored
    /// statistics, one `(batch, n_outputs)` array per head.
    pub fn predict(&self, betas: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, DecodeError> {
        let xs = self.input(betas, batch)?;
        let z = self.normalise(&xs).map_err(|e| DecodeError::Compute(e.to_string()))?;
        self.predict_normalised(&z, &[])
    }
}

/// Writes float32 tensors `(name, shape, values)` as a safetensors file (model and gallery
/// files alike) with optional metadata, without copying the values on little-endian machines.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), String> {
    let bytes: Vec<_> = tensors.iter().map(|(_, _, v)| crate::volume::f32_le_view(v)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.to_string(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads float32 tensor `name` of a safetensors file as (shape, values), refusing other
/// dtypes; the model's and gallery's readers share it.
pub fn read_f32_tensor(st: &safetensors::SafeTensors, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let view = st.tensor(name).map_err(|e| format!("{name}: {e}"))?;
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(format!("{name}: dtype {:?}, expected F32", view.dtype()));
    }
    let values = crate::volume::f32_from_le_bytes(view.data());
    Ok((view.shape().to_vec(), values))
}

/// Picks the device: `auto` (CUDA 0 if built with CUDA and present, else CPU), `cpu`, or
/// `cuda:N`.
pub fn device(spec: &str) -> Result<Device, DecodeError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Device::cuda_if_available(0).map_err(|e| DecodeError::Device(e.to_string())),
        s => {
            let n: usize = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| DecodeError::Device(format!("{s:?}: use auto, cpu or cuda:N")))?;
            Device::new_cuda(n).map_err(|e| {
                DecodeError::Device(format!("cuda:{n}: {e} (was mirage built with --features cuda?)"))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_half_computed_gram_equals_the_full_product() {
        let mut rng = crate::rng::Rng::new(5, 1);
        let (n, r) = (1000, 37);
        let v: Vec<f32> = (0..n * r).map(|_| rng.normal() as f32).collect();
        let a = Tensor::from_vec(v, (n, r), &Device::Cpu).unwrap();
        let full = a.t().unwrap().contiguous().unwrap().matmul(&a).unwrap().to_vec2::<f32>().unwrap();
        let half = gram_lower_mirrored(&a).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..r {
            for j in 0..r {
                let tol = 1e-4 * full[i][i].abs().max(full[j][j].abs());
                assert!(
                    (full[i][j] - half[i][j]).abs() <= tol,
                    "({i}, {j}): {} vs {}",
                    full[i][j],
                    half[i][j]
                );
            }
        }
        // A strided view of the same values gives the same.
        let strided = a.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!strided.is_contiguous());
        assert_eq!(gram_lower_mirrored(&strided).unwrap().to_vec2::<f32>().unwrap(), half);
    }
}
