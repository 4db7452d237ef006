//! The default calibration fit: closed form, cross-validated over stimuli, and guarded.
//!
//! Three components sit between imagery betas and the heads, each fitted in closed form:
//!
//! 1. the input normalisation (`calibrate.inputs`; the first, per-run z-scoring by default, is
//!    the baseline), composed with the live run's own statistics;
//! 2. removal of the `k` largest voxel modes of the calibration trials' betas
//!    (`calibrate.modes`; unsupervised: no labels);
//! 3. per head, identity plus a ridge-penalised linear map from the decoder's predictions to
//!    the calibration targets, in kernel form over the calibration trials' Gram matrix (so a
//!    263,168-output head costs no more than a small one), in the latent space of a low-rank
//!    head (metric `AᵀA` of its output map) and in the output space (around the training
//!    target mean) of a full head; the penalty is chosen from `calibrate.alphas`.
//!
//! Every choice is scored by 2-way identification cross-validated over *pairs of stimuli*:
//! both stimuli's trials are left out of everything fitted — the run's mean, the modes, the
//! correction — and each is told apart from the other (cosine with its own target against the
//! other's), so the two are exchangeable and nothing fitted has seen either. Choices made
//! inside (the penalty, the input candidate) are nested: made without the pair. A component's
//! mean gain in identification margin over the pairs, with its standard error (the larger of
//! the jackknife over stimuli and the corrected resampled estimate), enters a one-sided t-test
//! at `calibrate.guard_p` (the input candidate, the best of several, at `guard_p` over their
//! number); a component is kept only where it passes,
//! otherwise the baseline stays. The report gives those held-out estimates, never a score on
//! the trials a choice was fitted on.
//!
//! All of it works on Gram matrices: the run's normalised betas (`N × N`) and, per head, the
//! predictions of every run trial, of the zero input and every stimulus's target (`q × q`).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use serde::Serialize;

use super::{CalibrateConfig, CalibrateError, CalibrationSet, Progress};
use crate::decode::align::{Alignment, InputNorm};
use crate::decode::model::{Decoder, HeadAdjust};

/// A held-out estimate: mean over held-out pairs of stimuli, its standard error (see
/// `Folds::estimate`) and `n` stimuli.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    /// Mean.
    pub mean: f64,
    /// Standard error of the mean.
    pub se: f64,
    /// Held-out stimuli.
    pub n: usize,
}

impl Estimate {
    /// Whether the one-sided t-test at level `p` says the mean is above zero.
    fn reliable(&self, p: f64) -> bool {
        if self.n < 2 || self.mean <= 0.0 {
            return false;
        }
        self.se == 0.0 || self.mean / self.se > student_t_quantile(1.0 - p, (self.n - 1) as f64)
    }
}

/// What was decided about the input normalisation and voxel modes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InputReport {
    /// The baseline normalisation.
    pub baseline: InputNorm,
    /// The normalisation used.
    pub input: InputNorm,
    /// Voxel modes removed.
    pub modes: usize,
    /// Whether a choice other than the baseline was kept.
    pub kept: bool,
    /// The best candidate, kept or not.
    pub best: (InputNorm, usize),
    /// Level of its one-sided test: `guard_p` over the candidates other than the baseline
    /// (the best of several is what is tested).
    pub level: f64,
    /// Held-out gain of the whole pipeline with the choice over the pipeline with the
    /// baseline, in identification margin (the choice itself nested).
    pub margin_gain: Estimate,
    /// The same gain in 2-way identification of held-out pairs.
    pub two_way_gain: Estimate,
}

/// What was decided about one head's correction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeadReport {
    /// The head.
    pub head: String,
    /// `latent` (a low-rank head's latent) or `output`.
    pub space: &'static str,
    /// Whether the correction was kept.
    pub kept: bool,
    /// Its penalty (relative to the Gram matrix's mean diagonal), when kept.
    pub alpha: Option<f64>,
    /// Held-out gain of the correction, in identification margin.
    pub margin_gain: Estimate,
    /// The same gain in 2-way identification of held-out pairs.
    pub two_way_gain: Estimate,
}

/// Held-out 2-way identification of pairs of calibration stimuli (mean over heads).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TwoWayReport {
    /// With the baseline normalisation only.
    pub baseline: f64,
    /// With what was kept.
    pub calibrated: f64,
    /// Per held-out stimulus, calibrated − baseline.
    pub gain: Estimate,
}

/// How a closed-form fit went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransferReport {
    /// `closed-form`.
    pub method: &'static str,
    /// Calibration trials.
    pub n_trials: usize,
    /// Distinct stimuli among them.
    pub n_stimuli: usize,
    /// Trials of the run (calibration trials and others: statistics and modes).
    pub n_run_trials: usize,
    /// Level of the guard's one-sided test.
    pub guard_p: f64,
    /// The input stage (absent when too few stimuli to test anything).
    pub input: Option<InputReport>,
    /// Each head with targets.
    pub heads: Vec<HeadReport>,
    /// Held-out 2-way with and without what was kept.
    pub two_way: Option<TwoWayReport>,
    /// Why nothing was tested, when so.
    pub note: Option<String>,
    /// Wall time of the fit, s.
    pub seconds: f64,
}

fn c(e: candle_core::Error) -> CalibrateError {
    CalibrateError::Compute(e.to_string())
}

/// A tensor's values as an `f64` matrix (`rows × cols`).
fn to_mat(t: &Tensor) -> Result<Mat<f64>, CalibrateError> {
    let (r, k) = t.dims2().map_err(c)?;
    let v =
        t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(c)?;
    Ok(Mat::from_fn(r, k, |i, j| f64::from(v[i * k + j])))
}

/// An `f64` matrix as a float32 tensor on `t`'s device.
fn to_tensor(m: &Mat<f64>, like: &Tensor) -> Result<Tensor, CalibrateError> {
    let v: Vec<f32> = (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32)).collect();
    Tensor::from_vec(v, (m.nrows(), m.ncols()), like.device()).map_err(c)
}

/// `X·Xᵀ` (or `X·M·Xᵀ`) of a tensor's rows, as `f64`.
fn gram(x: &Tensor, metric: Option<&Tensor>) -> Result<Mat<f64>, CalibrateError> {
    let x = x.contiguous().map_err(c)?;
    let xm = match metric {
        Some(m) => x.matmul(m).map_err(c)?,
        None => x.clone(),
    };
    to_mat(&xm.matmul(&x.t().and_then(|t| t.contiguous()).map_err(c)?).map_err(c)?)
}

