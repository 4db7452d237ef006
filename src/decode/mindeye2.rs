//! A MindEye2 network (Scotti et al. 2024) as its checkpoints hold it: the per-subject ridge
//! `ridge.linears.K` (`Linear(V, h)`) into the MLP-mixer backbone (`backbone.mixer_blocks1/2`,
//! `backbone.backbone_linear`) and the CLIP projector (`backbone.clip_proj`), so that a lab's
//! trained model decodes betas into `backbone` and `clip_voxels` tokens `[T, D]`.
//!
//! A model folder: `config.json` (`{"architecture": "mindeye2", …}`, see [`Config`]) and
//! `model.safetensors` under MindEye2's own key names (`tools/export_mindeye2.py` writes both
//! from a `last.pth`). With the blurry branch (`blin1` → `bnorm` → `bupsampler`) the network
//! also gives an SD-VAE latent per trial, and with a VAE folder (`vae/`) the picture of it.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, LayerNormConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::diffusers::{Decoder as Upsampler, DecoderConfig, VaeDecoder};
use super::DecodeError;

/// The architecture tag in `config.json`.
pub const ARCHITECTURE: &str = "mindeye2";

/// `config.json` of a MindEye2 model folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Always [`ARCHITECTURE`].
    pub architecture: String,
    /// Betas per trial (`V`).
    pub n_voxels: usize,
    /// The ridge's and backbone's width (`h`: 4096 or 1024).
    pub hidden: usize,
    /// Mixer sequence length (1 in the published models).
    pub seq_len: usize,
    /// Mixer blocks.
    pub n_blocks: usize,
    /// CLIP tokens (`T`, 256 for OpenCLIP ViT-bigG/14).
    pub clip_tokens: usize,
    /// CLIP token width (`D`, 1664).
    pub clip_dim: usize,
    /// Which of the checkpoint's ridges (`ridge.linears.K`) reads this subject's betas.
    pub subject: usize,
    /// The blurry branch, when the checkpoint has one.
    #[serde(default)]
    pub blurry: Option<BlurryConfig>,
    /// A diffusers `AutoencoderKL` folder, relative to the model folder, that turns the
    /// blurry latent into a picture.
    #[serde(default)]
    pub vae: Option<String>,
    /// Where the model came from.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

impl Config {
    /// Reads `config.json` of a folder when it names this architecture (`None` otherwise).
    pub fn load_if_mindeye2(dir: &Path) -> Result<Option<Config>, DecodeError> {
        let path = dir.join(super::model::CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DecodeError::Model(format!("{}: {e}", path.display())))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DecodeError::Model(format!("{}: {e}", path.display())))?;
        if value.get("architecture").and_then(|a| a.as_str()) != Some(ARCHITECTURE) {
            return Ok(None);
        }
        let cfg: Config = serde_json::from_value(value)
            .map_err(|e| DecodeError::Model(format!("{}: {e}", path.display())))?;
        let sizes = [cfg.n_voxels, cfg.hidden, cfg.seq_len, cfg.n_blocks, cfg.clip_tokens, cfg.clip_dim];
        if sizes.contains(&0) {
            return Err(DecodeError::Model(format!("{}: a size is zero: {sizes:?}", path.display())));
        }
        if let Some(why) = cfg.blurry.as_ref().and_then(BlurryConfig::check) {
            return Err(DecodeError::Model(format!("{}: blurry: {why}", path.display())));
        }
        if cfg.vae.is_some() && cfg.blurry.is_none() {
            return Err(DecodeError::Model(format!("{}: a vae without the blurry branch", path.display())));
        }
        if cfg.seq_len != 1 {
            return Err(DecodeError::Model(format!(
                "{}: seq_len {}: this model reads {} TRs' betas per trial; mirage gives one (seq_len 1)",
                path.display(),
                cfg.seq_len,
                cfg.seq_len
            )));
        }
        Ok(Some(cfg))
    }
}

/// MindEye2's blurry branch: `blin1` (`Linear(h·s, C·side²)`) reshaped `[C, side, side]`,
/// `bnorm` (`GroupNorm(1, C)`) and `bupsampler`, a diffusers decoder to the SD latent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlurryConfig {
    /// Channels of `blin1`'s map (`C`, 64).
    pub channels: usize,
    /// Side of `blin1`'s map (7).
    pub side: usize,
    /// `bupsampler`'s shape (in `C`, out 4, `[32, 64, 128]`, 1 layer per block).
    pub upsampler: DecoderConfig,
}

