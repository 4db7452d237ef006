//! The calibrated alignment: what calibration fits and the decode stage applies around the
//! model. An input normalisation composed with the live run's own statistics, the removal of a
//! few nuisance voxel modes, and per head a correction of its output (of its latent, for a
//! low-rank head) — each kept only where cross-validation over stimuli showed a reliable gain
//! (see [`crate::calibrate::transfer`]).
//!
//! ```text
//! run.mean [V], run.std [V]      the calibration run's statistics (used until a run has 3 trials)
//! modes [k, V]                   unit voxel modes removed after normalisation (k ≥ 1 only)
//! heads.NAME.left [n, d], heads.NAME.shift [n], heads.NAME.right [n, d]   a head's correction
//! metadata: format = "mirage-alignment/2", model (fingerprint), input, condition (of the
//!           calibration trials, when known), heads (JSON: name → "latent" | "output"), report
//!           (JSON: what was kept and why)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::AlignError;
use crate::decode::model::{read_f32_tensor, write_f32_safetensors, Decoder, HeadAdjust};
use crate::event::DEFAULT_CONDITION;

/// Format tag in every calibrated alignment's metadata.
pub const FORMAT: &str = "mirage-alignment/2";

/// How betas are normalised before the heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputNorm {
    /// The model's training mean and standard deviation (zero-shot).
    Model,
    /// The run's own mean, the model's standard deviation.
    CentreRun,
    /// The run's own mean and standard deviation (MIRAGE's per-run z-scoring).
    ZscoreRun,
}

impl InputNorm {
    /// Its name in files and messages.
    pub fn name(self) -> &'static str {
        match self {
            InputNorm::Model => "model",
            InputNorm::CentreRun => "centre-run",
            InputNorm::ZscoreRun => "zscore-run",
        }
    }

    /// Reads a name written by [`InputNorm::name`].
    pub fn parse(s: &str) -> Option<InputNorm> {
        [InputNorm::Model, InputNorm::CentreRun, InputNorm::ZscoreRun].into_iter().find(|n| n.name() == s)
    }

    /// Whether it takes the run's mean.
    pub fn uses_run(self) -> bool {
        self != InputNorm::Model
    }

    /// Normalises betas `xs` `(batch, V)` with the run's `(mean, std)`.
    pub fn apply(
        self,
        decoder: &Decoder,
        xs: &Tensor,
        run: (&Tensor, &Tensor),
    ) -> candle_core::Result<Tensor> {
        match self {
            InputNorm::Model => decoder.normalise(xs),
            InputNorm::CentreRun => xs.broadcast_sub(run.0)?.broadcast_div(decoder.input_stats().1),
            InputNorm::ZscoreRun => xs.broadcast_sub(run.0)?.broadcast_div(run.1),
        }
    }
}

/// A fitted alignment for one model.
#[derive(Clone, Debug)]
pub struct Alignment {
    /// The input normalisation.
    pub input: InputNorm,
    run_mean: Tensor,
    run_std: Tensor,
    /// Unit voxel modes `[k, V]` removed after normalisation.
    pub modes: Option<Tensor>,
    /// Per head of the model (in its order): the correction, if one was kept.
    pub adjusts: Vec<Option<HeadAdjust>>,
    /// The condition of the trials it was fitted on (e.g. `imagery`): trials of another named
    /// condition are decoded without it.
    pub condition: Option<String>,
    /// Fingerprint of the model it was fitted for.
    pub model: String,
    /// How it was fitted (the fit report).
    pub report: serde_json::Value,
}

impl Alignment {
    /// An alignment of `decoder` from its parts; `run` is the calibration run's `(mean, std)`.
    pub fn new(
        decoder: &Decoder,
        input: InputNorm,
        run: (Vec<f32>, Vec<f32>),
        modes: Option<Tensor>,
        adjusts: Vec<Option<HeadAdjust>>,
        condition: Option<String>,
        report: serde_json::Value,
    ) -> Result<Alignment, AlignError> {
        let n = decoder.cfg.n_voxels;
        let c = |e: candle_core::Error| AlignError::Compute(e.to_string());
        Ok(Alignment {
            input,
            run_mean: Tensor::from_vec(run.0, n, &decoder.device).map_err(c)?,
            run_std: Tensor::from_vec(run.1, n, &decoder.device).map_err(c)?,
            modes,
            adjusts,
            condition,
            model: decoder.fingerprint(),
            report,
        })
    }

    /// Whether trials of `condition` are decoded through it: those of its own condition and
    /// those that name none ([`DEFAULT_CONDITION`]).
    pub fn applies_to(&self, condition: &str) -> bool {
        self.condition.as_deref().is_none_or(|c| c == condition || condition == DEFAULT_CONDITION)
    }

    /// Number of voxel modes removed.
    pub fn n_modes(&self) -> usize {
        self.modes.as_ref().and_then(|m| m.dims().first().copied()).unwrap_or(0)
    }

    /// Normalised betas for the heads from betas `xs` `(batch, V)`: the input normalisation
    /// with `run` `(mean, std)` — the live run's statistics, or the calibration run's when
    /// `None` — then the modes removed.
    pub fn normalise(
        &self,
        decoder: &Decoder,
        xs: &Tensor,
        run: Option<(&[f32], &[f32])>,
    ) -> candle_core::Result<Tensor> {
        let z = match run {
            Some((m, s)) => {
                let dev = xs.device();
                let (m, s) = (Tensor::from_slice(m, m.len(), dev)?, Tensor::from_slice(s, s.len(), dev)?);
                self.input.apply(decoder, xs, (&m, &s))?
            }
            None => self.input.apply(decoder, xs, (&self.run_mean, &self.run_std))?,
        };
        match &self.modes {
            Some(m) => z.broadcast_sub(&z.matmul(&m.t()?.contiguous()?)?.matmul(m)?),
            None => Ok(z),
        }
    }

