//! Exact incremental least squares over many voxels that share one design.
//!
//! Keeps `XᵀX` (p×p, updated with every row), `YᵀY` per voxel, and `XᵀY` (p × voxels). The
//! data rows are not added to `XᵀY` one by one — that would stream the whole p × voxels table
//! through memory every volume — but in batches of `batch` rows, folded in over the next
//! `batch` volumes one block of voxels at a time so the cost per volume stays flat. Rows not
//! yet folded are kept (always the newest `batch` at least), and every query adds them in, so
//! results are always those of all rows so far. Kept rows also let a column be added or
//! changed after the fact (a late event): its sums are exact as long as it is zero on rows
//! already folded.

use std::collections::VecDeque;

/// Voxels per fold block (a block of `XᵀY` rows stays in cache while a batch is added).
const BLOCK: usize = 4096;

/// A column changed on rows whose data were already folded away; its sums miss those rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("glm: a column changed on row {first_row}, already folded (event later than the late window)")]
pub struct LateChange {
    /// First folded row the change touched.
    pub first_row: usize,
}

struct Pending {
    ys: Vec<Vec<f32>>,
    next_block: usize,
    /// Volumes since folding began: after `k`, `k · blocks / batch` blocks are due.
    steps: usize,
}

/// Sufficient statistics of `Y ≈ X B` over all rows so far.
pub struct OlsStats {
    n_vox: usize,
    batch: usize,
    x: Vec<Vec<f64>>,
    xtx: Vec<Vec<f64>>,
    xty: Vec<Vec<f64>>,
    yty: Vec<f64>,
    folded_rows: usize,
    pending: Option<Pending>,
    open: VecDeque<Vec<f32>>,
    hold: bool,
}

impl OlsStats {
    /// Empty statistics for `n_vox` voxels, folding rows in batches of `batch`.
    pub fn new(n_vox: usize, batch: usize) -> OlsStats {
        OlsStats {
            n_vox,
            batch: batch.max(1),
            x: Vec::new(),
            xtx: Vec::new(),
            xty: Vec::new(),
            yty: vec![0.0; n_vox],
            folded_rows: 0,
            pending: None,
            open: VecDeque::new(),
            hold: false,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.x.len()
    }

    /// Number of columns.
    pub fn columns(&self) -> usize {
        self.xtx.len()
    }

    /// Number of voxels.
    pub fn voxels(&self) -> usize {
        self.n_vox
    }

    /// The stored design row `r`.
    pub fn row(&self, r: usize) -> &[f64] {
        &self.x[r]
    }

    /// `XᵀX`.
    pub fn xtx(&self) -> &[Vec<f64>] {
        &self.xtx
    }

    /// While held, no row is folded (every row's data stays available).
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
        self.schedule();
    }

    /// Rows `[0, n)` are folded away; changes to them cannot be applied exactly.
    pub fn folded_rows(&self) -> usize {
        self.folded_rows
    }

    /// The data of row `r` if it is still kept.
    pub fn kept_row(&self, r: usize) -> Option<&[f32]> {
        let i = r.checked_sub(self.folded_rows)?;
        let pending = self.pending.as_ref().map_or(0, |p| p.ys.len());
        if i < pending {
            self.pending.as_ref().map(|p| p.ys[i].as_slice())
        } else {
            self.open.get(i - pending).map(Vec::as_slice)
        }
    }

    /// Adds a row: design values `x` (one per column) and data `y` (one per voxel).
    pub fn push_row(&mut self, x: Vec<f64>, y: Vec<f32>) {
        debug_assert_eq!(x.len(), self.columns());
        debug_assert_eq!(y.len(), self.n_vox);
        for (i, xi) in x.iter().enumerate() {
            if *xi != 0.0 {
                for (j, xj) in x.iter().enumerate() {
                    self.xtx[i][j] += xi * xj;
                }
            }
        }
        self.yty.iter_mut().zip(&y).for_each(|(s, &v)| *s += f64::from(v) * f64::from(v));
        self.x.push(x);
        self.open.push_back(y);
        self.schedule();
        self.advance();
    }

