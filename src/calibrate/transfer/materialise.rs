//! A kept correction materialised as the tensors the decoder applies.

use faer::linalg::solvers::Solve;
use faer::Mat;

use super::blocks::Ridge;
use super::linalg::{c, to_tensor};
use super::space::HeadSide;
use super::Problem;
use crate::calibrate::CalibrateError;
use crate::decode::model::HeadAdjust;

/// The fitted correction of one head as tensors: `left = prediction rows (· M)`, `right =
/// (K + λI)⁻¹ (targets − predictions)`, `shift` from the space's origin.
pub(super) fn materialise(
    p: &Problem,
    h: &HeadSide,
    input: usize,
    w: &Mat<f64>,
    ridge: &Ridge,
) -> Result<HeadAdjust, CalibrateError> {
    let (n_run, n_stim, n_cal) = (p.run.n_run, p.folds.n_stim, p.folds.n_cal);
    let q = h.basis.dims()[0];
    let zero = q - n_stim - 1;
    // Prediction rows over the basis.
    let a = Mat::from_fn(n_cal, q, |j, t| {
        if t >= input * n_run && t < (input + 1) * n_run {
            w[(j, t - input * n_run)]
        } else if t == zero {
            1.0 - (0..n_run).map(|x| w[(j, x)]).sum::<f64>()
        } else {
            0.0
        }
    });
    // (K + λI)⁻¹ (T − A) over the basis.
    let mut resid = Mat::from_fn(n_cal, q, |j, t| {
        let target = if t == zero + 1 + p.folds.stim_of[j] { 1.0 } else { 0.0 };
        target - a[(j, t)]
    });
    ridge.llt.solve_in_place(&mut resid);
    let preds = to_tensor(&a, &h.basis)?.matmul(&h.basis).map_err(c)?;
    let right = to_tensor(&resid, &h.basis)?.matmul(&h.basis).map_err(c)?;
    let left = match &h.metric {
        Some(m) => preds.matmul(m).map_err(c)?,
        None => preds,
    };
    // k = left·x with x = l + l₀ (latent) or y − target mean (output).
    let origin = h.origin.unsqueeze(1).map_err(c)?;
    let shift = left.matmul(&origin).and_then(|s| s.squeeze(1)).map_err(c)?;
    let shift = if h.latent { shift } else { shift.neg().map_err(c)? };
    HeadAdjust::new(h.latent, &left, &shift, &right).map_err(c)
}