    /// Writes it to `path` (safetensors with metadata).
    pub fn save(&self, path: &Path, decoder: &Decoder) -> Result<(), AlignError> {
        let c = |e: candle_core::Error| AlignError::Compute(e.to_string());
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(c);
        let n = decoder.cfg.n_voxels;
        let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
            ("run.mean".into(), vec![n], flat(&self.run_mean)?),
            ("run.std".into(), vec![n], flat(&self.run_std)?),
        ];
        if let Some(m) = &self.modes {
            owned.push(("modes".into(), m.dims().to_vec(), flat(m)?));
        }
        let mut spaces = BTreeMap::new();
        for (h, a) in decoder.heads.iter().zip(&self.adjusts) {
            let Some(a) = a else { continue };
            let (left, shift, right) = a.factors().map_err(c)?;
            let p = format!("heads.{}", h.cfg.name);
            owned.push((format!("{p}.left"), left.dims().to_vec(), flat(&left)?));
            owned.push((format!("{p}.shift"), shift.dims().to_vec(), flat(&shift)?));
            owned.push((format!("{p}.right"), right.dims().to_vec(), flat(&right)?));
            spaces.insert(h.cfg.name.clone(), if a.latent { "latent" } else { "output" });
        }
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("model".to_string(), self.model.clone()),
            ("input".to_string(), self.input.name().to_string()),
            ("heads".to_string(), serde_json::to_string(&spaces).unwrap_or_default()),
            ("report".to_string(), self.report.to_string()),
        ]);
        if let Some(c) = &self.condition {
            meta.insert("condition".to_string(), c.clone());
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| AlignError::File(format!("{}: {e}", dir.display())))?;
        }
        let tensors: Vec<(&str, Vec<usize>, &[f32])> =
            owned.iter().map(|(name, shape, v)| (name.as_str(), shape.clone(), v.as_slice())).collect();
        write_f32_safetensors(path, &tensors, Some(meta)).map_err(AlignError::File)
    }

    /// Reads an alignment from `path` and checks that it was fitted for `decoder`.
    pub fn load(path: &Path, decoder: &Decoder) -> Result<Alignment, AlignError> {
        let err = |m: String| AlignError::File(format!("{}: {m}", path.display()));
        let (bytes, meta) = super::read_fitted(path, decoder, FORMAT, "a calibrated alignment")?;
        let input = meta
            .get("input")
            .and_then(|s| InputNorm::parse(s))
            .ok_or_else(|| err(format!("unknown input normalisation {:?}", meta.get("input"))))?;
        let spaces: BTreeMap<String, String> = meta
            .get("heads")
            .map(|s| serde_json::from_str(s))
            .transpose()
            .map_err(|e| err(format!("heads: {e}")))?
            .unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let read = |name: &str, shape: Option<&[usize]>| -> Result<Tensor, AlignError> {
            let (got, values) = read_f32_tensor(&st, name).map_err(err)?;
            if shape.is_some_and(|s| s != got.as_slice()) {
                return Err(err(format!("{name}: shape {got:?}, expected {shape:?}")));
            }
            if values.iter().any(|x| !x.is_finite()) {
                return Err(err(format!("{name} has non-finite values")));
            }
            Tensor::from_vec(values, got, &decoder.device).map_err(|e| err(e.to_string()))
        };
        let n = decoder.cfg.n_voxels;
        let run_mean = read("run.mean", Some(&[n]))?;
        let run_std = read("run.std", Some(&[n]))?;
        let modes = match st.tensor("modes") {
            Ok(_) => {
                let m = read("modes", None)?;
                if m.dims().len() != 2 || m.dims()[1] != n {
                    return Err(err(format!("modes: shape {:?}, expected [k, {n}]", m.dims())));
                }
                Some(m)
            }
            Err(_) => None,
        };
        let mut adjusts = vec![None; decoder.heads.len()];
        for (name, space) in &spaces {
            let Some(i) = decoder.heads.iter().position(|h| &h.cfg.name == name) else {
                return Err(err(format!("a correction for head {name:?}, which the model lacks")));
            };
            let head = &decoder.heads[i];
            let latent = match (space.as_str(), head.rank()) {
                ("latent", Some(_)) => true,
                ("output", _) => false,
                _ => return Err(err(format!("head {name}: space {space:?} does not fit the head"))),
            };
            let d = if latent { head.rank().unwrap_or(0) } else { head.cfg.n_outputs() };
            let p = format!("heads.{name}");
            let left = read(&format!("{p}.left"), None)?;
            let k = left.dims().first().copied().unwrap_or(0);
            let right = read(&format!("{p}.right"), Some(&[k, d]))?;
            let shift = read(&format!("{p}.shift"), Some(&[k]))?;
            if left.dims() != [k, d] {
                return Err(err(format!("{p}.left: shape {:?}, expected [{k}, {d}]", left.dims())));
            }
            adjusts[i] =
                Some(HeadAdjust::new(latent, &left, &shift, &right).map_err(|e| err(e.to_string()))?);
        }
        let report = meta.get("report").and_then(|f| serde_json::from_str(f).ok()).unwrap_or_default();
        let condition = meta.get("condition").cloned();
        Ok(Alignment {
            input,
            run_mean,
            run_std,
            modes,
            adjusts,
            condition,
            model: decoder.fingerprint(),
            report,
        })
    }
}