impl BlurryConfig {
    fn check(&self) -> Option<String> {
        if self.channels == 0 || self.side == 0 {
            return Some("channels and side must be positive".into());
        }
        if self.upsampler.in_channels != self.channels {
            return Some(format!(
                "bupsampler reads {} channels, blin1 gives {}",
                self.upsampler.in_channels, self.channels
            ));
        }
        self.upsampler.check()
    }

    /// Side of the latent it gives.
    pub fn latent_side(&self) -> usize {
        self.side * self.upsampler.upscale()
    }
}

/// The loaded blurry branch.
struct Blurry {
    cfg: BlurryConfig,
    blin1: Linear,
    bnorm: candle_nn::GroupNorm,
    upsampler: Upsampler,
}

impl Blurry {
    fn load(cfg: BlurryConfig, width: usize, vb: VarBuilder) -> candle_core::Result<Blurry> {
        let (c, s) = (cfg.channels, cfg.side);
        Ok(Blurry {
            blin1: linear(width, c * s * s, vb.pp("blin1"))?,
            bnorm: candle_nn::group_norm(1, c, 1e-5, vb.pp("bnorm"))?,
            upsampler: Upsampler::load(&cfg.upsampler, vb.pp("bupsampler"))?,
            cfg,
        })
    }

    /// The SD latent `[n, 4, 28, 28]` of the backbone's flattened mixer output `[n, h·s]`.
    fn forward(&self, flat: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _) = flat.dims2()?;
        let (c, s) = (self.cfg.channels, self.cfg.side);
        let map = dense(&self.blin1, flat)?.reshape((n, c, s, s))?;
        self.upsampler.forward(&self.bnorm.forward(&map)?)
    }
}

/// MindEye2's MLP: `Linear → GELU (erf) → Dropout → Linear` (dropout is the identity here).
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(width: usize, vb: VarBuilder) -> candle_core::Result<Mlp> {
        Ok(Mlp { fc1: linear(width, width, vb.pp("0"))?, fc2: linear(width, width, vb.pp("3"))? })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        dense(&self.fc2, &dense(&self.fc1, x)?.gelu_erf()?)
    }
}

/// `lin` on `x` made contiguous first: candle's CPU matmul of a transposed view at batch ≥ 2
/// against a broadcast right operand (what `Linear` does) is wrong (candle issue 3744).
fn dense(lin: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    lin.forward(&x.contiguous()?)
}

/// A mixer block: `LayerNorm(width)` then an [`Mlp`] (keys `N.0` and `N.1.*`).
struct MixerBlock {
    norm: LayerNorm,
    mlp: Mlp,
}

