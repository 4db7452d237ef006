//! Linear algebra between candle tensors and faer matrices: conversions, Gram matrices, a
//! regularised solve.

use candle_core::{DType, Tensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use crate::calibrate::CalibrateError;

/// A candle error as the fit's compute error.
pub(super) fn c(e: candle_core::Error) -> CalibrateError {
    CalibrateError::Compute(e.to_string())
}

/// A tensor's values as an `f64` matrix (`rows × cols`).
pub(super) fn to_mat(t: &Tensor) -> Result<Mat<f64>, CalibrateError> {
    let (r, k) = t.dims2().map_err(c)?;
    let v =
        t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(c)?;
    Ok(Mat::from_fn(r, k, |i, j| f64::from(v[i * k + j])))
}

/// An `f64` matrix as a float32 tensor on `t`'s device.
pub(super) fn to_tensor(m: &Mat<f64>, like: &Tensor) -> Result<Tensor, CalibrateError> {
    let v: Vec<f32> = (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32)).collect();
    Tensor::from_vec(v, (m.nrows(), m.ncols()), like.device()).map_err(c)
}

/// `X·Xᵀ` (or `X·M·Xᵀ`) of a tensor's rows, as `f64`.
pub(super) fn gram(x: &Tensor, metric: Option<&Tensor>) -> Result<Mat<f64>, CalibrateError> {
    let x = x.contiguous().map_err(c)?;
    let xm = match metric {
        Some(m) => x.matmul(m).map_err(c)?,
        None => x.clone(),
    };
    to_mat(&xm.matmul(&x.t().and_then(|t| t.contiguous()).map_err(c)?).map_err(c)?)
}

/// `(M + εI)⁻¹ Bᵀ` rows for symmetric positive semi-definite `M` `[r, r]` and right-hand
/// sides `B` `[k, r]` (ε: 10⁻⁸ of the mean diagonal), as `[k, r]`.
pub(super) fn pinv_solve(m: &Tensor, b: &Tensor) -> Result<Tensor, CalibrateError> {
    let mut mm = to_mat(m)?;
    let r = mm.nrows();
    let eps = 1e-8 * (0..r).map(|i| mm[(i, i)]).sum::<f64>() / r.max(1) as f64;
    for i in 0..r {
        mm[(i, i)] += eps.max(1e-30);
    }
    let llt = mm
        .llt(Side::Lower)
        .map_err(|_| CalibrateError::Compute("the head's output map is singular".into()))?;
    let mut x = to_mat(b)?.transpose().to_owned();
    llt.solve_in_place(&mut x);
    to_tensor(&x.transpose().to_owned(), b)
}

/// Index of the largest value (the first of equals).
pub(super) fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}
