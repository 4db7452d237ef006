//! The spaces the fit works in: the run's normalised betas per input candidate, and each
//! head's alignment space, each with its Gram matrix.

use candle_core::{DType, Tensor};
use faer::Mat;

use super::folds::Folds;
use super::linalg::{c, gram, pinv_solve};
use crate::calibrate::{CalibrateConfig, CalibrateError, CalibrationSet};
use crate::decode::model::Decoder;

/// The calibration run: every trial's betas (calibration trials first), normalised per input
/// candidate, with their Gram matrices.
pub(super) struct RunSide {
    pub(super) n_run: usize,
    pub(super) stats: (Vec<f32>, Vec<f32>),
    pub(super) z: Vec<Tensor>,
    pub(super) gram: Vec<Mat<f64>>,
}

impl RunSide {
    /// The run's statistics (every trial: the calibration trials, then the others) and each
    /// input candidate's normalised betas, with their Gram matrices.
    pub(super) fn new(
        decoder: &Decoder,
        set: &CalibrationSet,
        cfg: &CalibrateConfig,
        n_run: usize,
    ) -> Result<RunSide, CalibrateError> {
        let v = decoder.cfg.n_voxels;
        let dev = &decoder.device;
        let all: Vec<f32> = [set.betas.as_slice(), set.others.as_slice()].concat();
        let stats = run_stats(&all, n_run, v);
        let xs = Tensor::from_vec(all, (n_run, v), dev).map_err(c)?;
        let mean = Tensor::from_slice(&stats.0, v, dev).map_err(c)?;
        let std = Tensor::from_slice(&stats.1, v, dev).map_err(c)?;
        let mut z = Vec::new();
        let mut grams = Vec::new();
        for input in &cfg.inputs {
            let zi = input.apply(decoder, &xs, (&mean, &std)).map_err(c)?;
            grams.push(gram(&zi, None)?);
            z.push(zi);
        }
        Ok(RunSide { n_run, stats, z, gram: grams })
    }
}

/// One head's vectors in its alignment space: Gram matrix over the basis
/// `[predictions of the run's trials per input candidate (N each); the zero input's; each stimulus's target]`.
pub(super) struct HeadSide {
    pub(super) index: usize,
    pub(super) weight: f64,
    pub(super) latent: bool,
    pub(super) gram: Mat<f64>,
    /// The basis itself, `q × d`, for the final correction.
    pub(super) basis: Tensor,
    /// `AᵀA` (latent space) or none (output space).
    pub(super) metric: Option<Tensor>,
    /// Where the alignment space's origin sits: the latent of the target mean (latent space)
    /// or the target mean (output space).
    pub(super) origin: Tensor,
}

/// Per-voxel mean and sample standard deviation of `n` rows of `v` values (zero spreads
/// become 1).
fn run_stats(x: &[f32], n: usize, v: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f64; v];
    for row in x.chunks_exact(v) {
        mean.iter_mut().zip(row).for_each(|(m, &b)| *m += f64::from(b));
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let mut var = vec![0f64; v];
    for row in x.chunks_exact(v) {
        var.iter_mut().zip(row).zip(&mean).for_each(|((s, &b), m)| *s += (f64::from(b) - m).powi(2));
    }
    let std = var
        .iter()
        .map(|s| (s / (n.max(2) - 1) as f64).sqrt())
        .map(|s| if s > 1e-12 { s as f32 } else { 1.0 })
        .collect();
    (mean.iter().map(|m| *m as f32).collect(), std)
}

/// Head `index`'s alignment space: predictions of every run trial under every input
/// candidate, of the zero input, and every calibration stimulus's target, and their Gram matrix.
pub(super) fn head_side(
    decoder: &Decoder,
    index: usize,
    targets: &[f32],
    folds: &Folds,
    run: &RunSide,
    cfg: &CalibrateConfig,
) -> Result<HeadSide, CalibrateError> {
    let head = &decoder.heads[index];
    let dev = &decoder.device;
    let out = head.cfg.n_outputs();
    // One target per stimulus: its first trial's.
    let mut first = vec![usize::MAX; folds.n_stim];
    for (j, &s) in folds.stim_of.iter().enumerate() {
        if first[s] == usize::MAX {
            first[s] = j;
        }
    }
    let rows: Vec<f32> =
        first.iter().flat_map(|&j| targets[j * out..(j + 1) * out].iter().copied()).collect();
    let t = Tensor::from_vec(rows, (folds.n_stim, out), dev).map_err(c)?;
    let target_mean = match head.target_mean() {
        Some(m) => m.clone(),
        None => Tensor::zeros(out, DType::F32, dev).map_err(c)?,
    };
    let zero = Tensor::zeros((1, decoder.cfg.n_voxels), DType::F32, dev).map_err(c)?;
    let weight = cfg.head_weights.get(&head.cfg.name).copied().unwrap_or(1.0);
    let map = head.output_map().map_err(c)?;
    let (basis, metric, origin, latent) = match map {
        Some((a, offset)) => {
            // Latent space: x = l + l₀ with A·l₀ the projection of (c − target mean), so that
            // A·x is the output minus the target mean; targets as A⁺(t − target mean).
            let m = head
                .output_gram()
                .map_err(c)?
                .ok_or_else(|| CalibrateError::Compute("no output gram".into()))?;
            let at = |y: &Tensor| -> Result<Tensor, CalibrateError> {
                y.broadcast_sub(&target_mean).and_then(|d| d.matmul(&a)).map_err(c)
            };
            let rhs = Tensor::cat(&[&at(&offset.unsqueeze(0).map_err(c)?)?, &at(&t)?], 0).map_err(c)?;
            let solved = pinv_solve(&m, &rhs)?;
            let origin = solved.narrow(0, 0, 1).map_err(c)?;
            let t_coords = solved.narrow(0, 1, folds.n_stim).map_err(c)?;
            let mut parts = Vec::new();
            for z in &run.z {
                parts.push(
                    head.latent(z).map_err(c)?.unwrap_or(zero.clone()).broadcast_add(&origin).map_err(c)?,
                );
            }
            parts.push(origin.clone());
            parts.push(t_coords);
            let basis = Tensor::cat(&parts, 0).map_err(c)?;
            (basis, Some(m), origin.squeeze(0).map_err(c)?, true)
        }
        None => {
            let centred = |y: Tensor| y.broadcast_sub(&target_mean).map_err(c);
            let mut parts = Vec::new();
            for z in &run.z {
                parts.push(centred(head.predict(z, None).map_err(c)?)?);
            }
            parts.push(centred(head.predict(&zero, None).map_err(c)?)?);
            parts.push(centred(t)?);
            let basis = Tensor::cat(&parts, 0).map_err(c)?;
            (basis, None, target_mean, false)
        }
    };
    let gram = gram(&basis, metric.as_ref())?;
    Ok(HeadSide { index, weight, latent, gram, basis, metric, origin })
}
