//! The domain-alignment head and the adapters that sit between the model's input z-scoring and
//! its heads.
//!
//! The head maps z-scored imagery betas `z` to `y + (y·V)·Uᵀ` with `y = gain ⊙ z + offset`:
//! a per-voxel affine followed by `I + U·Vᵀ` of rank `r`. It starts at identity (`gain = 1`,
//! `offset = 0`, `U = 0`). Saved as safetensors:
//!
//! ```text
//! align.gain [n], align.offset [n], align.u [n, r], align.v [n, r]      float32
//! metadata: format = "mirage-alignment/1", n_voxels, rank, model (fingerprint), fit (JSON)
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::AlignError;
use crate::decode::model::{read_f32_tensor, write_f32_safetensors, Decoder};
use crate::rng::Rng;

/// Format tag in every alignment file's metadata.
pub const FORMAT: &str = "mirage-alignment/1";

/// `gain ⊙ z + offset`, then `+ (y·V)·Uᵀ`: the head's map, for tensors and training variables
/// alike. `z`: `(batch, n)`; `gain`, `offset`: `(n)`; `u`, `v`: `(n, r)`.
pub fn apply(
    z: &Tensor,
    gain: &Tensor,
    offset: &Tensor,
    u: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    let y = z.broadcast_mul(gain)?.broadcast_add(offset)?;
    let low = y.matmul(v)?.matmul(&u.t()?)?;
    y + low
}

/// A fitted (or identity) domain-alignment head.
#[derive(Clone, Debug)]
pub struct AlignmentHead {
    /// Per-voxel gain `(n)`.
    pub gain: Tensor,
    /// Per-voxel offset `(n)`.
    pub offset: Tensor,
    /// Left factor of the low-rank correction `(n, r)`.
    pub u: Tensor,
    /// Right factor of the low-rank correction `(n, r)`.
    pub v: Tensor,
    /// Fingerprint of the model it was fitted for.
    pub model: String,
    /// How it was fitted (JSON; empty for identity).
    pub fit: serde_json::Value,
}

impl AlignmentHead {
    /// The identity head of rank `rank` for `decoder`; `V` is drawn small and random from
    /// `seed` so that `U` receives gradients.
    pub fn identity(decoder: &Decoder, rank: usize, seed: u64) -> Result<AlignmentHead, AlignError> {
        let n = decoder.cfg.n_voxels;
        let dev = &decoder.device;
        let mut rng = Rng::new(seed, 11);
        let scale = 1.0 / (n as f64).sqrt();
        let v: Vec<f32> = (0..n * rank).map(|_| (rng.normal() * scale) as f32).collect();
        let c = |e: candle_core::Error| AlignError::Compute(e.to_string());
        Ok(AlignmentHead {
            gain: Tensor::ones(n, DType::F32, dev).map_err(c)?,
            offset: Tensor::zeros(n, DType::F32, dev).map_err(c)?,
            u: Tensor::zeros((n, rank), DType::F32, dev).map_err(c)?,
            v: Tensor::from_vec(v, (n, rank), dev).map_err(c)?,
            model: decoder.fingerprint(),
            fit: serde_json::Value::Null,
        })
    }

    /// Rank of the low-rank correction.
    pub fn rank(&self) -> usize {
        self.u.dims().get(1).copied().unwrap_or(0)
    }

    /// Number of voxels it takes.
    pub fn n_voxels(&self) -> usize {
        self.gain.dims().first().copied().unwrap_or(0)
    }