/// The calibration run: every trial's betas (calibration trials first), normalised per input
/// candidate, with their Gram matrices.
struct RunSide {
    n_run: usize,
    stats: (Vec<f32>, Vec<f32>),
    z: Vec<Tensor>,
    gram: Vec<Mat<f64>>,
}

/// One head's vectors in its alignment space: Gram matrix over the basis
/// `[predictions of the run's trials per input candidate (N each); the zero input's; each stimulus's target]`.
struct HeadSide {
    index: usize,
    weight: f64,
    latent: bool,
    gram: Mat<f64>,
    /// The basis itself, `q × d`, for the final correction.
    basis: Tensor,
    /// `AᵀA` (latent space) or none (output space).
    metric: Option<Tensor>,
    /// Where the alignment space's origin sits: the latent of the target mean (latent space)
    /// or the target mean (output space).
    origin: Tensor,
}

/// Coefficients of a vector over one candidate's trial predictions and the stimuli's targets.
#[derive(Clone)]
struct Vector {
    trials: Vec<f64>,
    targets: Vec<f64>,
}

/// One head's Gram blocks for one fold's inputs: trial predictions × trial predictions,
/// × targets, and targets × targets.
struct Blocks {
    aa: Mat<f64>,
    at: Mat<f64>,
    tt: Mat<f64>,
}

impl Blocks {
    fn new(head: &HeadSide, input: usize, n_run: usize, n_stim: usize, w: &Mat<f64>) -> Blocks {
        // Trial j's prediction: Σ_t w[j,t]·P_t + (1 − Σ_t w[j,t])·P_zero.
        let base = input * n_run;
        let zero = head.gram.nrows() - n_stim - 1;
        let n = w.nrows();
        let a = Mat::from_fn(n, n_run + 1, |j, t| {
            if t < n_run {
                w[(j, t)]
            } else {
                1.0 - (0..n_run).map(|k| w[(j, k)]).sum::<f64>()
            }
        });
        let idx = |t: usize| if t < n_run { base + t } else { zero };
        let g = Mat::from_fn(n_run + 1, n_run + 1, |i, j| head.gram[(idx(i), idx(j))]);
        let gt = Mat::from_fn(n_run + 1, n_stim, |i, s| head.gram[(idx(i), zero + 1 + s)]);
        let tt = Mat::from_fn(n_stim, n_stim, |s, u| head.gram[(zero + 1 + s, zero + 1 + u)]);
        let ag = &a * &g;
        Blocks { aa: &ag * a.transpose(), at: &a * &gt, tt }
    }

    /// A trial's own prediction as a vector.
    fn plain(&self, j: usize) -> Vector {
        let mut v = Vector { trials: vec![0.0; self.aa.nrows()], targets: vec![0.0; self.tt.nrows()] };
        v.trials[j] = 1.0;
        v
    }

    fn dot(&self, x: &Vector, y: &Vector) -> f64 {
        let (n, s) = (x.trials.len(), x.targets.len());
        let mut total = 0.0;
        for i in 0..n {
            if x.trials[i] != 0.0 {
                let row: f64 = (0..n).map(|j| self.aa[(i, j)] * y.trials[j]).sum::<f64>()
                    + (0..s).map(|u| self.at[(i, u)] * y.targets[u]).sum::<f64>();
                total += x.trials[i] * row;
            }
        }
        for u in 0..s {
            if x.targets[u] != 0.0 {
                let row: f64 = (0..n).map(|j| self.at[(j, u)] * y.trials[j]).sum::<f64>()
                    + (0..s).map(|v| self.tt[(u, v)] * y.targets[v]).sum::<f64>();
                total += x.targets[u] * row;
            }
        }
        total
    }

    /// `v` (a prediction of stimulus `own`) told apart from stimulus `other`: (cosine with the
    /// own target minus cosine with the other's, 1 / ½ / 0 for the 2-way).
    fn identify(&self, v: &Vector, own: usize, other: usize) -> (f64, f64) {
        let norm = self.dot(v, v).max(0.0).sqrt();
        let cos = |u: usize| {
            let dot = (0..v.trials.len()).map(|i| v.trials[i] * self.at[(i, u)]).sum::<f64>()
                + (0..v.targets.len()).map(|w| v.targets[w] * self.tt[(w, u)]).sum::<f64>();
            let den = norm * self.tt[(u, u)].max(0.0).sqrt();
            if den > 0.0 {
                dot / den
            } else {
                0.0
            }
        };
        let (a, b) = (cos(own), cos(other));
        (
            a - b,
            if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            },
        )
    }
}

/// Kernel ridge toward identity fitted on trials `train`: for a held-out trial `j`, its
/// prediction plus `Σ_l c_l (target_l − prediction_l)` with `c = (K + λI)⁻¹ k_j`.
struct Ridge {
    train: Vec<usize>,
    llt: faer::linalg::solvers::Llt<f64>,
}

impl Ridge {
    fn fit(b: &Blocks, train: &[usize], alpha: f64) -> Option<Ridge> {
        let n = train.len();
        if n == 0 {
            return None;
        }
        let mut k = Mat::from_fn(n, n, |i, j| b.aa[(train[i], train[j])]);
        let trace: f64 = (0..n).map(|i| k[(i, i)]).sum();
        if !(trace > 0.0 && trace.is_finite()) {
            return None;
        }
        let lambda = alpha * trace / n as f64;
        for i in 0..n {
            k[(i, i)] += lambda;
        }
        k.llt(Side::Lower).ok().map(|llt| Ridge { train: train.to_vec(), llt })
    }

    fn correct(&self, b: &Blocks, j: usize, stim_of: &[usize]) -> Vector {
        let mut c = Mat::from_fn(self.train.len(), 1, |i, _| b.aa[(self.train[i], j)]);
        self.llt.solve_in_place(&mut c);
        let mut v = b.plain(j);
        for (i, &l) in self.train.iter().enumerate() {
            v.trials[l] -= c[(i, 0)];
            v.targets[stim_of[l]] += c[(i, 0)];
        }
        v
    }
}

/// The calibration trials' stimuli, and the pairs of stimuli held out together.
struct Folds {
    n_cal: usize,
    stim_of: Vec<usize>,
    n_stim: usize,
}

impl Folds {
    fn trials_of(&self, stims: &[usize]) -> Vec<usize> {
        (0..self.n_cal).filter(|&j| stims.contains(&self.stim_of[j])).collect()
    }

    fn trials_without(&self, stims: &[usize]) -> Vec<usize> {
        (0..self.n_cal).filter(|&j| !stims.contains(&self.stim_of[j])).collect()
    }

