//! One head's Gram blocks for one fold, the vectors they score, and the kernel ridge
//! correction fitted on them.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use super::space::HeadSide;

/// Coefficients of a vector over one candidate's trial predictions and the stimuli's targets.
#[derive(Clone)]
pub(super) struct Vector {
    pub(super) trials: Vec<f64>,
    pub(super) targets: Vec<f64>,
}

/// One head's Gram blocks for one fold's inputs: trial predictions × trial predictions,
/// × targets, and targets × targets.
pub(super) struct Blocks {
    pub(super) aa: Mat<f64>,
    pub(super) at: Mat<f64>,
    pub(super) tt: Mat<f64>,
}

impl Blocks {
    pub(super) fn new(head: &HeadSide, input: usize, n_run: usize, n_stim: usize, w: &Mat<f64>) -> Blocks {
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
    pub(super) fn plain(&self, j: usize) -> Vector {
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
    pub(super) fn identify(&self, v: &Vector, own: usize, other: usize) -> (f64, f64) {
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
pub(super) struct Ridge {
    train: Vec<usize>,
    pub(super) llt: faer::linalg::solvers::Llt<f64>,
}

impl Ridge {
    pub(super) fn fit(b: &Blocks, train: &[usize], alpha: f64) -> Option<Ridge> {
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

    pub(super) fn correct(&self, b: &Blocks, j: usize, stim_of: &[usize]) -> Vector {
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
