//! Closed-form ridge regression per head, as sklearn's `Ridge(alpha, fit_intercept=True)` on
//! z-scored betas (MIRAGE's recipe), optionally reduced to low rank, written as a model folder.
//!
//! With `n` trials and `v` voxels the solve uses the smaller Gram matrix: for `n ≤ v`,
//! `W = Zᵀ (Z Zᵀ + αI)⁻¹ Y`, else `W = (ZᵀZ + αI)⁻¹ Zᵀ Y` (Cholesky, faer); `Z` and `Y` are
//! centred so the intercept is the target mean. A rank-`r` head keeps the best rank-`r`
//! approximation of the training predictions (reduced-rank ridge): with `V_r` the top right
//! singular vectors of `Z W`, `down = (W V_r)ᵀ` and `up = V_r`.

use std::collections::BTreeMap;
use std::path::Path;

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::solvers::{Llt, Solve};
use faer::{get_global_parallelism, Accum, Mat, Side};
use indicatif::{ProgressBar, ProgressStyle};

use super::model::{
    write_f32_safetensors, FusionConfig, HeadConfig, HeadInput, ModelConfig, CONFIG_FILE, FORMAT,
    WEIGHTS_FILE,
};
use super::DecodeError;

/// Training options.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Ridge penalty (MIRAGE: 1e5); with `cv_alphas` the candidates to choose from.
    pub alpha: f64,
    /// Candidate penalties for k-fold cross-validation (empty: use `alpha`).
    pub cv_alphas: Vec<f64>,
    /// Folds for cross-validation.
    pub cv_folds: usize,
    /// Rank of every head with more outputs than this (`None`: full heads).
    pub rank: Option<usize>,
    /// Z-score the betas with their training mean and standard deviation.
    pub zscore: bool,
    /// Heads that read other than the z-scored betas (`l2`: each trial scaled to unit norm
    /// after z-scoring; `none`: the betas as given).
    pub head_inputs: BTreeMap<String, HeadInput>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for TrainOptions {
    fn default() -> TrainOptions {
        TrainOptions {
            alpha: 1e5,
            cv_alphas: Vec::new(),
            cv_folds: 5,
            rank: None,
            zscore: true,
            head_inputs: BTreeMap::new(),
            progress: false,
        }
    }
}

/// Training targets of one head: `n × n_outputs` values (row-major) and the output shape.
#[derive(Clone, Debug)]
pub struct Targets {
    /// Head name.
    pub name: String,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Values, one row per trial.
    pub values: Vec<f32>,
}

/// What training produced for one head.
#[derive(Clone, Debug)]
pub struct FittedHead {
    /// Description.
    pub cfg: HeadConfig,
    /// Penalty used.
    pub alpha: f64,
    /// `[out, v]` (full) or `None`.
    pub weight: Option<Vec<f32>>,
    /// `[r, v]` and `[out, r]` (low rank) or `None`.
    pub low_rank: Option<(Vec<f32>, Vec<f32>)>,
    /// `[out]`.
    pub bias: Vec<f32>,
    /// Renormalisation statistics `[out]` each: prediction mean/std on the training trials and
    /// target mean/std.
    pub stats: [Vec<f32>; 4],
    /// `[out, out]` correlation of the standardised training predictions (heads of at most
    /// [`MAX_CORR_OUTPUTS`] outputs): the seen statistics calibration aligns imagery to.
    pub pred_corr: Option<Vec<f32>>,
}

/// Largest head whose prediction correlation matrix is stored.
pub const MAX_CORR_OUTPUTS: usize = 1024;

/// Correlation matrix of the columns of `x` (`n × m`, centred), row-major.
fn correlation(x: &Mat<f64>) -> Vec<f32> {
    let m = x.ncols();
    let cov = x.transpose() * x;
    let sd: Vec<f64> = (0..m).map(|j| cov[(j, j)].sqrt().max(1e-300)).collect();
    (0..m * m).map(|k| (cov[(k / m, k % m)] / (sd[k / m] * sd[k % m])) as f32).collect()
}