    /// Every pair of stimuli.
    fn pairs(&self) -> Vec<[usize; 2]> {
        (0..self.n_stim).flat_map(|a| (a + 1..self.n_stim).map(move |b| [a, b])).collect()
    }

    /// Disjoint pairs of the stimuli not in `held`, each stimulus in one or two of them (a
    /// ring), for choices nested inside a held-out pair.
    fn inner_pairs(&self, held: &[usize]) -> Vec<[usize; 2]> {
        let rest: Vec<usize> = (0..self.n_stim).filter(|s| !held.contains(s)).collect();
        match rest.len() {
            0 | 1 => Vec::new(),
            2 => vec![[rest[0], rest[1]]],
            m => (0..m).map(|i| [rest[i], rest[(i + 1) % m]]).collect(),
        }
    }

    /// The mean of per-pair values `v` and its standard error: the larger of the jackknife
    /// over held-out stimuli (pairs share stimuli) and Nadeau and Bengio's corrected resampled
    /// estimate, `(1/J + n_test/n_train)` times the spread over the `J` pairs, which also counts
    /// the folds' shared training stimuli (the jackknife alone was 1.4–2.7× smaller).
    fn estimate(&self, pairs: &[[usize; 2]], v: &[f64]) -> Estimate {
        let mean_of = |keep: &dyn Fn(&[usize; 2]) -> bool| {
            let x: Vec<f64> = pairs.iter().zip(v).filter(|(p, _)| keep(p)).map(|(_, x)| *x).collect();
            (x.iter().sum::<f64>() / x.len().max(1) as f64, x.len())
        };
        let (mean, n_pairs) = mean_of(&|_| true);
        let n = self.n_stim;
        if n_pairs == 0 || n < 3 {
            return Estimate { mean, se: 0.0, n };
        }
        let leave: Vec<f64> = (0..n).map(|s| mean_of(&|p: &[usize; 2]| !p.contains(&s)).0).collect();
        let centre = leave.iter().sum::<f64>() / n as f64;
        let jackknife = (n - 1) as f64 / n as f64 * leave.iter().map(|x| (x - centre).powi(2)).sum::<f64>();
        let spread = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n_pairs.max(2) - 1) as f64;
        let resampled = (1.0 / n_pairs as f64 + 2.0 / (n - 2) as f64) * spread;
        Estimate { mean, se: jackknife.max(resampled).sqrt(), n }
    }
}

/// Weights over the run's `N` normalised trials (the `n_cal` calibration trials first) that
/// give each calibration trial's input in a fold that holds out rows `held`: the run's mean
/// without them (for run-mean inputs) and the `k` largest modes of the remaining calibration
/// trials removed. Also returns the modes (`k × N`).
fn fold_weights(
    g: &Mat<f64>,
    n_cal: usize,
    held: &[usize],
    uses_run: bool,
    k: usize,
) -> (Mat<f64>, Mat<f64>) {
    let n = g.nrows();
    let shift =
        if uses_run && !held.is_empty() && held.len() < n { 1.0 / (n - held.len()) as f64 } else { 0.0 };
    let point = |t: usize| -> Vec<f64> {
        let mut w = vec![0.0; n];
        w[t] += 1.0;
        for &h in held {
            w[h] += shift;
        }
        w
    };
    let mut w = Mat::from_fn(n_cal, n, |j, t| point(j)[t]);
    // Modes come from the calibration trials alone: the run's other trials may show the
    // held-out stimuli, whose own responses would then be removed from them.
    let train: Vec<usize> = (0..n_cal).filter(|t| !held.contains(t)).collect();
    let k = k.min(train.len().saturating_sub(1));
    if k == 0 {
        return (w, Mat::zeros(0, n));
    }
    let mut centred = Mat::from_fn(train.len(), n, |i, t| point(train[i])[t]);
    for t in 0..n {
        let mean = (0..train.len()).map(|i| centred[(i, t)]).sum::<f64>() / train.len() as f64;
        (0..train.len()).for_each(|i| centred[(i, t)] -= mean);
    }
    let cg = &centred * g;
    let cov = &cg * centred.transpose();
    let Ok(eig) = cov.self_adjoint_eigen(Side::Lower) else { return (w, Mat::zeros(0, n)) };
    let values = eig.S().column_vector();
    let m = values.nrows();
    let top = values[m - 1];
    let keep: Vec<usize> =
        (0..k).map(|i| m - 1 - i).filter(|&i| top > 0.0 && values[i] > 1e-9 * top).collect();
    let u = eig.U();
    let modes = Mat::from_fn(keep.len(), n, |r, t| {
        let i = keep[r];
        (0..train.len()).map(|a| u[(a, i)] * centred[(a, t)]).sum::<f64>() / values[i].sqrt()
    });
    // Remove each trial's projection on the modes: w ← w − μᵀ (μ G w).
    let proj = &(&modes * g) * w.transpose(); // k × n_cal
    for j in 0..n_cal {
        for r in 0..keep.len() {
            let p = proj[(r, j)];
            for t in 0..n {
                w[(j, t)] -= p * modes[(r, t)];
            }
        }
    }
    (w, modes)
}

/// The quantile `q` of Student's t with `df` degrees of freedom (Cornish–Fisher expansion
/// around the normal quantile; within 0.01 of the exact value for df ≥ 3, q ≤ 0.99).
fn student_t_quantile(q: f64, df: f64) -> f64 {
    let z = normal_quantile(q);
    let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
    z + (z3 + z) / (4.0 * df)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * df * df)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * df.powi(3))
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Everything one fit needs, computed once.
struct Problem<'a> {
    decoder: &'a Decoder,
    cfg: &'a CalibrateConfig,
    folds: Folds,
    run: RunSide,
    heads: Vec<HeadSide>,
}

/// Fold weights by (input candidate, modes, held-out stimuli).
type WeightCache = BTreeMap<(usize, usize, Vec<usize>), Mat<f64>>;

/// One head's correction under one input candidate.
struct HeadChoice {
    kept: bool,
    /// The penalty chosen on every held-out pair (used when kept).
    alpha: f64,
    /// Per held-out pair: the penalty chosen without it (inner pairs).
    nested: Vec<f64>,
    /// Per held-out pair: the correction's gain in identification margin.
    margin: Vec<f64>,
    margin_gain: Estimate,
    two_way_gain: Estimate,
}

/// The whole pipeline under one input candidate: each head's (guarded) correction and, per
/// held-out pair, the weighted mean over heads of its identification with them.
struct Pipeline {
    heads: Vec<HeadChoice>,
    margin: Vec<f64>,
    two_way: Vec<f64>,
}