    /// Maps z-scored betas `(batch, n)`.
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        apply(z, &self.gain, &self.offset, &self.u, &self.v)
    }

    /// Writes the head to `path` (safetensors with metadata).
    pub fn save(&self, path: &Path) -> Result<(), AlignError> {
        let c = |e: candle_core::Error| AlignError::Compute(e.to_string());
        let (n, r) = (self.n_voxels(), self.rank());
        let gain = self.gain.to_vec1::<f32>().map_err(c)?;
        let offset = self.offset.to_vec1::<f32>().map_err(c)?;
        let u = self.u.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(c)?;
        let v = self.v.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(c)?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("n_voxels".to_string(), n.to_string()),
            ("rank".to_string(), r.to_string()),
            ("model".to_string(), self.model.clone()),
            ("fit".to_string(), self.fit.to_string()),
        ]);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| AlignError::File(format!("{}: {e}", dir.display())))?;
        }
        write_f32_safetensors(
            path,
            &[
                ("align.gain", vec![n], &gain),
                ("align.offset", vec![n], &offset),
                ("align.u", vec![n, r], &u),
                ("align.v", vec![n, r], &v),
            ],
            Some(meta),
        )
        .map_err(AlignError::File)
    }

    /// Reads a head from `path` and checks that it was fitted for `decoder`.
    pub fn load(path: &Path, decoder: &Decoder) -> Result<AlignmentHead, AlignError> {
        let err = |m: String| AlignError::File(format!("{}: {m}", path.display()));
        let (bytes, meta) = super::read_fitted(path, decoder, FORMAT, "an alignment head")?;
        let n = decoder.cfg.n_voxels;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let read = |name: &str, shape: &[usize]| -> Result<Tensor, AlignError> {
            let (got, values) = read_f32_tensor(&st, name).map_err(err)?;
            if got != shape {
                return Err(err(format!("{name}: shape {got:?}, expected {shape:?}")));
            }
            if values.iter().any(|x| !x.is_finite()) {
                return Err(err(format!("{name} has non-finite values")));
            }
            Tensor::from_vec(values, shape, &decoder.device).map_err(|e| err(e.to_string()))
        };
        let r = st.tensor("align.u").map_err(|e| err(format!("align.u: {e}")))?.shape().get(1).copied();
        let r = r.ok_or_else(|| err("align.u is not a matrix".into()))?;
        let fit = meta.get("fit").and_then(|f| serde_json::from_str(f).ok()).unwrap_or_default();
        Ok(AlignmentHead {
            gain: read("align.gain", &[n])?,
            offset: read("align.offset", &[n])?,
            u: read("align.u", &[n, r])?,
            v: read("align.v", &[n, r])?,
            model: decoder.fingerprint(),
            fit,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;
    use candle_nn::VarBuilder;

    use super::*;
    use crate::decode::align::{Adapter, RunStats};
    use crate::decode::model::{HeadConfig, ModelConfig, FORMAT as MODEL_FORMAT};

    /// A two-head model of 6 voxels with random weights.
    fn decoder() -> Decoder {
        decoder_seeded(3)
    }

    /// The same model shape with the weights of `seed`.
    fn decoder_seeded(seed: u64) -> Decoder {
        let dev = Device::Cpu;
        let mut rng = Rng::new(seed, 1);
        let mut t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>(), shape, &dev).unwrap()
        };
        let mut tensors = HashMap::from([
            ("input.mean".to_string(), t(&[6])),
            ("input.std".to_string(), t(&[6]).abs().unwrap().affine(1.0, 0.5).unwrap()),
        ]);
        for (name, out) in [("a", 3), ("b", 4)] {
            tensors.insert(format!("heads.{name}.weight"), t(&[out, 6]));
            tensors.insert(format!("heads.{name}.bias"), t(&[out]));
        }
        let head = |name: &str, d| HeadConfig {
            name: name.into(),
            shape: vec![d],
            rank: None,
            renorm: false,
            input: Default::default(),
        };
        let cfg = ModelConfig {
            format: MODEL_FORMAT.into(),
            n_voxels: 6,
            zscore_input: true,
            heads: vec![head("a", 3), head("b", 4)],
            fusion: Default::default(),
            provenance: Default::default(),
        };
        Decoder::new(cfg, &VarBuilder::from_tensors(tensors, DType::F32, &dev), &dev).unwrap()
    }

    #[test]
    fn the_identity_head_changes_nothing_and_round_trips_through_its_file() {
        let dec = decoder();
        let betas: Vec<f32> = (0..18).map(|i| (i as f32 * 0.37).sin()).collect();
        let xs = dec.input(&betas, 3).unwrap();
        let plain = dec.predict_normalised(&Adapter::None.normalise(&dec, &xs, None).unwrap(), &[]).unwrap();
        let head = AlignmentHead::identity(&dec, 2, 9).unwrap();
        let aligned = Adapter::Head(head.clone());
        let through = dec.predict_normalised(&aligned.normalise(&dec, &xs, None).unwrap(), &[]).unwrap();
        assert_eq!(plain, through);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        head.save(&path).unwrap();
        let back = AlignmentHead::load(&path, &dec).unwrap();
        assert_eq!(back.v.to_vec2::<f32>().unwrap(), head.v.to_vec2::<f32>().unwrap());
        assert_eq!((back.rank(), back.n_voxels()), (2, 6));
        // Another model, or a file of another kind, is refused with the reason.
        let other = AlignmentHead::load(&path, &decoder_seeded(4)).unwrap_err().to_string();
        assert!(other.contains("calibrate again with this model"), "{other}");
        let foreign = dir.path().join("x.safetensors");
        crate::decode::model::write_f32_safetensors(&foreign, &[("x", vec![1], &[0.0])], None).unwrap();
        let foreign = AlignmentHead::load(&foreign, &dec).unwrap_err().to_string();
        assert!(foreign.contains("not an alignment head"), "{foreign}");
    }

    #[test]
    fn per_run_zscoring_uses_the_runs_own_statistics() {
        let dec = decoder();
        let betas: Vec<f32> = (0..24).map(|i| (i * i % 7) as f32).collect();
        let xs = dec.input(&betas, 4).unwrap();
        let z = Adapter::ZscoreRun.normalise(&dec, &xs, None).unwrap().to_vec2::<f32>().unwrap();
        for v in 0..6 {
            let col: Vec<f32> = z.iter().map(|r| r[v]).collect();
            let mean = col.iter().sum::<f32>() / 4.0;
            let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 3.0;
            assert!(mean.abs() < 1e-5 && ((var - 1.0).abs() < 1e-4 || var == 0.0), "voxel {v}: {mean} {var}");
        }
        let mut live = RunStats::default();
        for row in betas.chunks(6) {
            live.push("r1", row);
        }
        let (m, s) = live.get().unwrap();
        let batch =
            Adapter::ZscoreRun.normalise(&dec, &xs, Some((&m, &s))).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in batch.iter().flatten().zip(z.iter().flatten()) {
            assert!((a - b).abs() < 1e-4);
        }
        live.push("r2", &betas[..6]);
        assert!(live.get().is_none(), "a new run starts over");
    }
}