impl MixerBlock {
    fn load(width: usize, vb: VarBuilder) -> candle_core::Result<MixerBlock> {
        Ok(MixerBlock {
            norm: layer_norm(width, LayerNormConfig::default(), vb.pp("0"))?,
            mlp: Mlp::load(width, vb.pp("1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.mlp.forward(&self.norm.forward(x)?)
    }

    /// The block over `x`'s last two dimensions swapped (the mixer's channel mixing).
    fn forward_transposed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(&x.transpose(1, 2)?)
    }
}

/// `clip_proj`: three times `LayerNorm → GELU → Linear` (keys 0, 2, 3, 5, 6, 8).
struct Projector {
    layers: Vec<(LayerNorm, Linear)>,
}

impl Projector {
    fn load(width: usize, vb: VarBuilder) -> candle_core::Result<Projector> {
        let layers = [(0, 2), (3, 5), (6, 8)]
            .into_iter()
            .map(|(n, l)| {
                Ok((
                    layer_norm(width, LayerNormConfig::default(), vb.pp(n))?,
                    linear(width, width, vb.pp(l))?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Projector { layers })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.layers.iter().try_fold(x.clone(), |x, (norm, lin)| dense(lin, &norm.forward(&x)?.gelu_erf()?))
    }
}

/// What a forward pass gives per trial.
pub struct Outputs {
    /// `backbone_linear`'s output as tokens `[n, T, D]` (the diffusion prior's input).
    pub backbone: Tensor,
    /// `clip_proj` of it `[n, T, D]`: retrieval against CLIP image tokens.
    pub clip_voxels: Tensor,
    /// The blurry branch's SD-VAE latent `[n, 4, 28, 28]` (scaled), when the model has one.
    pub blurry_latent: Option<Tensor>,
}

/// A loaded MindEye2 network.
pub struct MindEye2 {
    /// Its configuration.
    pub cfg: Config,
    ridge: Linear,
    blocks1: Vec<MixerBlock>,
    blocks2: Vec<MixerBlock>,
    backbone_linear: Linear,
    clip_proj: Projector,
    blurry: Option<Blurry>,
    vae: Option<VaeDecoder>,
    device: Device,
    dtype: DType,
}

impl MindEye2 {
    /// Builds the network `cfg` describes from `vb` (MindEye2's key names).
    pub fn load(cfg: Config, vb: VarBuilder) -> Result<MindEye2, DecodeError> {
        let err = |e: candle_core::Error| DecodeError::Model(format!("mindeye2: {e}"));
        let (h, s) = (cfg.hidden, cfg.seq_len);
        let ridge = linear(cfg.n_voxels, h, vb.pp(format!("ridge.linears.{}", cfg.subject))).map_err(err)?;
        let b = vb.pp("backbone");
        let blocks = |prefix: &str, width: usize| {
            (0..cfg.n_blocks)
                .map(|i| MixerBlock::load(width, b.pp(prefix).pp(i)))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(err)
        };
        let (blocks1, blocks2) = (blocks("mixer_blocks1", h)?, blocks("mixer_blocks2", s)?);
        let backbone_linear =
            linear(h * s, cfg.clip_tokens * cfg.clip_dim, b.pp("backbone_linear")).map_err(err)?;
        let clip_proj = Projector::load(cfg.clip_dim, b.pp("clip_proj")).map_err(err)?;
        let blurry =
            cfg.blurry.clone().map(|c| Blurry::load(c, h * s, b.clone())).transpose().map_err(err)?;
        let (device, dtype) = (vb.device().clone(), vb.dtype());
        Ok(MindEye2 {
            cfg,
            ridge,
            blocks1,
            blocks2,
            backbone_linear,
            clip_proj,
            blurry,
            vae: None,
            device,
            dtype,
        })
    }

    /// Loads a model folder onto `device` in `dtype` (the weights memory-mapped).
    pub fn load_dir(dir: &Path, cfg: Config, device: &Device, dtype: DType) -> Result<MindEye2, DecodeError> {
        let path = dir.join(super::model::WEIGHTS_FILE);
        if !path.exists() {
            return Err(DecodeError::Model(format!("{} is missing", path.display())));
        }
        // SAFETY: the weights file is mapped read-only and must not change while loaded; model
        // folders are written once by the export tool.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
            .map_err(|e| DecodeError::Model(format!("{}: {e}", path.display())))?;
        let vae = match &cfg.vae {
            Some(sub) => Some(VaeDecoder::load_dir(&dir.join(sub), device, dtype)?),
            None => None,
        };
        let net = MindEye2::load(cfg, vb)?;
        match vae {
            Some(vae) => net.with_vae(vae),
            None => Ok(net),
        }
    }

    /// The network with a VAE to make pictures of its blurry latents.
    pub fn with_vae(mut self, vae: VaeDecoder) -> Result<MindEye2, DecodeError> {
        let Some(b) = &self.cfg.blurry else {
            return Err(DecodeError::Model("a vae without the blurry branch".into()));
        };
        if vae.cfg.decoder.in_channels != b.upsampler.out_channels {
            return Err(DecodeError::Model(format!(
                "the vae reads {} latent channels, bupsampler gives {}",
                vae.cfg.decoder.in_channels, b.upsampler.out_channels
            )));
        }
        self.vae = Some(vae);
        Ok(self)
    }

    /// Whether it runs on a CUDA device.
    pub fn is_cuda(&self) -> bool {
        self.device.is_cuda()
    }

    /// Whether [`MindEye2::picture`] can make pictures (a blurry branch and a VAE).
    pub fn has_picture(&self) -> bool {
        self.blurry.is_some() && self.vae.is_some()
    }

    /// The VAE's picture `[n, 3, H, W]` (about −1 to 1, unclamped) of blurry latents.
    pub fn picture(&self, blurry_latent: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.vae.as_ref().map(|v| v.decode(blurry_latent)).transpose()
    }

    /// The network for betas `(n, V)`, each trial a sequence of one (`seq_len` 1, as the
    /// published models read them).
    pub fn forward(&self, betas: &Tensor) -> candle_core::Result<Outputs> {
        let (n, _) = betas.dims2()?;
        // [n, 1, h]: the trial's betas through the subject's ridge.
        let x = dense(&self.ridge, betas)?.unsqueeze(1)?;
        let (mut x, mut residual1) = (x.clone(), x.clone());
        let mut residual2 = x.transpose(1, 2)?.contiguous()?;
        for (block1, block2) in self.blocks1.iter().zip(&self.blocks2) {
            x = (block1.forward(&x)? + &residual1)?;
            residual1 = x.clone();
            x = (block2.forward_transposed(&x)? + &residual2)?;
            residual2 = x.clone();
            x = x.transpose(1, 2)?.contiguous()?;
        }
        let flat = x.reshape((n, ()))?;
        let backbone =
            dense(&self.backbone_linear, &flat)?.reshape((n, self.cfg.clip_tokens, self.cfg.clip_dim))?;
        let clip_voxels = self.clip_proj.forward(&backbone)?;
        let blurry_latent = self.blurry.as_ref().map(|b| b.forward(&flat)).transpose()?;
        Ok(Outputs { backbone, clip_voxels, blurry_latent })
    }

    /// The PNG of one trial's blurry latent (values as [`Outputs::blurry_latent`] gives them).
    pub fn picture_png(&self, latent: &[f32]) -> Result<Vec<u8>, DecodeError> {
        let (Some(b), Some(_)) = (&self.cfg.blurry, &self.vae) else {
            return Err(DecodeError::Model("this model makes no pictures (no blurry branch or vae)".into()));
        };
        let (c, s) = (b.upsampler.out_channels, b.latent_side());
        if latent.len() != c * s * s {
            return Err(DecodeError::Input(format!("{} latent values, not {c} x {s} x {s}", latent.len())));
        }
        let compute = |e: candle_core::Error| DecodeError::Compute(format!("picture: {e}"));
        let z = Tensor::from_slice(latent, (1, c, s, s), &self.device)
            .and_then(|z| z.to_dtype(self.dtype))
            .map_err(compute)?;
        let picture =
            self.picture(&z).map_err(compute)?.ok_or_else(|| DecodeError::Model("no vae".into()))?;
        super::image::png_of_signed(&picture.get(0).map_err(compute)?)
    }

    /// Betas `(n, V)` from row-major values, checked (size, finiteness), on the device in the
    /// weights' dtype.
    pub fn input(&self, betas: &[f32], n: usize) -> Result<Tensor, DecodeError> {
        let v = self.cfg.n_voxels;
        if betas.len() != n * v {
            return Err(DecodeError::Input(format!("{} betas for {n} trials of {v} voxels", betas.len())));
        }
        if let Some(i) = betas.iter().position(|b| !b.is_finite()) {
            return Err(DecodeError::Input(format!("trial {}, voxel {}: beta is not finite", i / v, i % v)));
        }
        Tensor::from_slice(betas, (n, v), &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| DecodeError::Compute(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A mixer block of `width` with random weights (LayerNorm perturbed from the identity).
    fn block(width: usize, dev: &Device) -> MixerBlock {
        let t = |shape: &[usize], scale: f64, shift: f64| {
            (Tensor::randn(0f32, 1f32, shape, dev).unwrap() * scale).unwrap().affine(1.0, shift).unwrap()
        };
        let map: HashMap<String, Tensor> = [
            ("0.weight", t(&[width], 0.3, 1.0)),
            ("0.bias", t(&[width], 0.2, 0.0)),
            ("1.0.weight", t(&[width, width], 0.5, 0.0)),
            ("1.0.bias", t(&[width], 0.5, 0.0)),
            ("1.3.weight", t(&[width, width], 0.5, 0.0)),
            ("1.3.bias", t(&[width], 0.5, 0.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        MixerBlock::load(width, VarBuilder::from_tensors(map, DType::F32, dev)).unwrap()
    }

    #[test]
    fn a_dense_layer_on_a_transposed_view_at_batch_four_is_right() {
        // Candle issue 3744's path: `Linear` on a transposed view at batch ≥ 2 is wrong on the
        // CPU (off by whole units with candle 0.11); `dense` must give each trial's product.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (4, 3, 5), &dev).unwrap();
        let lin = Linear::new(Tensor::randn(0f32, 1f32, (6, 3), &dev).unwrap(), None);
        let view = x.transpose(1, 2).unwrap();
        let got = dense(&lin, &view).unwrap();
        for i in 0..4 {
            let row = view.narrow(0, i, 1).unwrap().squeeze(0).unwrap().contiguous().unwrap();
            let want = row.matmul(&lin.weight().t().unwrap()).unwrap();
            let diff = (got.narrow(0, i, 1).unwrap().squeeze(0).unwrap() - want).unwrap();
            assert!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5, "trial {i}");
        }
    }

    #[test]
    fn channel_mixing_over_a_batch_equals_each_trial_alone() {
        // The path candle issue 3744 breaks: a transposed [batch, h, s] view into Linear at
        // batch ≥ 2. Each trial alone is the reference.
        let dev = Device::Cpu;
        let b = block(3, &dev);
        let x = Tensor::randn(0f32, 1f32, (4, 3, 5), &dev).unwrap();
        let batch = b.forward_transposed(&x).unwrap();
        for i in 0..4 {
            let one = b.forward_transposed(&x.narrow(0, i, 1).unwrap()).unwrap();
            let diff = (batch.narrow(0, i, 1).unwrap() - one).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "trial {i}");
        }
    }
}