/// A trained model, ready to write.
#[derive(Clone, Debug)]
pub struct Trained {
    /// Voxel means and standard deviations used for z-scoring.
    pub input: (Vec<f32>, Vec<f32>),
    /// The heads.
    pub heads: Vec<FittedHead>,
}

/// A progress bar on stderr (hidden when `show` is false).
pub fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Column means and (population) standard deviations of an `n × v` matrix; zero spreads
/// become 1 (as sklearn's `StandardScaler`).
fn column_stats(x: &[f32], n: usize, v: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0; v];
    for row in x.chunks_exact(v) {
        mean.iter_mut().zip(row).for_each(|(m, &x)| *m += f64::from(x));
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0.0; v];
    for row in x.chunks_exact(v) {
        var.iter_mut().zip(row).zip(&mean).for_each(|((s, &x), m)| *s += (f64::from(x) - m).powi(2));
    }
    let std = var.into_iter().map(|s| (s / n as f64).sqrt()).map(|s| if s > 0.0 { s } else { 1.0 }).collect();
    (mean, std)
}

/// The ridge system of centred inputs `z` (n × v): the Gram matrix (`Z Zᵀ` when n ≤ v, the
/// dual form, else `ZᵀZ`), lower triangle only, and its Cholesky factor per penalty, so every
/// head and target sharing a penalty shares one factorisation.
struct RidgeSystem<'a> {
    z: &'a Mat<f64>,
    gram: Mat<f64>,
    factors: Vec<(f64, Llt<f64>)>,
}