    /// Sets column `j` (`j == columns()` appends one) to `values`, one per row so far.
    /// Returns `Err` when the column changed on folded rows (the change is applied to the rest).
    pub fn set_column(&mut self, j: usize, values: &[f64]) -> Result<(), LateChange> {
        assert!(j <= self.columns() && values.len() == self.rows());
        if j == self.columns() {
            for r in &mut self.x {
                r.push(0.0);
            }
            for row in &mut self.xtx {
                row.push(0.0);
            }
            self.xtx.push(vec![0.0; j + 1]);
            self.xty.push(vec![0.0; self.n_vox]);
        }
        let delta: Vec<f64> = values.iter().zip(&self.x).map(|(v, row)| v - row[j]).collect();
        for (row, v) in self.x.iter_mut().zip(values) {
            row[j] = *v;
        }
        let p = self.columns();
        for k in 0..p {
            let s: f64 = self.x.iter().map(|row| row[j] * row[k]).sum();
            self.xtx[j][k] = s;
            self.xtx[k][j] = s;
        }
        // XᵀY: rows folded in an already-folded block must be corrected now.
        let mut late = None;
        for (r, d) in delta.iter().enumerate().take(self.folded_rows) {
            if *d != 0.0 && late.is_none() {
                late = Some(r);
            }
        }
        if let Some(p) = &self.pending {
            let done = (p.next_block * BLOCK).min(self.n_vox);
            for (i, y) in p.ys.iter().enumerate() {
                let d = delta[self.folded_rows + i];
                if d != 0.0 {
                    axpy(&mut self.xty[j][..done], d, &y[..done]);
                }
            }
        }
        match late {
            Some(first_row) => Err(LateChange { first_row }),
            None => Ok(()),
        }
    }

    /// Moves the oldest `batch` open rows into folding once `2·batch` are open, so the newest
    /// `batch` rows are always kept.
    fn schedule(&mut self) {
        if self.pending.is_none() && !self.hold && self.open.len() >= 2 * self.batch {
            let ys: Vec<Vec<f32>> = self.open.drain(..self.batch).collect();
            self.pending = Some(Pending { ys, next_block: 0, steps: 0 });
        }
    }

    /// Folds the next share of the pending batch: blocks fall due evenly over `batch` volumes.
    fn advance(&mut self) {
        let n_blocks = self.n_vox.div_ceil(BLOCK);
        let Some(p) = &mut self.pending else { return };
        p.steps += 1;
        let due = (p.steps * n_blocks).div_ceil(self.batch).min(n_blocks);
        while p.next_block < due {
            let (lo, hi) = (p.next_block * BLOCK, ((p.next_block + 1) * BLOCK).min(self.n_vox));
            for (j, xty) in self.xty.iter_mut().enumerate() {
                for (i, y) in p.ys.iter().enumerate() {
                    let xj = self.x[self.folded_rows + i][j];
                    if xj != 0.0 {
                        axpy(&mut xty[lo..hi], xj, &y[lo..hi]);
                    }
                }
            }
            p.next_block += 1;
        }
        if p.next_block >= n_blocks {
            self.folded_rows += p.ys.len();
            self.pending = None;
            self.schedule();
        }
    }

