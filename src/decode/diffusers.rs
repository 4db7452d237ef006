//! diffusers' VAE `Decoder` (conv_in → mid block with attention → `UpDecoderBlock2D`s → group
//! norm, SiLU, conv_out) and `AutoencoderKL`'s decode path, under diffusers' own key names.
//!
//! One piece serves both of MindEye2's uses: its blurry branch's upsampler (`bupsampler`, a
//! `Decoder` from 64 channels at 7×7 to an SD latent 4×28×28) and the SD VAE that turns that
//! latent into a picture. Ours rather than candle-transformers': its `Decoder` is private and its
//! attention block meets candle issue 3744 at batch ≥ 2.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{conv2d, group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::DecodeError;

/// diffusers' epsilon in the decoder's group norms.
const EPS: f64 = 1e-6;

/// The shape of a diffusers `Decoder`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    /// Channels in (`conv_in`).
    pub in_channels: usize,
    /// Channels out (`conv_out`).
    pub out_channels: usize,
    /// Channels per level, lowest resolution last (diffusers' `block_out_channels`).
    pub block_out_channels: Vec<usize>,
    /// Resnets per up block, less one (diffusers' `layers_per_block`).
    pub layers_per_block: usize,
    /// Groups of every group norm (32 in diffusers and MindEye2).
    pub norm_num_groups: usize,
}

