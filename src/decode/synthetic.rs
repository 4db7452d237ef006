//! Decoders with random weights at MIRAGE's output shapes, for benches and device checks:
//! the cost of a decode depends on the shapes, not on the values.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::gallery::{Gallery, Item};
use super::model::{Decoder, FusionConfig, HeadConfig, ModelConfig, FORMAT};
use super::DecodeError;
use crate::glm::TrialBetas;

/// MIRAGE's heads: image embedding, text embedding (77 × 1280), low-level (VDVAE latents),
/// retrieval (257 × 1024).
pub const MIRAGE_HEADS: [(&str, &[usize]); 4] =
    [("image", &[768]), ("text", &[77, 1280]), ("lowlevel", &[91_168]), ("retrieval", &[257, 1024])];

/// A decoder over `voxels` inputs with uniform random weights for `heads` (each low-rank with
/// `rank`, or full), built on `device`, with renormalisation statistics that change nothing.
/// Returns it and its number of weights.
pub fn random_decoder(
    heads: &[(&str, &[usize])],
    rank: Option<usize>,
    voxels: usize,
    device: &Device,
) -> Result<(Decoder, usize), DecodeError> {
    let build = || -> candle_core::Result<(HashMap<String, Tensor>, Vec<HeadConfig>, usize)> {
        let scale = (1.0 / (voxels as f64).sqrt()) as f32;
        let rand = |shape: &[usize]| Tensor::rand(-scale, scale, shape, device);
        let mut t = HashMap::new();
        t.insert("input.mean".to_string(), Tensor::zeros(voxels, DType::F32, device)?);
        t.insert("input.std".to_string(), Tensor::ones(voxels, DType::F32, device)?);
        let (mut weights, mut cfgs) = (0, Vec::new());
        for &(name, shape) in heads {
            let out: usize = shape.iter().product();
            let p = format!("heads.{name}");
            let rank = rank.map(|r| r.min(out));
            match rank {
                Some(r) => {
                    t.insert(format!("{p}.down"), rand(&[r, voxels])?);
                    t.insert(format!("{p}.up"), rand(&[out, r])?);
                    weights += r * (voxels + out);
                }
                None => {
                    t.insert(format!("{p}.weight"), rand(&[out, voxels])?);
                    weights += out * voxels;
                }
            }
            t.insert(format!("{p}.bias"), Tensor::zeros(out, DType::F32, device)?);
            for s in ["pred_mean", "target_mean"] {
                t.insert(format!("{p}.{s}"), Tensor::zeros(out, DType::F32, device)?);
            }
            for s in ["pred_std", "target_std"] {
                t.insert(format!("{p}.{s}"), Tensor::ones(out, DType::F32, device)?);
            }
            cfgs.push(HeadConfig {
                name: name.to_string(),
                shape: shape.to_vec(),
                rank,
                renorm: true,
                input: Default::default(),
            });
        }
        Ok((t, cfgs, weights))
    };
    let (tensors, heads, weights) = build().map_err(|e| DecodeError::Device(e.to_string()))?;
    let cfg = ModelConfig {
        format: FORMAT.into(),
        n_voxels: voxels,
        zscore_input: true,
        heads,
        fusion: FusionConfig::default(),
        provenance: serde_json::json!({"synthetic": "random weights at MIRAGE's output shapes"}),
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok((Decoder::new(cfg, &vb, device)?, weights))
}

/// The same decoder on another device (weights copied), to compare devices' outputs.
pub fn to_device(decoder: &Decoder, device: &Device) -> Result<Decoder, DecodeError> {
    let err = |e: candle_core::Error| DecodeError::Device(e.to_string());
    let tensors =
        decoder.named_tensors().into_iter().map(|(k, t)| Ok((k, t.to_device(device).map_err(err)?)));
    let tensors = tensors.collect::<Result<HashMap<_, _>, DecodeError>>()?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Decoder::new(decoder.cfg.clone(), &vb, device)
}

/// A gallery whose items are `decoder`'s outputs for `betas` (`n` trials), so that a trial made
/// from an item's betas plus noise has a right answer.
pub fn gallery_of_outputs(decoder: &Decoder, betas: &[f32], n: usize) -> Result<Gallery, DecodeError> {
    let outputs = decoder.predict(betas, n)?;
    let embeddings =
        decoder.cfg.heads.iter().zip(outputs).map(|(h, o)| (h.name.clone(), (h.n_outputs(), o))).collect();
    let items = (0..n).map(|i| Item { id: i.to_string(), label: format!("item {i}") }).collect();
    Ok(Gallery { items, embeddings, thumbnails: None })
}

/// A trial that carries only betas, as the GLM would hand it to the decode stage.
pub fn trial(index: u64, betas: &[f32]) -> TrialBetas {
    TrialBetas {
        run: "synthetic".into(),
        trial: index,
        stim: None,
        condition: "seen".into(),
        onset: 0.0,
        duration: 0.0,
        n_volumes: 0,
        estimable: true,
        at_run_end: false,
        betas: betas.to_vec(),
        voxels: Vec::new(),
    }
}