    /// `Σ_k w_k (XᵀY)_k` over every row so far: one linear combination of the columns'
    /// cross-products for every voxel (with `w = (XᵀX)⁻¹ e_j` this is column `j`'s betas).
    pub fn combine(&self, w: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.n_vox];
        for (k, wk) in w.iter().enumerate() {
            if *wk != 0.0 {
                axpy(&mut out, *wk, &self.xty[k]);
            }
        }
        let coef = |r: usize| -> f64 { self.x[r].iter().zip(w).map(|(a, b)| a * b).sum() };
        if let Some(p) = &self.pending {
            let done = (p.next_block * BLOCK).min(self.n_vox);
            for (i, y) in p.ys.iter().enumerate() {
                axpy(&mut out[done..], coef(self.folded_rows + i), &y[done..]);
            }
        }
        let first_open = self.folded_rows + self.pending.as_ref().map_or(0, |p| p.ys.len());
        for (i, y) in self.open.iter().enumerate() {
            axpy(&mut out, coef(first_open + i), y);
        }
        out
    }

    /// `YᵀY` per voxel.
    pub fn yty(&self) -> &[f64] {
        &self.yty
    }
}

/// `dst += a · src`, with AVX2/FMA where the CPU has them (the hot loop of the GLM).
#[inline]
fn axpy<S: Copy + Into<f64>>(dst: &mut [f64], a: f64, src: &[S]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { axpy_avx2(dst, a, src) };
    }
    axpy_portable(dst, a, src);
}

#[inline(always)]
fn axpy_portable<S: Copy + Into<f64>>(dst: &mut [f64], a: f64, src: &[S]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += a * s.into());
}

/// The same loop compiled for AVX2 and FMA (four f64 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2<S: Copy + Into<f64>>(dst: &mut [f64], a: f64, src: &[S]) {
    axpy_portable(dst, a, src);
}

/// A Cholesky factor of `XᵀX` that skips columns dependent on earlier ones (not estimable).
#[derive(Clone, Debug)]
pub struct Factor {
    l: Vec<Vec<f64>>,
    /// Whether each column is estimable (independent of the columns before it).
    pub estimable: Vec<bool>,
}

/// A column whose squared norm left after the earlier ones is below this fraction of its own
/// is not estimable.
const RANK_TOLERANCE: f64 = 1e-10;

impl Factor {
    /// Factors a symmetric positive semi-definite matrix.
    pub fn new(a: &[Vec<f64>]) -> Factor {
        let p = a.len();
        let mut l = vec![vec![0.0; p]; p];
        let mut estimable = vec![false; p];
        for i in 0..p {
            let s = a[i][i] - (0..i).map(|k| l[i][k] * l[i][k]).sum::<f64>();
            if a[i][i] <= 0.0 || s.is_nan() || s <= RANK_TOLERANCE * a[i][i] {
                continue;
            }
            estimable[i] = true;
            l[i][i] = s.sqrt();
            for r in i + 1..p {
                l[r][i] = (a[r][i] - (0..i).map(|k| l[r][k] * l[i][k]).sum::<f64>()) / l[i][i];
            }
        }
        Factor { l, estimable }
    }