impl DecoderConfig {
    /// Why this shape cannot be built (`None`: it can).
    pub fn check(&self) -> Option<String> {
        let g = self.norm_num_groups;
        if self.block_out_channels.is_empty() || self.in_channels == 0 || self.out_channels == 0 || g == 0 {
            return Some(format!("decoder {self:?}: a size is zero"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| **c == 0 || **c % g != 0) {
            return Some(format!("decoder: {c} channels are not a multiple of {g} groups"));
        }
        None
    }

    /// Output side per input side: two per up block but the last.
    pub fn upscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn conv(in_c: usize, out_c: usize, k: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(in_c, out_c, k, Conv2dConfig { padding: k / 2, ..Default::default() }, vb)
}

/// `ResnetBlock2D` without time embedding: `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`,
/// `x` through a 1×1 `conv_shortcut` when the channels change.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn load(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Resnet> {
        Ok(Resnet {
            norm1: group_norm(groups, in_c, EPS, vb.pp("norm1"))?,
            conv1: conv(in_c, out_c, 3, vb.pp("conv1"))?,
            norm2: group_norm(groups, out_c, EPS, vb.pp("norm2"))?,
            conv2: conv(out_c, out_c, 3, vb.pp("conv2"))?,
            shortcut: (in_c != out_c).then(|| conv(in_c, out_c, 1, vb.pp("conv_shortcut"))).transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head self-attention over pixels, residual; keys `to_q`, `to_k`,
/// `to_v`, `to_out.0` (or the older `query`, `key`, `value`, `proj_attn`).
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn load(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Attention> {
        let names = if vb.contains_tensor("query.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Attention {
            norm: group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            q: linear(c, c, vb.pp(names[0]))?,
            k: linear(c, c, vb.pp(names[1]))?,
            v: linear(c, c, vb.pp(names[2]))?,
            out: linear(c, c, vb.pp(names[3]))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [b, h·w, c], contiguous: candle issue 3744 breaks `Linear` on a transposed view.
        let seq = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let (q, k, v) = (self.q.forward(&seq)?, self.k.forward(&seq)?, self.v.forward(&seq)?);
        let scores = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? / (c as f64).sqrt())?;
        let attended = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let out = self.out.forward(&attended)?.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        out + x
    }
}

/// `UpDecoderBlock2D`: resnets, then (but in the last block) nearest 2× upsampling and a conv.
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(x),
        }
    }
}

/// A loaded diffusers `Decoder`: `[n, in, s, s]` → `[n, out, s·upscale, s·upscale]`.
pub struct Decoder {
    conv_in: Conv2d,
    mid: (Resnet, Attention, Resnet),
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Builds the decoder `cfg` describes from `vb` (diffusers' key names).
    pub fn load(cfg: &DecoderConfig, vb: VarBuilder) -> candle_core::Result<Decoder> {
        if let Some(why) = cfg.check() {
            candle_core::bail!("{why}");
        }
        let g = cfg.norm_num_groups;
        let top = *cfg.block_out_channels.last().unwrap_or(&0);
        let mid = vb.pp("mid_block");
        let mid = (
            Resnet::load(top, top, g, mid.pp("resnets.0"))?,
            Attention::load(top, g, mid.pp("attentions.0"))?,
            Resnet::load(top, top, g, mid.pp("resnets.1"))?,
        );
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev = top;
        for (i, &out_c) in reversed.iter().enumerate() {
            let b = vb.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| Resnet::load(if j == 0 { prev } else { out_c }, out_c, g, b.pp("resnets").pp(j)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let last = i + 1 == reversed.len();
            let upsample = (!last).then(|| conv(out_c, out_c, 3, b.pp("upsamplers.0.conv"))).transpose()?;
            up.push(UpBlock { resnets, upsample });
            prev = out_c;
        }
        Ok(Decoder {
            conv_in: conv(cfg.in_channels, top, 3, vb.pp("conv_in"))?,
            mid,
            up,
            norm_out: group_norm(g, cfg.block_out_channels[0], EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(cfg.block_out_channels[0], cfg.out_channels, 3, vb.pp("conv_out"))?,
        })
    }

    /// The decoder on `x` `[n, in, s, s]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv_in.forward(&x.contiguous()?)?;
        let x = self.mid.0.forward(&x)?;
        let x = self.mid.1.forward(&x)?;
        let mut x = self.mid.2.forward(&x)?;
        for block in &self.up {
            x = block.forward(&x)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

/// Weights file of a diffusers model folder.
pub const VAE_WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// The decode path of a diffusers `AutoencoderKL`, read from its `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// The decoder (in: the latent channels; out: 3).
    pub decoder: DecoderConfig,
    /// What the latents were multiplied by (0.18215 for Stable Diffusion 1 and 2).
    pub scaling_factor: f64,
}

impl VaeConfig {
    /// Stable Diffusion's VAE (`stabilityai/sd-vae-ft-mse`), the one MindEye2 decodes with.
    pub fn stable_diffusion() -> VaeConfig {
        VaeConfig {
            decoder: DecoderConfig {
                in_channels: 4,
                out_channels: 3,
                block_out_channels: vec![128, 256, 512, 512],
                layers_per_block: 2,
                norm_num_groups: 32,
            },
            scaling_factor: 0.18215,
        }
    }

    /// Reads a diffusers `config.json` (only `UpDecoderBlock2D` up blocks and SiLU).
    pub fn parse(text: &str) -> Result<VaeConfig, String> {
        let c: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let size = |key: &str, default: usize| -> Result<usize, String> {
            match c.get(key) {
                Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| format!("{key} is not a count")),
                None => Ok(default),
            }
        };
        if let Some(kinds) = c.get("up_block_types").and_then(|u| u.as_array()) {
            if let Some(k) = kinds.iter().find(|k| k.as_str() != Some("UpDecoderBlock2D")) {
                return Err(format!("up block {k}: only UpDecoderBlock2D is supported"));
            }
        }
        if c.get("act_fn").is_some_and(|a| a.as_str() != Some("silu")) {
            return Err("act_fn: only silu is supported".into());
        }
        let block_out_channels = c
            .get("block_out_channels")
            .and_then(|b| b.as_array())
            .and_then(|b| b.iter().map(|v| v.as_u64().map(|v| v as usize)).collect::<Option<Vec<_>>>())
            .ok_or("block_out_channels is not a list of counts")?;
        let decoder = DecoderConfig {
            in_channels: size("latent_channels", 4)?,
            out_channels: size("out_channels", 3)?,
            block_out_channels,
            layers_per_block: size("layers_per_block", 1)?,
            norm_num_groups: size("norm_num_groups", 32)?,
        };
        if let Some(why) = decoder.check() {
            return Err(why);
        }
        let scaling_factor = c.get("scaling_factor").and_then(|s| s.as_f64()).unwrap_or(0.18215);
        if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
            return Err(format!("scaling_factor {scaling_factor} is not positive"));
        }
        Ok(VaeConfig { decoder, scaling_factor })
    }
}

/// `AutoencoderKL`'s decode path: `latent / scaling_factor` → `post_quant_conv` (when the
/// weights have one) → [`Decoder`].
pub struct VaeDecoder {
    /// Its shape.
    pub cfg: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
}

impl VaeDecoder {
    /// Builds the decode path from `vb` (an `AutoencoderKL`'s key names).
    pub fn load(cfg: VaeConfig, vb: VarBuilder) -> candle_core::Result<VaeDecoder> {
        let c = cfg.decoder.in_channels;
        let post_quant_conv = vb
            .contains_tensor("post_quant_conv.weight")
            .then(|| conv(c, c, 1, vb.pp("post_quant_conv")))
            .transpose()?;
        let decoder = Decoder::load(&cfg.decoder, vb.pp("decoder"))?;
        Ok(VaeDecoder { cfg, post_quant_conv, decoder })
    }

    /// Loads a diffusers `AutoencoderKL` folder (`config.json` and [`VAE_WEIGHTS_FILE`]) onto
    /// `device` in `dtype`.
    pub fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<VaeDecoder, DecodeError> {
        let err = |e: String| DecodeError::Model(format!("{}: {e}", dir.display()));
        let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| err(e.to_string()))?;
        let cfg = VaeConfig::parse(&text).map_err(err)?;
        let path = dir.join(VAE_WEIGHTS_FILE);
        if !path.exists() {
            return Err(err(format!("{VAE_WEIGHTS_FILE} is missing")));
        }
        // SAFETY: mapped read-only; a model folder is written once by the export tool.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
            .map_err(|e| err(e.to_string()))?;
        VaeDecoder::load(cfg, vb).map_err(|e| err(e.to_string()))
    }

    /// The picture `[n, 3, H, W]` (about −1 to 1, unclamped) of scaled latents `[n, C, h, w]`.
    pub fn decode(&self, latent: &Tensor) -> candle_core::Result<Tensor> {
        let z = (latent.contiguous()? / self.cfg.scaling_factor)?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoder_config_names_what_cannot_be_built() {
        let cfg = DecoderConfig {
            in_channels: 64,
            out_channels: 4,
            block_out_channels: vec![32, 64, 128],
            layers_per_block: 1,
            norm_num_groups: 32,
        };
        assert_eq!((cfg.check(), cfg.upscale()), (None, 4));
        let odd = DecoderConfig { block_out_channels: vec![32, 48], ..cfg.clone() };
        assert!(odd.check().is_some_and(|w| w.contains("48 channels")));
        let empty = DecoderConfig { block_out_channels: vec![], ..cfg };
        assert!(empty.check().is_some());
    }

    /// Random weights of a `c`-channel attention block under diffusers' current names.
    fn attention_weights(c: usize, dev: &Device) -> std::collections::HashMap<String, Tensor> {
        ["group_norm", "to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .flat_map(|n| {
                let w = if *n == "group_norm" { vec![c] } else { vec![c, c] };
                [
                    (format!("{n}.weight"), Tensor::randn(0f32, 0.3, w, dev).unwrap()),
                    (format!("{n}.bias"), Tensor::randn(0f32, 0.3, c, dev).unwrap()),
                ]
            })
            .collect()
    }

    #[test]
    fn a_diffusers_config_reads_with_its_defaults_and_refuses_other_blocks() {
        let sd = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
        assert_eq!(VaeConfig::parse(sd), Ok(VaeConfig::stable_diffusion()));
        assert_eq!(VaeConfig::stable_diffusion().decoder.upscale(), 8);
        let other = sd.replace("\"UpDecoderBlock2D\"]", "\"AttnUpDecoderBlock2D\"]");
        assert!(VaeConfig::parse(&other).is_err_and(|e| e.contains("AttnUpDecoderBlock2D")));
        assert!(VaeConfig::parse(&sd.replace("silu", "gelu")).is_err());
    }

    #[test]
    fn the_older_attention_names_load_the_same_block() {
        // diffusers before 0.14 named the attention `query`, `key`, `value`, `proj_attn`.
        let dev = Device::Cpu;
        let c = 32;
        let new = attention_weights(c, &dev);
        let rename = |k: &str| {
            [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]
                .iter()
                .fold(k.to_string(), |k, (a, b)| k.replace(a, b))
        };
        let old = new.iter().map(|(k, v)| (rename(k), v.clone())).collect();
        let x = Tensor::randn(0f32, 1f32, (1, c, 3, 3), &dev).unwrap();
        let a = Attention::load(c, 8, VarBuilder::from_tensors(new, DType::F32, &dev)).unwrap();
        let b = Attention::load(c, 8, VarBuilder::from_tensors(old, DType::F32, &dev)).unwrap();
        let diff =
            (a.forward(&x).unwrap() - b.forward(&x).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn attention_over_a_batch_equals_each_picture_alone() {
        // The softmax over pixels and the transposed sequences at batch ≥ 2 (candle issue 3744).
        let dev = Device::Cpu;
        let c = 32;
        let map = attention_weights(c, &dev);
        let att = Attention::load(c, 8, VarBuilder::from_tensors(map, DType::F32, &dev)).unwrap();
        let x = Tensor::randn(0f32, 1f32, (3, c, 5, 4), &dev).unwrap();
        let batch = att.forward(&x).unwrap();
        for i in 0..3 {
            let one = att.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
            let diff = (batch.narrow(0, i, 1).unwrap() - one).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "picture {i}");
        }
    }
}
