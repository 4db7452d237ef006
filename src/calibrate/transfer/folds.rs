//! The folds: calibration trials by stimulus, the pairs of stimuli held out together, the
//! weights that give a fold's inputs, and the held-out estimate with its standard error.

use faer::{Mat, Side};

use super::report::Estimate;

/// The calibration trials' stimuli, and the pairs of stimuli held out together.
pub(super) struct Folds {
    pub(super) n_cal: usize,
    pub(super) stim_of: Vec<usize>,
    pub(super) n_stim: usize,
}

impl Folds {
    /// The folds of the `n_cal` calibration trials showing `stimuli`, the stimuli numbered in
    /// order of first appearance.
    pub(super) fn of_stimuli(n_cal: usize, stimuli: &[String]) -> Folds {
        let mut names: Vec<&String> = Vec::new();
        let stim_of: Vec<usize> = stimuli
            .iter()
            .map(|s| match names.iter().position(|x| *x == s) {
                Some(i) => i,
                None => {
                    names.push(s);
                    names.len() - 1
                }
            })
            .collect();
        Folds { n_cal, stim_of, n_stim: names.len() }
    }

    pub(super) fn trials_of(&self, stims: &[usize]) -> Vec<usize> {
        (0..self.n_cal).filter(|&j| stims.contains(&self.stim_of[j])).collect()
    }

    pub(super) fn trials_without(&self, stims: &[usize]) -> Vec<usize> {
        (0..self.n_cal).filter(|&j| !stims.contains(&self.stim_of[j])).collect()
    }

    /// Every pair of stimuli.
    pub(super) fn pairs(&self) -> Vec<[usize; 2]> {
        (0..self.n_stim).flat_map(|a| (a + 1..self.n_stim).map(move |b| [a, b])).collect()
    }

    /// Disjoint pairs of the stimuli not in `held`, each stimulus in one or two of them (a
    /// ring), for choices nested inside a held-out pair.
    pub(super) fn inner_pairs(&self, held: &[usize]) -> Vec<[usize; 2]> {
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
    pub(super) fn estimate(&self, pairs: &[[usize; 2]], v: &[f64]) -> Estimate {
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
pub(super) fn fold_weights(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

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
}