    /// Solves `A x = b` on the estimable columns (the others get 0).
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let p = self.l.len();
        let mut y = vec![0.0; p];
        for i in (0..p).filter(|&i| self.estimable[i]) {
            y[i] = (b[i] - (0..i).map(|k| self.l[i][k] * y[k]).sum::<f64>()) / self.l[i][i];
        }
        let mut x = vec![0.0; p];
        for i in (0..p).rev().filter(|&i| self.estimable[i]) {
            x[i] = (y[i] - (i + 1..p).map(|k| self.l[k][i] * x[k]).sum::<f64>()) / self.l[i][i];
        }
        x
    }

    /// Number of estimable columns.
    pub fn rank(&self) -> usize {
        self.estimable.iter().filter(|e| **e).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct least squares of a small problem by normal equations in full.
    fn direct(x: &[Vec<f64>], y: &[Vec<f32>], j: usize) -> Vec<f64> {
        let p = x[0].len();
        let mut xtx = vec![vec![0.0; p]; p];
        for r in x {
            for a in 0..p {
                for b in 0..p {
                    xtx[a][b] += r[a] * r[b];
                }
            }
        }
        let f = Factor::new(&xtx);
        let mut e = vec![0.0; p];
        e[j] = 1.0;
        let w = f.solve(&e);
        (0..y[0].len())
            .map(|v| {
                x.iter()
                    .zip(y)
                    .map(|(r, yr)| w.iter().zip(r).map(|(a, b)| a * b).sum::<f64>() * f64::from(yr[v]))
                    .sum()
            })
            .collect()
    }

    #[test]
    fn batched_folding_equals_direct_least_squares_at_every_row() {
        let n_vox = 3 * BLOCK + 17;
        let mut stats = OlsStats::new(n_vox, 4);
        for _ in 0..3 {
            stats.set_column(stats.columns(), &[]).unwrap();
        }
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for t in 0..23 {
            let tf = t as f64;
            let x = vec![1.0, tf / 10.0, (tf * 0.7).sin()];
            let y: Vec<f32> = (0..n_vox)
                .map(|v| v as f32 * 0.01 + 2.0 * (t as f32 * 0.7).sin() + ((v * 7 + t) % 5) as f32 * 0.1)
                .collect();
            stats.push_row(x.clone(), y.clone());
            xs.push(x);
            ys.push(y);
            if t >= 3 {
                let f = Factor::new(stats.xtx());
                let w = f.solve(&[0.0, 0.0, 1.0]);
                let got = stats.combine(&w);
                let want = direct(&xs, &ys, 2);
                for v in [0, BLOCK - 1, BLOCK, 2 * BLOCK + 5, n_vox - 1] {
                    assert!(
                        (got[v] - want[v]).abs() < 1e-9 * want[v].abs().max(1.0),
                        "t={t} v={v}: {} vs {}",
                        got[v],
                        want[v]
                    );
                }
            }
        }
        assert!(stats.folded_rows() >= 12);
    }

    #[test]
    fn a_column_added_late_is_exact_within_the_kept_rows_and_flagged_beyond() {
        let n_vox = BLOCK + 3;
        let mut stats = OlsStats::new(n_vox, 4);
        stats.set_column(0, &[]).unwrap();
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for t in 0..14 {
            let y: Vec<f32> =
                (0..n_vox).map(|v| 1.0 + if t >= 10 { 3.0 + v as f32 * 1e-3 } else { 0.0 }).collect();
            stats.push_row(vec![1.0], y.clone());
            xs.push(vec![1.0]);
            ys.push(y);
        }
        // A regressor that is on from row 10: rows 10.. are still kept.
        let col: Vec<f64> = (0..14).map(|t| if t >= 10 { 1.0 } else { 0.0 }).collect();
        assert!(stats.folded_rows() <= 10, "{}", stats.folded_rows());
        stats.set_column(1, &col).unwrap();
        xs.iter_mut().zip(&col).for_each(|(r, c)| r.push(*c));
        let w = Factor::new(stats.xtx()).solve(&[0.0, 1.0]);
        let got = stats.combine(&w);
        let want = direct(&xs, &ys, 1);
        assert!((got[7] - want[7]).abs() < 1e-9 && (got[7] - 3.007).abs() < 1e-4, "{} {}", got[7], want[7]);
        // One that was on from row 0 touches folded rows: flagged.
        let early: Vec<f64> = (0..14).map(|t| t as f64).collect();
        assert_eq!(stats.set_column(2, &early), Err(LateChange { first_row: 1 }));
    }

    #[test]
    fn dependent_columns_are_not_estimable() {
        let a = vec![vec![4.0, 2.0, 0.0], vec![2.0, 1.0, 0.0], vec![0.0, 0.0, 0.0]];
        let f = Factor::new(&a);
        assert_eq!(f.estimable, vec![true, false, false]);
        let x = f.solve(&[8.0, 4.0, 1.0]);
        assert_eq!(x, vec![2.0, 0.0, 0.0]);
        assert!(x.iter().all(|v| v.is_finite()));
    }
}