impl<'a> RidgeSystem<'a> {
    fn new(z: &'a Mat<f64>) -> RidgeSystem<'a> {
        let (n, v) = (z.nrows(), z.ncols());
        let m = n.min(v);
        let mut gram = Mat::zeros(m, m);
        let (lhs, rhs) = if n <= v { (z.as_ref(), z.transpose()) } else { (z.transpose(), z.as_ref()) };
        triangular::matmul(
            gram.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            lhs,
            BlockStructure::Rectangular,
            rhs,
            BlockStructure::Rectangular,
            1.0,
            get_global_parallelism(),
        );
        RidgeSystem { z, gram, factors: Vec::new() }
    }

    /// The ridge weights (v × out) for centred targets `y` (n × out).
    fn solve(&mut self, y: &Mat<f64>, alpha: f64) -> Result<Mat<f64>, DecodeError> {
        let at = match self.factors.iter().position(|(a, _)| *a == alpha) {
            Some(i) => i,
            None => {
                let mut g = self.gram.clone();
                for i in 0..g.nrows() {
                    g[(i, i)] += alpha;
                }
                let llt = g.llt(Side::Lower).map_err(|_| {
                    DecodeError::Train(format!("the ridge system is singular (alpha {alpha})"))
                })?;
                self.factors.push((alpha, llt));
                self.factors.len() - 1
            }
        };
        let llt = &self.factors[at].1;
        if self.z.nrows() <= self.z.ncols() {
            let mut a = y.clone();
            llt.solve_in_place(&mut a);
            Ok(self.z.transpose() * &a)
        } else {
            let mut w = self.z.transpose() * y;
            llt.solve_in_place(&mut w);
            Ok(w)
        }
    }
}

fn centred(values: &[f32], n: usize, cols: usize) -> (Mat<f64>, Vec<f64>) {
    let mut mean = vec![0.0; cols];
    for row in values.chunks_exact(cols) {
        mean.iter_mut().zip(row).for_each(|(m, &x)| *m += f64::from(x));
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    (Mat::from_fn(n, cols, |i, j| f64::from(values[i * cols + j]) - mean[j]), mean)
}

/// Mean over outputs of the Pearson correlation between columns of `a` and `b`.
fn mean_correlation(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    let (n, m) = (a.nrows(), a.ncols());
    let mut total = 0.0;
    for j in 0..m {
        let (ma, mb) = (
            (0..n).map(|i| a[(i, j)]).sum::<f64>() / n as f64,
            (0..n).map(|i| b[(i, j)]).sum::<f64>() / n as f64,
        );
        let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
        for i in 0..n {
            let (da, db) = (a[(i, j)] - ma, b[(i, j)] - mb);
            sab += da * db;
            saa += da * da;
            sbb += db * db;
        }
        total += if saa > 0.0 && sbb > 0.0 { sab / (saa * sbb).sqrt() } else { 0.0 };
    }
    total / m.max(1) as f64
}

/// Picks the penalty with the best mean held-out correlation over `folds` folds; each fold's
/// Gram matrix is computed once for all penalties.
fn cross_validate(z: &Mat<f64>, y: &Mat<f64>, alphas: &[f64], folds: usize) -> Result<f64, DecodeError> {
    let n = z.nrows();
    let folds = folds.clamp(2, n.max(2));
    let mut scores = vec![0.0; alphas.len()];
    let pick = |m: &Mat<f64>, rows: &[usize]| Mat::from_fn(rows.len(), m.ncols(), |i, j| m[(rows[i], j)]);
    let col_means = |m: &Mat<f64>| -> Vec<f64> {
        (0..m.ncols()).map(|j| (0..m.nrows()).map(|i| m[(i, j)]).sum::<f64>() / m.nrows() as f64).collect()
    };
    for f in 0..folds {
        let test: Vec<usize> = (0..n).filter(|i| i % folds == f).collect();
        let train: Vec<usize> = (0..n).filter(|i| i % folds != f).collect();
        let (zt, yt) = (pick(z, &train), pick(y, &train));
        // Re-centre on the training fold.
        let (zm, ym) = (col_means(&zt), col_means(&yt));
        let zc = Mat::from_fn(zt.nrows(), zt.ncols(), |i, j| zt[(i, j)] - zm[j]);
        let yc = Mat::from_fn(yt.nrows(), yt.ncols(), |i, j| yt[(i, j)] - ym[j]);
        let zh = Mat::from_fn(test.len(), z.ncols(), |i, j| z[(test[i], j)] - zm[j]);
        let y_test = pick(y, &test);
        let mut system = RidgeSystem::new(&zc);
        for (score, &alpha) in scores.iter_mut().zip(alphas) {
            let w = system.solve(&yc, alpha)?;
            *score += mean_correlation(&(&zh * &w), &y_test);
        }
    }
    // The first of equal scores wins.
    let best = scores.iter().enumerate().fold(0, |best, (i, s)| if *s > scores[best] { i } else { best });
    Ok(alphas[best])
}

/// Mean (plus `bias`) and sample standard deviation of each column of `x`: renormalisation statistics.
fn spread(x: &Mat<f64>, bias: &[f64]) -> (Vec<f32>, Vec<f32>) {
    let (n, m) = (x.nrows(), x.ncols());
    let mut mean = vec![0f32; m];
    let mut std = vec![1f32; m];
    for j in 0..m {
        let mu = (0..n).map(|i| x[(i, j)]).sum::<f64>() / n as f64;
        let var = (0..n).map(|i| (x[(i, j)] - mu).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
        mean[j] = (mu + bias[j]) as f32;
        std[j] = if var > 0.0 { var.sqrt() as f32 } else { 1.0 };
    }
    (mean, std)
}

/// Fits every head on betas `x` (`n × v`, row-major).
pub fn train(
    x: &[f32],
    n: usize,
    v: usize,
    targets: &[Targets],
    opts: &TrainOptions,
) -> Result<Trained, DecodeError> {
    if n < 2 || x.len() != n * v {
        return Err(DecodeError::Train(format!(
            "{} betas for {n} trials × {v} voxels (need at least 2 trials)",
            x.len()
        )));
    }
    if let Some(i) = x.iter().position(|b| !b.is_finite()) {
        return Err(DecodeError::Train(format!("beta {} of trial {} is not finite", i % v, i / v)));
    }
    if let Some(name) = opts.head_inputs.keys().find(|h| !targets.iter().any(|t| &t.name == *h)) {
        return Err(DecodeError::Train(format!("--head-input names {name:?}, which has no targets")));
    }
    // Without z-scoring the betas are still centred (std 1), so the intercept is the target mean.
    let (mean, mut std) = column_stats(x, n, v);
    if !opts.zscore {
        std.fill(1.0);
    }
    let progress = bar(opts.progress, 1 + targets.len() as u64, "z-scoring");
    let zf: Vec<f32> = x
        .chunks_exact(v)
        .flat_map(|row| row.iter().zip(&mean).zip(&std).map(|((b, m), s)| ((f64::from(*b) - m) / s) as f32))
        .collect();
    // Each input kind's training matrix (columns centred, so the intercept is the target mean
    // less the columns' means through the weights), then its ridge system, made once.
    let input_of = |t: &Targets| opts.head_inputs.get(&t.name).copied().unwrap_or_default();
    let mut matrices: BTreeMap<HeadInput, (Mat<f64>, Vec<f64>)> = BTreeMap::new();
    for input in targets.iter().map(input_of) {
        if matrices.contains_key(&input) {
            continue;
        }
        let rows: std::borrow::Cow<[f32]> = match input {
            HeadInput::Zscore => (&zf[..]).into(),
            HeadInput::None => x.into(),
            HeadInput::L2 => zf
                .chunks_exact(v)
                .flat_map(|row| {
                    let norm = row.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt().max(1e-12);
                    row.iter().map(move |a| (f64::from(*a) / norm) as f32)
                })
                .collect::<Vec<f32>>()
                .into(),
        };
        matrices.insert(input, centred(&rows, n, v));
    }
    // One ridge system per input kind, with its matrix and column means.
    let mut systems: BTreeMap<HeadInput, (RidgeSystem, &Mat<f64>, &[f64])> =
        matrices.iter().map(|(k, (u, mean))| (*k, (RidgeSystem::new(u), u, mean.as_slice()))).collect();
    progress.inc(1);
    let mut heads = Vec::with_capacity(targets.len());
    for t in targets {
        let input = input_of(t);
        let (system, z, z_mean) = systems
            .get_mut(&input)
            .ok_or_else(|| DecodeError::Train(format!("no ridge system for input {input:?}")))?;
        let (z, z_mean) = (*z, *z_mean);
        progress.set_message(t.name.clone());
        let out: usize = t.shape.iter().product();
        if out == 0 || t.values.len() != n * out {
            return Err(DecodeError::Train(format!(
                "targets {}: {} values for {n} trials of shape {:?}",
                t.name,
                t.values.len(),
                t.shape
            )));
        }
        if let Some(i) = t.values.iter().position(|b| !b.is_finite()) {
            return Err(DecodeError::Train(format!("targets {}: value {i} is not finite", t.name)));
        }
        let (y, y_mean) = centred(&t.values, n, out);
        let alpha = if opts.cv_alphas.is_empty() {
            opts.alpha
        } else {
            cross_validate(z, &y, &opts.cv_alphas, opts.cv_folds)?
        };
        let w = system.solve(&y, alpha)?; // v × out
        let fitted = z * &w; // n × out, centred
        let rank = opts.rank.filter(|r| *r < out && *r < n);
        let (weight, low_rank, fitted, projected) = match rank {
            None => (
                Some(
                    (0..out)
                        .flat_map(|o| (0..v).map(move |j| (o, j)))
                        .map(|(o, j)| w[(j, o)] as f32)
                        .collect(),
                ),
                None,
                fitted,
                None,
            ),
            Some(r) => {
                let svd = fitted
                    .thin_svd()
                    .map_err(|_| DecodeError::Train(format!("SVD of head {} failed", t.name)))?;
                let vr = svd.V().subcols(0, r).to_owned(); // out × r
                let down = &w * &vr; // v × r
                let down_t: Vec<f32> = (0..r)
                    .flat_map(|k| (0..v).map(move |j| (k, j)))
                    .map(|(k, j)| down[(j, k)] as f32)
                    .collect();
                let up: Vec<f32> = (0..out)
                    .flat_map(|o| (0..r).map(move |k| (o, k)))
                    .map(|(o, k)| vr[(o, k)] as f32)
                    .collect();
                let reduced = &fitted * &vr * vr.transpose();
                let projected = &down * vr.transpose();
                (None, Some((down_t, up)), reduced, Some(projected))
            }
        };
        // The intercept at the input's training mean: ȳ − ūᵀW (ū = 0 for z-scored betas), W the
        // map the head keeps.
        let shift = Mat::from_fn(1, v, |_, j| z_mean[j]) * projected.as_ref().unwrap_or(&w);
        let bias: Vec<f32> = (0..out).map(|o| (y_mean[o] - shift[(0, o)]) as f32).collect();
        let (pred_mean, pred_std) = spread(&fitted, &y_mean);
        let (target_mean, target_std) = spread(&y, &y_mean);
        heads.push(FittedHead {
            cfg: HeadConfig { name: t.name.clone(), shape: t.shape.clone(), rank, renorm: true, input },
            alpha,
            weight,
            low_rank,
            bias,
            stats: [pred_mean, pred_std, target_mean, target_std],
            pred_corr: (out <= MAX_CORR_OUTPUTS).then(|| correlation(&fitted)),
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(Trained {
        input: (mean.iter().map(|m| *m as f32).collect(), std.iter().map(|s| *s as f32).collect()),
        heads,
    })
}

/// A named f32 array, row-major: a tensor to write or an array read from `.npy`/`.npz`.
pub struct NamedTensor {
    /// Name in the safetensors file.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Writes `config.json` and `model.safetensors` into `dir` (created).
pub fn write_model(dir: &Path, cfg: &ModelConfig, tensors: Vec<NamedTensor>) -> Result<(), DecodeError> {
    let err = |e: String| DecodeError::Model(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let views: Vec<(&str, Vec<usize>, &[f32])> =
        tensors.iter().map(|t| (t.name.as_str(), t.shape.clone(), t.values.as_slice())).collect();
    write_f32_safetensors(&dir.join(WEIGHTS_FILE), &views, None).map_err(err)?;
    let text = serde_json::to_string_pretty(cfg).map_err(|e| err(e.to_string()))?;
    std::fs::write(dir.join(CONFIG_FILE), text).map_err(|e| err(e.to_string()))
}

impl Trained {
    /// The model folder contents: configuration (with `fusion` and `provenance`) and tensors.
    pub fn into_model(
        self,
        fusion: FusionConfig,
        provenance: serde_json::Value,
    ) -> (ModelConfig, Vec<NamedTensor>) {
        let v = self.input.0.len();
        let mut tensors = vec![
            NamedTensor { name: "input.mean".into(), shape: vec![v], values: self.input.0 },
            NamedTensor { name: "input.std".into(), shape: vec![v], values: self.input.1 },
        ];
        let mut heads = Vec::new();
        let mut alphas = BTreeMap::new();
        for h in self.heads {
            let out = h.cfg.n_outputs();
            let name = &h.cfg.name;
            let mut put = |suffix: &str, shape: Vec<usize>, values: Vec<f32>| {
                tensors.push(NamedTensor { name: format!("heads.{name}.{suffix}"), shape, values })
            };
            if let Some(w) = h.weight {
                put("weight", vec![out, v], w);
            }
            if let Some((down, up)) = h.low_rank {
                let r = down.len() / v;
                put("down", vec![r, v], down);
                put("up", vec![out, r], up);
            }
            put("bias", vec![out], h.bias);
            let [pm, ps, tm, ts] = h.stats;
            put("pred_mean", vec![out], pm);
            put("pred_std", vec![out], ps);
            put("target_mean", vec![out], tm);
            put("target_std", vec![out], ts);
            if let Some(corr) = h.pred_corr {
                put("pred_corr", vec![out, out], corr);
            }
            alphas.insert(h.cfg.name.clone(), h.alpha);
            heads.push(h.cfg);
        }
        let mut provenance = provenance;
        if let serde_json::Value::Object(m) = &mut provenance {
            m.insert("alpha".into(), serde_json::json!(alphas));
        }
        let cfg =
            ModelConfig { format: FORMAT.into(), n_voxels: v, zscore_input: true, heads, fusion, provenance };
        (cfg, tensors)
    }
}