impl Problem<'_> {
    /// Fold weights of input candidate `(input, k)` with the trials of `stims` held out.
    fn weights(&self, cache: &mut WeightCache, input: usize, k: usize, stims: &[usize]) -> Mat<f64> {
        let mut key = stims.to_vec();
        key.sort_unstable();
        cache
            .entry((input, k, key))
            .or_insert_with(|| {
                let held = self.folds.trials_of(stims);
                fold_weights(
                    &self.run.gram[input],
                    self.folds.n_cal,
                    &held,
                    self.cfg.inputs[input].uses_run(),
                    k,
                )
                .0
            })
            .clone()
    }

    /// Head `h`'s identification (margin, 2-way) of held-out pair `pair` with everything fitted
    /// without `held` (which holds the pair): the correction with penalty `alpha` (or none).
    fn pair_score(&self, b: &Blocks, held: &[usize], pair: [usize; 2], alpha: Option<f64>) -> (f64, f64) {
        let train = self.folds.trials_without(held);
        let ridge = alpha.and_then(|a| Ridge::fit(b, &train, a));
        let (mut m, mut t, mut n) = (0.0, 0.0, 0);
        for (own, other) in [(pair[0], pair[1]), (pair[1], pair[0])] {
            for j in self.folds.trials_of(&[own]) {
                let v = match &ridge {
                    Some(r) => r.correct(b, j, &self.folds.stim_of),
                    None => b.plain(j),
                };
                let (a, c) = b.identify(&v, own, other);
                m += a;
                t += c;
                n += 1;
            }
        }
        (m / n.max(1) as f64, t / n.max(1) as f64)
    }

    /// Each head's correction under `(input, k)`: per held-out pair, the penalty chosen on
    /// inner pairs (both pairs held out of the run's statistics and modes), the gain measured
    /// on the pair; the corrections kept together where the guard's test passes, on the heads
    /// whose own gain is positive; then the pipeline's scores per pair.
    fn pipeline(&self, cache: &mut WeightCache, input: usize, k: usize) -> Pipeline {
        let (cfg, pairs) = (self.cfg, self.folds.pairs());
        let n_stim = self.folds.n_stim;
        let blocks = |cache: &mut WeightCache, h: &HeadSide, held: &[usize]| {
            Blocks::new(h, input, self.run.n_run, n_stim, &self.weights(cache, input, k, held))
        };
        let mut heads = Vec::new();
        for h in &self.heads {
            let (mut dm, mut dt, mut nested) = (Vec::new(), Vec::new(), Vec::new());
            let mut outer_by_alpha = vec![0.0; cfg.alphas.len()];
            for &pair in &pairs {
                let outer = blocks(cache, h, &pair);
                let mut inner = vec![0.0; cfg.alphas.len()];
                for q in self.folds.inner_pairs(&pair) {
                    let held = [pair[0], pair[1], q[0], q[1]];
                    let b = blocks(cache, h, &held);
                    for (ai, &a) in cfg.alphas.iter().enumerate() {
                        inner[ai] += self.pair_score(&b, &held, q, Some(a)).0;
                    }
                }
                let ai = argmax(&inner);
                let with = self.pair_score(&outer, &pair, pair, Some(cfg.alphas[ai]));
                let without = self.pair_score(&outer, &pair, pair, None);
                dm.push(with.0 - without.0);
                dt.push(with.1 - without.1);
                nested.push(cfg.alphas[ai]);
                for (bi, &a) in cfg.alphas.iter().enumerate() {
                    outer_by_alpha[bi] += self.pair_score(&outer, &pair, pair, Some(a)).0;
                }
            }
            heads.push(HeadChoice {
                kept: false,
                alpha: cfg.alphas[argmax(&outer_by_alpha)],
                nested,
                margin_gain: self.folds.estimate(&pairs, &dm),
                two_way_gain: self.folds.estimate(&pairs, &dt),
                margin: dm,
            });
        }
        // The corrections are one component: tested together (the heads' weighted mean gain
        // per stimulus), then kept on the heads whose own gain is positive.
        let total: f64 = self.heads.iter().map(|h| h.weight).sum();
        let joint: Vec<f64> = (0..pairs.len())
            .map(|i| self.heads.iter().zip(&heads).map(|(h, c)| h.weight * c.margin[i]).sum::<f64>() / total)
            .collect();
        let joint = self.folds.estimate(&pairs, &joint);
        for c in &mut heads {
            c.kept = joint.reliable(cfg.guard_p) && c.margin_gain.mean > 0.0;
        }
        let (mut margin, mut two_way) = (Vec::new(), Vec::new());
        for (pi, &pair) in pairs.iter().enumerate() {
            let (mut m, mut t) = (0.0, 0.0);
            for (h, c) in self.heads.iter().zip(&heads) {
                let b = blocks(cache, h, &pair);
                let (hm, ht) = self.pair_score(&b, &pair, pair, c.kept.then(|| c.nested[pi]));
                m += h.weight * hm / total;
                t += h.weight * ht / total;
            }
            margin.push(m);
            two_way.push(t);
        }
        Pipeline { heads, margin, two_way }
    }
}

/// Index of the largest value (the first of equals).
fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Fits the default (closed-form, guarded) alignment for `decoder` on `set`; `progress` hears
/// each stage.
pub fn fit(
    decoder: &Decoder,
    set: &CalibrationSet,
    cfg: &CalibrateConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Alignment, TransferReport), CalibrateError> {
    let start = std::time::Instant::now();
    let v = decoder.cfg.n_voxels;
    let n = set.len();
    set.check(decoder, cfg.min_trials)?;
    let n_other = set.others.len() / v;
    let n_run = n + n_other;
    let dev = &decoder.device;

    // Stimuli, in order of first appearance.
    let mut names: Vec<&String> = Vec::new();
    let stim_of: Vec<usize> = set
        .stimuli
        .iter()
        .map(|s| match names.iter().position(|x| *x == s) {
            Some(i) => i,
            None => {
                names.push(s);
                names.len() - 1
            }
        })
        .collect();
    let n_stim = names.len();
    let folds = Folds { n_cal: n, stim_of, n_stim };

    // The run's statistics (every trial) and each input candidate's normalised betas.
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
    let run = RunSide { n_run, stats, z, gram: grams };

    // Each head with targets: its alignment space and Gram matrix.
    let mut heads = Vec::new();
    let named: Vec<(usize, &Vec<f32>)> = decoder
        .heads
        .iter()
        .enumerate()
        .filter_map(|(i, h)| set.targets.get(&h.cfg.name).map(|t| (i, t)))
        .filter(|(i, _)| cfg.head_weights.get(&decoder.heads[*i].cfg.name).copied().unwrap_or(1.0) > 0.0)
        // The closed form's folds are affine in the input; an L2-normalised head keeps its baseline.
        .filter(|(i, _)| decoder.heads[*i].cfg.input.is_affine())
        .collect();
    if named.is_empty() {
        return Err(CalibrateError::Input(
            "no head has targets (and a non-zero weight, and an input affine in the betas: not l2)".into(),
        ));
    }
    let too_few = n_stim < cfg.min_stimuli;
    if !too_few {
        for (step, (i, targets)) in named.iter().enumerate() {
            progress(&Progress::stage("prepare", step + 1, named.len()));
            heads.push(head_side(decoder, *i, targets, &folds, &run, cfg)?);
        }
    }
    let mut problem = Problem { decoder, cfg, folds, run, heads };
    let (input_choice, input_report, heads_report, two_way, adjusts, modes) = if too_few {
        // Nothing is tested: the baseline, with every head left as it is.
        let untested = named
            .iter()
            .map(|(i, _)| HeadReport {
                head: decoder.heads[*i].cfg.name.clone(),
                space: if decoder.heads[*i].rank().is_some() { "latent" } else { "output" },
                kept: false,
                alpha: None,
                margin_gain: Estimate::default(),
                two_way_gain: Estimate::default(),
            })
            .collect();
        (0, None, untested, None, vec![None; decoder.heads.len()], None)
    } else {
        choose(&problem, progress)?
    };
    // With nothing tested, the run is z-scored as MIRAGE's zero-shot baseline does: no choice
    // of ours (not even centring alone) is applied without evidence for it.
    let input = if too_few { InputNorm::ZscoreRun } else { cfg.inputs[input_choice] };
    let note = too_few.then(|| {
        format!(
            "{n_stim} stimuli: at least {} (calibrate.min_stimuli) are needed to test a correction; \
             nothing is fitted and the run is z-scored ({}), MIRAGE's zero-shot baseline",
            cfg.min_stimuli,
            input.name()
        )
    });
    let report = TransferReport {
        method: "closed-form",
        n_trials: n,
        n_stimuli: n_stim,
        n_run_trials: n_run,
        guard_p: cfg.guard_p,
        input: input_report,
        heads: heads_report,
        two_way,
        note,
        seconds: start.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_value(&report).unwrap_or_default();
    let stats = std::mem::take(&mut problem.run.stats);
    let condition = set.condition.clone();
    let alignment = Alignment::new(decoder, input, stats, modes, adjusts, condition, json)?;
    Ok((alignment, report))
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
fn head_side(
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

/// `(M + εI)⁻¹ Bᵀ` rows for symmetric positive semi-definite `M` `[r, r]` and right-hand
/// sides `B` `[k, r]` (ε: 10⁻⁸ of the mean diagonal), as `[k, r]`.
fn pinv_solve(m: &Tensor, b: &Tensor) -> Result<Tensor, CalibrateError> {
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

type Chosen = (
    usize,
    Option<InputReport>,
    Vec<HeadReport>,
    Option<TwoWayReport>,
    Vec<Option<HeadAdjust>>,
    Option<Tensor>,
);

/// The guarded choices: the input candidate (normalisation and modes) whose whole pipeline —
/// each head's guarded correction included — identifies held-out pairs best, kept only if it
/// reliably beats the baseline's pipeline; and the fitted parts.
fn choose(p: &Problem, progress: &mut dyn FnMut(&Progress)) -> Result<Chosen, CalibrateError> {
    let cfg = p.cfg;
    let pairs = p.folds.pairs();
    let mut candidates = vec![(0, 0)];
    for input in 0..cfg.inputs.len() {
        for &k in &cfg.modes {
            if !candidates.contains(&(input, k)) && k + 1 < p.folds.n_cal {
                candidates.push((input, k));
            }
        }
    }
    let mut cache = WeightCache::new();
    let mut pipes = Vec::new();
    for (ci, &(input, k)) in candidates.iter().enumerate() {
        progress(&Progress::stage("inputs", ci + 1, candidates.len()));
        pipes.push(p.pipeline(&mut cache, input, k));
    }
    // For each pair, the candidate chosen on the pairs that hold neither of its stimuli.
    let best_without = |held: &[usize]| {
        let score = |pl: &Pipeline| {
            let v: Vec<f64> = pairs
                .iter()
                .zip(&pl.margin)
                .filter(|(q, _)| !q.iter().any(|s| held.contains(s)))
                .map(|(_, m)| *m)
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        argmax(&pipes.iter().map(score).collect::<Vec<_>>())
    };
    let nested: Vec<usize> = pairs.iter().map(|pair| best_without(pair)).collect();
    let gain = |f: &dyn Fn(&Pipeline) -> &Vec<f64>| -> Estimate {
        let per_pair: Vec<f64> =
            (0..pairs.len()).map(|i| f(&pipes[nested[i]])[i] - f(&pipes[0])[i]).collect();
        p.folds.estimate(&pairs, &per_pair)
    };
    let (input_margin, input_two_way) = (gain(&|pl| &pl.margin), gain(&|pl| &pl.two_way));
    let best = best_without(&[]);
    // The best of several candidates is tested: Bonferroni over them, or a world with nothing
    // to learn keeps one by chance (and with it corrections its own test would refuse).
    let level = cfg.guard_p / (candidates.len() - 1).max(1) as f64;
    let kept = best != 0 && input_margin.reliable(level);
    let chosen = if kept { best } else { 0 };
    let (input, k) = candidates[chosen];
    let input_report = InputReport {
        baseline: cfg.inputs[0],
        input: cfg.inputs[input],
        modes: k,
        kept,
        best: (cfg.inputs[candidates[best].0], candidates[best].1),
        level,
        margin_gain: input_margin,
        two_way_gain: input_two_way,
    };
    let pipe = &pipes[chosen];
    let head_reports = p
        .heads
        .iter()
        .zip(&pipe.heads)
        .map(|(h, c)| HeadReport {
            head: p.decoder.heads[h.index].cfg.name.clone(),
            space: if h.latent { "latent" } else { "output" },
            kept: c.kept,
            alpha: c.kept.then_some(c.alpha),
            margin_gain: c.margin_gain,
            two_way_gain: c.two_way_gain,
        })
        .collect();

    // The chosen pipeline's held-out 2-way against the baseline's (no correction).
    let plain = p.pipeline_without_corrections(&mut cache);
    let gains: Vec<f64> = (0..pairs.len()).map(|i| pipe.two_way[i] - plain[i]).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let two_way_report = TwoWayReport {
        baseline: mean(&plain),
        calibrated: mean(&pipe.two_way),
        gain: p.folds.estimate(&pairs, &gains),
    };

    // The fitted parts, on every trial.
    let (n_cal, uses_run) = (p.folds.n_cal, cfg.inputs[input].uses_run());
    let (w, mu) = fold_weights(&p.run.gram[input], n_cal, &[], uses_run, k);
    let modes = if mu.nrows() > 0 {
        let zt = &p.run.z[input];
        Some(to_tensor(&mu, zt)?.matmul(zt).map_err(c)?)
    } else {
        None
    };
    let mut adjusts = vec![None; p.decoder.heads.len()];
    let all: Vec<usize> = (0..n_cal).collect();
    for (h, choice) in p.heads.iter().zip(&pipe.heads) {
        if !choice.kept {
            continue;
        }
        let b = Blocks::new(h, input, p.run.n_run, p.folds.n_stim, &w);
        let Some(ridge) = Ridge::fit(&b, &all, choice.alpha) else { continue };
        adjusts[h.index] = Some(materialise(p, h, input, &w, &ridge)?);
    }
    Ok((input, Some(input_report), head_reports, Some(two_way_report), adjusts, modes))
}

impl Problem<'_> {
    /// Per held-out pair, the baseline's 2-way (the first input, no modes, no correction).
    fn pipeline_without_corrections(&self, cache: &mut WeightCache) -> Vec<f64> {
        let total: f64 = self.heads.iter().map(|h| h.weight).sum();
        self.folds
            .pairs()
            .iter()
            .map(|&pair| {
                let w = self.weights(cache, 0, 0, &pair);
                self.heads
                    .iter()
                    .map(|h| {
                        let b = Blocks::new(h, 0, self.run.n_run, self.folds.n_stim, &w);
                        h.weight * self.pair_score(&b, &pair, pair, None).1 / total
                    })
                    .sum()
            })
            .collect()
    }
}

/// The fitted correction of one head as tensors: `left = prediction rows (· M)`, `right =
/// (K + λI)⁻¹ (targets − predictions)`, `shift` from the space's origin.
fn materialise(
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;
    use candle_nn::VarBuilder;

    use serde_json::Value;

    use super::*;
    use crate::decode::align::Adapter;
    use crate::decode::metrics::two_way;
    use crate::decode::train::{train, Targets, TrainOptions};
    use crate::rng::Rng;

    const V: usize = 300;
    const D: usize = 8;

    /// A participant at the level of betas: latent stimuli, a linear encoding, two heads
    /// linear in the latent, and an imagery condition (`rotate`: a rotation of the whole
    /// latent space; else only weaker signal and more noise).
    struct World {
        stimuli: Vec<Vec<f64>>,
        encoding: Vec<f64>,
        heads: Vec<(String, Vec<usize>, Vec<f64>)>,
        rotation: Option<Vec<f64>>,
        rng: Rng,
        held_out: Option<Vec<f32>>,
    }

    impl World {
        fn new(seed: u64, rotate: bool) -> World {
            let mut rng = Rng::new(seed, 40);
            let stimuli = (0..80).map(|_| (0..D).map(|_| rng.normal()).collect()).collect();
            let encoding = (0..V * D).map(|_| rng.normal() * (0.3 / D as f64).sqrt()).collect();
            let heads = [("image", vec![24]), ("text", vec![3, 8])]
                .into_iter()
                .map(|(n, shape)| {
                    let out: usize = shape.iter().product();
                    (n.to_string(), shape, (0..D * out).map(|_| rng.normal() / (D as f64).sqrt()).collect())
                })
                .collect();
            // A random rotation: Gram–Schmidt of a Gaussian matrix.
            let rotation = rotate.then(|| {
                let mut q: Vec<Vec<f64>> = (0..D).map(|_| (0..D).map(|_| rng.normal()).collect()).collect();
                for i in 0..D {
                    for j in 0..i {
                        let d: f64 = (0..D).map(|k| q[i][k] * q[j][k]).sum();
                        for k in 0..D {
                            q[i][k] -= d * q[j][k];
                        }
                    }
                    let n = q[i].iter().map(|x| x * x).sum::<f64>().sqrt();
                    q[i].iter_mut().for_each(|x| *x /= n);
                }
                q.concat()
            });
            World { stimuli, encoding, heads, rotation, rng, held_out: None }
        }

        fn betas(&mut self, stims: &[usize], imagery: bool) -> Vec<f32> {
            let mut out = Vec::new();
            for &s in stims {
                let mut l = self.stimuli[s].clone();
                if let (true, Some(r)) = (imagery, &self.rotation) {
                    l = (0..D).map(|i| (0..D).map(|k| r[i * D + k] * self.stimuli[s][k]).sum()).collect();
                }
                let (scale, noise, offset) = if imagery { (0.6, 1.4, 2.0) } else { (1.0, 1.0, 0.0) };
                for v in 0..V {
                    let signal: f64 = (0..D).map(|k| self.encoding[v * D + k] * l[k]).sum();
                    out.push((offset + scale * signal + noise * self.rng.normal()) as f32);
                }
            }
            out
        }

        fn targets(&self, stims: &[usize], head: usize) -> Vec<f32> {
            let (_, shape, w) = &self.heads[head];
            let out: usize = shape.iter().product();
            stims
                .iter()
                .flat_map(|&s| {
                    (0..out)
                        .map(move |o| (0..D).map(|k| self.stimuli[s][k] * w[k * out + o]).sum::<f64>() as f32)
                })
                .collect()
        }

        /// A decoder trained on 48 stimuli seen three times (low-rank heads with `rank`).
        fn decoder(&mut self, rank: Option<usize>) -> Decoder {
            self.decoder_with(rank, BTreeMap::new())
        }

        /// [`World::decoder`] with heads reading their own inputs.
        fn decoder_with(
            &mut self,
            rank: Option<usize>,
            head_inputs: BTreeMap<String, crate::decode::model::HeadInput>,
        ) -> Decoder {
            let stims: Vec<usize> = (0..48).flat_map(|s| [s, s, s]).collect();
            let x = self.betas(&stims, false);
            let targets: Vec<Targets> = (0..self.heads.len())
                .map(|h| Targets {
                    name: self.heads[h].0.clone(),
                    shape: self.heads[h].1.clone(),
                    values: self.targets(&stims, h),
                })
                .collect();
            let opts = TrainOptions { alpha: 300.0, rank, head_inputs, ..TrainOptions::default() };
            let trained = train(&x, stims.len(), V, &targets, &opts).unwrap();
            let (cfg, tensors) = trained.into_model(Default::default(), serde_json::Value::Null);
            let dev = Device::Cpu;
            let map: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|t| (t.name, Tensor::from_vec(t.values, t.shape, &dev).unwrap()))
                .collect();
            Decoder::new(cfg, &VarBuilder::from_tensors(map, DType::F32, &dev), &dev).unwrap()
        }

        /// Twelve calibration trials of stimuli 48–59.
        fn calibration(&mut self) -> CalibrationSet {
            let stims: Vec<usize> = (48..60).collect();
            CalibrationSet {
                betas: self.betas(&stims, true),
                stimuli: stims.iter().map(|s| s.to_string()).collect(),
                targets: (0..self.heads.len())
                    .map(|h| (self.heads[h].0.clone(), self.targets(&stims, h)))
                    .collect(),
                others: Vec::new(),
                condition: None,
            }
        }

        /// Mean over heads of the 2-way identification of imagery trials of stimuli 60–79
        /// (twice each; the same trials at every call), decoded through `adapter` with the
        /// run's own statistics.
        fn held_out_two_way(&mut self, decoder: &Decoder, adapter: &Adapter) -> f64 {
            let stims: Vec<usize> = (60..80).flat_map(|s| [s, s]).collect();
            if self.held_out.is_none() {
                self.held_out = Some(self.betas(&stims, true));
            }
            let x = self.held_out.clone().unwrap_or_default();
            let mut stats = crate::decode::align::RunStats::default();
            x.chunks_exact(V).for_each(|r| stats.push("eval", r));
            let (m, s) = stats.get().unwrap();
            let z =
                adapter.normalise(decoder, &decoder.input(&x, stims.len()).unwrap(), Some((&m, &s))).unwrap();
            let preds = decoder.predict_normalised(&z, adapter.adjusts()).unwrap();
            let mut total = 0.0;
            for (h, p) in preds.iter().enumerate() {
                let out = p.len() / stims.len();
                let rows = |v: &[f32]| v.chunks_exact(out).map(<[f32]>::to_vec).collect::<Vec<_>>();
                total += two_way(&rows(p), &rows(&self.targets(&stims, h)));
            }
            total / preds.len() as f64
        }
    }

    /// The baseline: centring on the run's mean only (an alignment with nothing kept).
    fn centred(decoder: &Decoder) -> Adapter {
        let n = decoder.cfg.n_voxels;
        let run = (vec![0.0; n], vec![1.0; n]);
        let nothing = vec![None; decoder.heads.len()];
        Adapter::Calibrated(
            Alignment::new(decoder, InputNorm::CentreRun, run, None, nothing, None, Value::Null).unwrap(),
        )
    }

    fn fit_world(
        seed: u64,
        rotate: bool,
        rank: Option<usize>,
    ) -> (World, Decoder, Alignment, TransferReport) {
        let mut w = World::new(seed, rotate);
        let decoder = w.decoder(rank);
        let set = w.calibration();
        let (a, r) = fit(&decoder, &set, &CalibrateConfig::default(), &mut |_| {}).unwrap();
        (w, decoder, a, r)
    }

    #[test]
    fn a_rotation_of_the_latent_space_is_learnt_from_twelve_trials() {
        for rank in [None, Some(4)] {
            let (mut w, decoder, alignment, report) = fit_world(3, true, rank);
            assert!(report.heads.iter().all(|h| h.kept), "{report:?}");
            let space = if rank.is_some() { "latent" } else { "output" };
            assert!(report.heads.iter().all(|h| h.space == space));
            let baseline = w.held_out_two_way(&decoder, &Adapter::ZscoreRun);
            let aligned = w.held_out_two_way(&decoder, &Adapter::Calibrated(alignment));
            eprintln!("rank {rank:?}: per-run z-scoring {baseline:.3}, calibrated {aligned:.3}");
            assert!(aligned > baseline + 0.1, "rank {rank:?}: {baseline:.3} → {aligned:.3}");
            // The report's estimate is held out: it says there is a gain, with its uncertainty.
            let est = report.two_way.as_ref().unwrap();
            assert!(est.gain.mean > 0.0 && est.gain.se > 0.0 && est.gain.n == 12);
        }
    }

    #[test]
    fn a_head_reading_l2_normalised_betas_keeps_its_baseline() {
        use crate::decode::model::HeadInput;
        let mut w = World::new(3, true);
        let names: Vec<String> = w.heads.iter().map(|h| h.0.clone()).collect();
        // The closed form's folds are affine in the betas, an L2-normalised head is not.
        let first = BTreeMap::from([(names[0].clone(), HeadInput::L2)]);
        let decoder = w.decoder_with(None, first);
        let (alignment, report) =
            fit(&decoder, &w.calibration(), &CalibrateConfig::default(), &mut |_| {}).unwrap();
        assert!(report.heads.iter().all(|h| h.head != names[0]) && !report.heads.is_empty(), "{report:?}");
        assert!(alignment.adjusts[0].is_none());
        let all = names.iter().map(|n| (n.clone(), HeadInput::L2)).collect();
        let decoder = w.decoder_with(None, all);
        let refused = fit(&decoder, &w.calibration(), &CalibrateConfig::default(), &mut |_| {});
        assert!(matches!(refused, Err(CalibrateError::Input(m)) if m.contains("l2")));
    }

    #[test]
    fn the_guard_keeps_the_baseline_when_nothing_is_learnable() {
        for seed in 1..=3 {
            let (mut w, decoder, alignment, report) = fit_world(seed, false, None);
            assert!(report.heads.iter().all(|h| !h.kept), "seed {seed}: {report:?}");
            assert!(alignment.adjusts.iter().all(Option::is_none));
            let input = report.input.as_ref().unwrap();
            // Seven candidates besides the baseline (two inputs × modes 0, 1, 2, 4).
            assert!((input.level - CalibrateConfig::default().guard_p / 7.0).abs() < 1e-12, "{input:?}");
            let baseline = w.held_out_two_way(&decoder, &centred(&decoder));
            let calibrated = w.held_out_two_way(&decoder, &Adapter::Calibrated(alignment));
            if !input.kept {
                assert_eq!((input.input, input.modes), (InputNorm::CentreRun, 0));
                assert!(
                    (calibrated - baseline).abs() < 1e-9,
                    "seed {seed}: {baseline} vs {calibrated}: {input:?}"
                );
            }
            assert!(calibrated > baseline - 0.015, "seed {seed}: {baseline:.3} → {calibrated:.3}");
        }
    }

    #[test]
    fn too_few_stimuli_zscore_the_run_and_say_why() {
        let mut w = World::new(5, true);
        let decoder = w.decoder(None);
        let mut set = w.calibration();
        // Eight: where the held-out estimate stopped being trustworthy (BENCHMARKS.md).
        let keep = 8;
        set.betas.truncate(keep * V);
        set.stimuli.truncate(keep);
        for (h, t) in set.targets.iter_mut() {
            let out = decoder.heads.iter().find(|x| &x.cfg.name == h).unwrap().cfg.n_outputs();
            t.truncate(keep * out);
        }
        let (a, r) = fit(&decoder, &set, &CalibrateConfig::default(), &mut |_| {}).unwrap();
        assert!(r.note.as_deref().unwrap_or("").contains("8 stimuli: at least 10"), "{r:?}");
        assert!(
            a.adjusts.iter().all(Option::is_none) && a.input == InputNorm::ZscoreRun && a.modes.is_none()
        );
    }

    #[test]
    fn the_fit_is_deterministic_and_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut fitted = Vec::new();
        for k in 0..2 {
            let (_, decoder, alignment, mut report) = fit_world(3, true, Some(4));
            let path = dir.path().join(format!("a{k}.safetensors"));
            alignment.save(&path, &decoder).unwrap();
            let back = Alignment::load(&path, &decoder).unwrap();
            // Everything but the wall time is the same from one fit to the next.
            report.seconds = 0.0;
            let tensors: Vec<Vec<f32>> = back
                .adjusts
                .iter()
                .flatten()
                .flat_map(|a| {
                    let (l, s, r) = a.factors().unwrap();
                    [l, s, r].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
                .collect();
            fitted.push((format!("{report:?}"), tensors));
            let z = Tensor::ones((2, V), DType::F32, &Device::Cpu).unwrap();
            let (a, b) = (
                decoder.predict_normalised(&z, &alignment.adjusts).unwrap(),
                decoder.predict_normalised(&z, &back.adjusts).unwrap(),
            );
            assert!(a == b, "the loaded alignment decodes as the fitted one");
        }
        assert!(fitted[0] == fitted[1], "two fits differ");
        assert!(!fitted[0].1.is_empty(), "nothing was fitted");
    }

    #[test]
    fn folds_leave_the_held_out_trials_out_of_the_run_mean_and_modes() {
        // Six run trials of four voxels, the first five calibration trials; 0 and 1 held out.
        let mut rng = Rng::new(9, 1);
        let z: Vec<Vec<f64>> = (0..6).map(|_| (0..4).map(|_| rng.normal()).collect()).collect();
        // The weights are over the run's trials centred on the whole run's mean.
        let mean_all: Vec<f64> = (0..4).map(|k| z.iter().map(|r| r[k]).sum::<f64>() / 6.0).collect();
        let zc: Vec<Vec<f64>> = z.iter().map(|r| (0..4).map(|k| r[k] - mean_all[k]).collect()).collect();
        let g = Mat::from_fn(6, 6, |i, j| (0..4).map(|k| zc[i][k] * zc[j][k]).sum::<f64>());
        let (w, modes) = fold_weights(&g, 5, &[0, 1], true, 1);
        // The run's mean without trials 0 and 1.
        let mean_rest: Vec<f64> = (0..4).map(|k| z[2..].iter().map(|r| r[k]).sum::<f64>() / 4.0).collect();
        // Mode: the top principal direction of calibration trials 2–4.
        let cal: Vec<Vec<f64>> = z[2..5].to_vec();
        let mean_cal: Vec<f64> = (0..4).map(|k| cal.iter().map(|r| r[k]).sum::<f64>() / 3.0).collect();
        let cov = Mat::from_fn(4, 4, |a, b| {
            cal.iter().map(|r| (r[a] - mean_cal[a]) * (r[b] - mean_cal[b])).sum::<f64>()
        });
        let eig = cov.self_adjoint_eigen(Side::Lower).unwrap();
        let top: Vec<f64> = (0..4).map(|k| eig.U()[(k, 3)]).collect();
        let mode: Vec<f64> = (0..4).map(|k| (0..6).map(|t| modes[(0, t)] * zc[t][k]).sum::<f64>()).collect();
        let align = (0..4).map(|k| mode[k] * top[k]).sum::<f64>().abs();
        assert!((align - 1.0).abs() < 1e-9, "mode {mode:?} vs {top:?}");
        for j in 0..5 {
            // Trial j normalised with the fold's mean, then the mode removed.
            let x: Vec<f64> = (0..4).map(|k| z[j][k] - mean_rest[k]).collect();
            let p: f64 = (0..4).map(|k| x[k] * top[k]).sum();
            let want: Vec<f64> = (0..4).map(|k| x[k] - p * top[k]).collect();
            let got: Vec<f64> = (0..4).map(|k| (0..6).map(|t| w[(j, t)] * zc[t][k]).sum::<f64>()).collect();
            for k in 0..4 {
                assert!((got[k] - want[k]).abs() < 1e-9, "trial {j}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn the_standard_error_is_the_larger_of_the_jackknife_and_the_corrected_resampled_one() {
        let folds = Folds { n_cal: 4, stim_of: vec![0, 1, 2, 3], n_stim: 4 };
        let pairs = folds.pairs();
        // Worked by hand: mean 1/6; spread over the six pairs 1/6, so the corrected resampled
        // variance is (1/6 + 2/2) · 1/6 = 7/36; leave-one-stimulus-out means 0, 0, 1/3, 1/3, so
        // the jackknife's is 3/4 · 4/36 = 1/12. The larger wins.
        let e = folds.estimate(&pairs, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(pairs, [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]);
        assert!((e.mean - 1.0 / 6.0).abs() < 1e-12, "{e:?}");
        assert!((e.se - (7.0f64 / 36.0).sqrt()).abs() < 1e-12, "{e:?}");
        assert_eq!(e.n, 4);
    }

    #[test]
    fn the_t_quantile_matches_tables() {
        // One-sided 0.9 and 0.95 quantiles (scipy.stats.t.ppf).
        for (q, df, want) in
            [(0.9, 4.0, 1.5332), (0.9, 11.0, 1.3634), (0.95, 5.0, 2.0150), (0.95, 23.0, 1.7139)]
        {
            let got = student_t_quantile(q, df);
            assert!((got - want).abs() < 0.01, "t({q}, {df}) = {got}, want {want}");
        }
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-6);
    }
}
