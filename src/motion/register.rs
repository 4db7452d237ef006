//! Rigid registration of a volume to a prepared reference: inverse-compositional Gauss–Newton
//! on the sum of squared differences, coarse to fine.
//!
//! Everything the reference alone determines is computed once ([`Reference::prepare`]): an
//! image pyramid (2×2×2 means), a brain mask per level, and per masked voxel its position, value
//! and steepest-descent row `∇R · ∂W/∂p`, with the 6×6 Gauss–Newton matrix `H = Σ SDᵀSD`.
//! At full resolution both images are read as cubic B-spline *approximations* (the samples
//! themselves as spline coefficients): a smoothing by the cubic B-spline kernel whose second
//! moment is the same at every sub-voxel offset, so it does not bias the estimate the way
//! trilinear interpolation's offset-dependent blur does, and it needs no prefilter. Coarser
//! levels use trilinear interpolation.
//! Each iteration then costs one trilinear sample of the moving volume per masked voxel and a
//! 6×6 solve: `Δp = H⁻¹ Σ SDᵀ (I(W(x; p)) − R(x))`, `W ← W ∘ W(Δp)⁻¹` (Baker & Matthews 2004).
//! Samples that fall outside the moving grid (or on NaN) leave the sums, their rows are taken out
//! of `H`. Positions are in world mm relative to the mask's centre, so rotations and
//! translations are well conditioned whatever the grid's origin, voxel size or axis flips.

use super::rigid::{affine_inverse, mat_mul, trilinear_at, RigidParams, FD_RADIUS_MM};
use super::MotionError;
use crate::volume::{Affine, IDENTITY_AFFINE};

/// Settings of the optimiser.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimiser {
    /// Pyramid levels (1 = full resolution only).
    pub levels: usize,
    /// Largest number of Gauss–Newton steps per level.
    pub max_iterations: u32,
    /// Stop a level when a step moves no point on a 50 mm sphere by more than this (mm).
    pub tolerance_mm: f64,
    /// Brain mask: voxels above this fraction of the image's 99th percentile.
    pub mask_threshold: f64,
    /// Fraction of full-resolution mask voxels used, those with the strongest gradients.
    pub sample_fraction: f64,
    /// Read full-resolution images as cubic B-spline approximations (else trilinear).
    pub bspline: bool,
}

impl Default for Optimiser {
    fn default() -> Optimiser {
        Optimiser {
            levels: 2,
            max_iterations: 12,
            // An order below the method's accuracy on real anatomy (0.015 mm, BENCHMARKS.md):
            // steps smaller than this moved no estimate measurably and cost 20 % of the time.
            tolerance_mm: 1e-2,
            mask_threshold: 0.2,
            sample_fraction: 0.2,
            bspline: true,
        }
    }
}

/// One pyramid level of the reference.
#[derive(Clone, Debug)]
struct Level {
    /// Positions of the samples, world mm relative to the centre.
    pos: Vec<[f64; 3]>,
    /// Reference value at each sample.
    value: Vec<f32>,
    /// Steepest-descent row of each sample.
    sd: Vec<[f64; 6]>,
    /// `Σ SDᵀ SD` over all samples.
    hessian: [[f64; 6]; 6],
}

/// A reference volume prepared for registration.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Grid of the reference (the grid volumes are resliced onto).
    pub dims: [usize; 3],
    /// Voxel-to-world matrix of the reference.
    pub affine: Affine,
    /// Centre of the brain mask, world mm (rotations are estimated about it).
    pub centre: [f64; 3],
    /// World positions of the full-resolution mask voxels (for displacement summaries).
    pub brain: Vec<[f64; 3]>,
    levels: Vec<Level>,
}

/// What one registration found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// World-space matrix `M` with `reference(p) ≈ moving(M · p)`.
    pub matrix: Affine,
    /// Gauss–Newton steps taken over all levels.
    pub iterations: u32,
    /// Mean squared residual over valid samples at the last full-resolution step.
    pub cost: f64,
    /// Whether the last level met the tolerance.
    pub converged: bool,
    /// Fraction of full-resolution samples that fell inside the moving volume.
    pub overlap: f64,
}

/// An image with its grid, one level of a pyramid.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    pub data: Vec<f32>,
    pub dims: [usize; 3],
    pub affine: Affine,
}

/// 2×2×2 block means (odd last planes dropped) and the matching affine.
fn downsample(img: &Image) -> Option<Image> {
    let [nx, ny, nz] = img.dims;
    let d = [nx / 2, ny / 2, nz / 2];
    if d.iter().any(|&n| n < 4) {
        return None;
    }
    let mut data = vec![0f32; d[0] * d[1] * d[2]];
    let row = |j: usize, k: usize| &img.data[nx * (j + ny * k)..nx * (j + ny * k) + 2 * d[0]];
    // Row by row: the four fine rows under a coarse row summed lane-wise, then pairs along x.
    for (jk, out) in data.chunks_exact_mut(d[0]).enumerate() {
        let (j, k) = (jk % d[1], jk / d[1]);
        let rows =
            [row(2 * j, 2 * k), row(2 * j + 1, 2 * k), row(2 * j, 2 * k + 1), row(2 * j + 1, 2 * k + 1)];
        for (i, o) in out.iter_mut().enumerate() {
            let sum: f32 = rows.iter().map(|r| r[2 * i] + r[2 * i + 1]).sum();
            *o = sum / 8.0;
        }
    }
    // Coarse voxel i covers fine voxels 2i and 2i+1: its centre is at fine coordinate 2i + 0.5.
    let scale = [[2.0, 0.0, 0.0, 0.5], [0.0, 2.0, 0.0, 0.5], [0.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 1.0]];
    Some(Image { data, dims: d, affine: mat_mul(&img.affine, &scale) })
}

/// The pyramid of `img`, finest first, at most `levels` deep.
pub(crate) fn pyramid(img: Image, levels: usize) -> Vec<Image> {
    let mut out = vec![img];
    while out.len() < levels.max(1) {
        match out.last().and_then(downsample) {
            Some(next) => out.push(next),
            None => break,
        }
    }
    out
}

/// The cubic B-spline approximation at grid points: `[1, 4, 1] / 6` along each axis where
/// `axes[a]` (mirror boundaries).
fn smooth141(data: &[f32], dims: [usize; 3], axes: [bool; 3]) -> Vec<f32> {
    let mut out = data.to_vec();
    let mut src = Vec::new();
    for axis in (0..3).filter(|&a| axes[a] && dims[a] > 1) {
        super::bspline::for_each_lane_block(dims, axis, |base, n, step, width| {
            src.clear();
            src.extend_from_slice(&out[base..base + (n - 1) * step + width]);
            for k in 0..n {
                // Mirror: the neighbour beyond an edge is the one on the other side.
                let (lo, hi) = (if k == 0 { 1 } else { k - 1 }, if k + 1 == n { n - 2 } else { k + 1 });
                for x in 0..width {
                    out[base + k * step + x] =
                        (src[lo * step + x] + 4.0 * src[k * step + x] + src[hi * step + x]) / 6.0;
                }
            }
        });
    }
    out
}

/// Smallest and largest finite value of `data`, and how many values are NaN or infinite: one
/// pass in eight independent lanes, which the compiler vectorises.
fn value_range(data: &[f32]) -> (f32, f32, usize) {
    let (mut lo, mut hi, mut bad) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8], [0usize; 8]);
    let mut lane = |l: usize, x: f32| {
        let finite = x.is_finite();
        lo[l] = if finite && x < lo[l] { x } else { lo[l] };
        hi[l] = if finite && x > hi[l] { x } else { hi[l] };
        bad[l] += usize::from(!finite);
    };
    let chunks = data.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in c.iter().enumerate() {
            lane(l, x);
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        lane(l, x);
    }
    (
        lo.into_iter().fold(f32::INFINITY, f32::min),
        hi.into_iter().fold(f32::NEG_INFINITY, f32::max),
        bad.iter().sum(),
    )
}

/// Most voxels that may be NaN or infinite before a volume is refused.
const MAX_NON_FINITE: f64 = 0.2;

/// A copy of `data` whose NaN and infinite voxels are replaced by the mean of their finite
/// face neighbours (0 if none), so one bad voxel does not spoil the 64 samples around it.
fn fill_non_finite(data: &[f32], dims: [usize; 3]) -> Result<Vec<f32>, MotionError> {
    let mut out = data.to_vec();
    let bad: Vec<usize> = (0..data.len()).filter(|&v| !data[v].is_finite()).collect();
    if bad.len() as f64 > MAX_NON_FINITE * data.len() as f64 {
        return Err(MotionError::Degenerate(format!(
            "{} of {} voxels are NaN or infinite",
            bad.len(),
            data.len()
        )));
    }
    let [nx, ny, nz] = dims;
    for v in bad {
        let (i, j, k) = (v % nx, (v / nx) % ny, v / (nx * ny));
        let mut neighbours = [None; 6];
        neighbours[0] = (i > 0).then(|| v - 1);
        neighbours[1] = (i + 1 < nx).then(|| v + 1);
        neighbours[2] = (j > 0).then(|| v - nx);
        neighbours[3] = (j + 1 < ny).then(|| v + nx);
        neighbours[4] = (k > 0).then(|| v - nx * ny);
        neighbours[5] = (k + 1 < nz).then(|| v + nx * ny);
        let finite: Vec<f32> =
            neighbours.iter().flatten().map(|&n| data[n]).filter(|x| x.is_finite()).collect();
        out[v] = if finite.is_empty() { 0.0 } else { finite.iter().sum::<f32>() / finite.len() as f32 };
    }
    Ok(out)
}

/// Value at the `q`-quantile of the finite values (0 when there are none).
fn quantile(data: &[f32], q: f64) -> f32 {
    let mut v: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    let at = ((v.len() - 1) as f64 * q) as usize;
    *v.select_nth_unstable_by(at, f32::total_cmp).1
}

fn world(a: &Affine, i: usize, j: usize, k: usize) -> [f64; 3] {
    let (x, y, z) = (i as f64, j as f64, k as f64);
    [0, 1, 2].map(|r| a[r][0] * x + a[r][1] * y + a[r][2] * z + a[r][3])
}

impl Reference {
    /// Prepares `data` (grid `dims`, voxel-to-world `affine`) as the reference.
    pub fn prepare(
        data: &[f32],
        dims: [usize; 3],
        affine: &Affine,
        opt: &Optimiser,
    ) -> Result<Reference, MotionError> {
        Reference::check(data, dims)?;
        let top = pyramid(Image { data: fill_non_finite(data, dims)?, dims, affine: *affine }, opt.levels);
        let threshold = opt.mask_threshold as f32 * quantile(data, 0.99);
        if threshold.is_nan() || threshold <= 0.0 {
            return Err(MotionError::Degenerate("the reference has no positive signal".into()));
        }
        // Centre and brain points from the full-resolution mask.
        let mut brain = Vec::new();
        let [nx, ny, nz] = dims;
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let v = data[i + nx * (j + ny * k)];
                    if v.is_finite() && v > threshold {
                        brain.push(world(affine, i, j, k));
                    }
                }
            }
        }
        if brain.len() < 64 {
            return Err(MotionError::Degenerate(format!(
                "only {} voxels above the mask threshold",
                brain.len()
            )));
        }
        let n = brain.len() as f64;
        let centre = [0, 1, 2].map(|a| brain.iter().map(|p| p[a]).sum::<f64>() / n);
        let mut levels = Vec::with_capacity(top.len());
        for (l, img) in top.iter().enumerate() {
            let (fraction, bspline) = if l == 0 { (opt.sample_fraction, opt.bspline) } else { (1.0, false) };
            levels.push(prepare_level(img, threshold, centre, fraction, bspline)?);
        }
        Ok(Reference { dims, affine: *affine, centre, brain, levels })
    }

    /// The faults of a would-be reference that one pass over `data` finds (its grid, too many
    /// NaN voxels, no signal or a constant image): [`Reference::prepare`]'s cheap checks.
    pub fn check(data: &[f32], dims: [usize; 3]) -> Result<(), MotionError> {
        if data.len() != dims.iter().product::<usize>() {
            return Err(MotionError::Shape(format!("{} voxels for grid {dims:?}", data.len())));
        }
        if dims.iter().any(|&d| d < 3) {
            return Err(MotionError::Degenerate(format!("grid {dims:?} is too small to register")));
        }
        let (lo, hi, non_finite) = value_range(data);
        if non_finite as f64 > MAX_NON_FINITE * data.len() as f64 {
            return Err(MotionError::Degenerate(format!(
                "{non_finite} of {} voxels are NaN or infinite",
                data.len()
            )));
        }
        if hi.is_nan() || hi <= 0.0 {
            return Err(MotionError::Degenerate("the reference has no positive signal".into()));
        }
        if hi <= lo {
            return Err(MotionError::Degenerate("the volume is constant (or has no finite voxel)".into()));
        }
        Ok(())
    }

    /// Registers `moving` to the reference starting from the world matrix `start`.
    pub fn register(
        &self,
        moving: &[f32],
        dims: [usize; 3],
        affine: &Affine,
        start: &Affine,
        opt: &Optimiser,
    ) -> Result<Fit, MotionError> {
        if moving.len() != dims.iter().product::<usize>() {
            return Err(MotionError::Shape(format!("{} voxels for grid {dims:?}", moving.len())));
        }
        let (lo, hi, non_finite) = value_range(moving);
        if hi <= lo || hi.is_nan() {
            return Err(MotionError::Degenerate("the volume is constant (or has no finite voxel)".into()));
        }
        affine_inverse(affine)
            .ok_or_else(|| MotionError::Degenerate("the volume's affine is singular".into()))?;
        let data = if non_finite == 0 { moving.to_vec() } else { fill_non_finite(moving, dims)? };
        let images = pyramid(Image { data, dims, affine: *affine }, self.levels.len());
        let shift = |c: [f64; 3], s: f64| {
            let mut t = IDENTITY_AFFINE;
            (0..3).for_each(|r| t[r][3] = s * c[r]);
            t
        };
        let (to_centre, from_centre) = (shift(self.centre, 1.0), shift(self.centre, -1.0));
        // Internal transform acts on positions relative to the centre.
        let mut m = mat_mul(&from_centre, &mat_mul(start, &to_centre));
        let mut fit = Fit { matrix: *start, iterations: 0, cost: f64::NAN, converged: false, overlap: 0.0 };
        for l in (0..self.levels.len().min(images.len())).rev() {
            let (level, img) = (&self.levels[l], &images[l]);
            let to_voxel = mat_mul(&affine_inverse(&img.affine).unwrap_or(IDENTITY_AFFINE), &to_centre);
            fit.converged = false;
            let mut last_size = f64::INFINITY;
            let mut stalled = 0;
            for _ in 0..opt.max_iterations {
                let g = mat_mul(&to_voxel, &m);
                let step = gauss_newton_step(level, img, &g, l == 0 && opt.bspline)?;
                fit.iterations += 1;
                if l == 0 {
                    fit.cost = step.cost;
                    fit.overlap = step.overlap;
                }
                let delta = RigidParams {
                    trans: [step.dp[0], step.dp[1], step.dp[2]],
                    rot: [step.dp[3], step.dp[4], step.dp[5]],
                };
                let inv = affine_inverse(&delta.matrix())
                    .ok_or_else(|| MotionError::Degenerate("singular update".into()))?;
                m = mat_mul(&m, &inv);
                let size = (0..3).map(|i| step.dp[i].abs()).sum::<f64>()
                    + FD_RADIUS_MM * (3..6).map(|i| step.dp[i].abs()).sum::<f64>();
                let tolerance = opt.tolerance_mm * 10f64.powi(l as i32);
                if size < tolerance {
                    fit.converged = true;
                    break;
                }
                // Steps that stop shrinking are noise (samples entering or leaving the overlap):
                // stop, and call it converged if they are within ten times the tolerance.
                stalled = if size > 0.5 * last_size { stalled + 1 } else { 0 };
                last_size = size;
                if stalled >= 2 {
                    fit.converged = size < 10.0 * tolerance;
                    break;
                }
            }
        }
        // Re-orthonormalise through the parameters, then back to world coordinates.
        let m = RigidParams::from_matrix(&m).matrix();
        fit.matrix = mat_mul(&to_centre, &mat_mul(&m, &from_centre));
        Ok(fit)
    }
}

/// The samples of one level: values and world gradients read as trilinear (central
/// differences) or, with `bspline`, as the cubic B-spline approximation (values smoothed by
/// `[1, 4, 1] / 6`; each derivative a central difference smoothed along the other two axes).
fn prepare_level(
    img: &Image,
    threshold: f32,
    centre: [f64; 3],
    fraction: f64,
    bspline: bool,
) -> Result<Level, MotionError> {
    let [nx, ny, nz] = img.dims;
    let a_inv = affine_inverse(&img.affine)
        .ok_or_else(|| MotionError::Degenerate("the reference affine is singular".into()))?;
    let d = img.dims;
    let (values, across) = if bspline {
        let across = [
            smooth141(&img.data, d, [false, true, true]),
            smooth141(&img.data, d, [true, false, true]),
            smooth141(&img.data, d, [true, true, false]),
        ];
        (smooth141(&img.data, d, [true; 3]), across)
    } else {
        (img.data.clone(), [img.data.clone(), img.data.clone(), img.data.clone()])
    };
    let idx = |i: usize, j: usize, k: usize| i + nx * (j + ny * k);
    let at = |i: usize, j: usize, k: usize| values[idx(i, j, k)];
    let diff = |a: usize, i: usize, j: usize, k: usize| {
        let (p, m) = match a {
            0 => (idx(i + 1, j, k), idx(i - 1, j, k)),
            1 => (idx(i, j + 1, k), idx(i, j - 1, k)),
            _ => (idx(i, j, k + 1), idx(i, j, k - 1)),
        };
        f64::from(across[a][p] - across[a][m]) / 2.0
    };
    let (mut pos, mut value, mut sd, mut strength) = (Vec::new(), Vec::new(), Vec::new(), Vec::<f64>::new());
    for k in 1..nz - 1 {
        for j in 1..ny - 1 {
            for i in 1..nx - 1 {
                let v = at(i, j, k);
                if !(v.is_finite() && v > threshold) {
                    continue;
                }
                let gv = [diff(0, i, j, k), diff(1, i, j, k), diff(2, i, j, k)];
                if gv.iter().any(|g| !g.is_finite()) {
                    continue;
                }
                // World gradient: ∇_world = A⁻ᵀ ∇_voxel.
                let g = [0, 1, 2].map(|c| (0..3).map(|r| a_inv[r][c] * gv[r]).sum::<f64>());
                let w = world(&img.affine, i, j, k);
                let p = [w[0] - centre[0], w[1] - centre[1], w[2] - centre[2]];
                let row = [
                    g[0],
                    g[1],
                    g[2],
                    g[2] * p[1] - g[1] * p[2],
                    g[0] * p[2] - g[2] * p[0],
                    g[1] * p[0] - g[0] * p[1],
                ];
                strength.push(g[0] * g[0] + g[1] * g[1] + g[2] * g[2]);
                pos.push(p);
                value.push(v);
                sd.push(row);
            }
        }
    }
    // Keep the strongest-gradient fraction (grid order is preserved for cache-friendly sampling).
    if fraction < 1.0 && pos.len() > 256 {
        let keep = ((pos.len() as f64 * fraction).ceil() as usize).max(256);
        let mut order: Vec<usize> = (0..pos.len()).collect();
        order.select_nth_unstable_by(keep - 1, |a, b| strength[*b].total_cmp(&strength[*a]));
        let mut kept = order[..keep].to_vec();
        kept.sort_unstable();
        pos = kept.iter().map(|&i| pos[i]).collect();
        value = kept.iter().map(|&i| value[i]).collect();
        sd = kept.iter().map(|&i| sd[i]).collect();
    }
    let mut hessian = [[0.0; 6]; 6];
    for row in &sd {
        for r in 0..6 {
            for c in 0..6 {
                hessian[r][c] += row[r] * row[c];
            }
        }
    }
    if pos.len() < 64 {
        return Err(MotionError::Degenerate(format!(
            "only {} usable reference voxels at grid {:?}",
            pos.len(),
            img.dims
        )));
    }
    if solve6(&hessian, &[0.0; 6]).is_none() {
        return Err(MotionError::Degenerate(format!(
            "the reference has too little structure to register at grid {:?}",
            img.dims
        )));
    }
    Ok(Level { pos, value, sd, hessian })
}

struct Step {
    dp: [f64; 6],
    cost: f64,
    overlap: f64,
}

/// One Gauss–Newton step's sums over a range of a level's samples.
#[derive(Default)]
struct StepSums {
    b: [f64; 6],
    /// `J Jᵀ` of the samples that fell outside the volume, to take from the level's Hessian.
    outside: [[f64; 6]; 6],
    cost: f64,
    valid: usize,
}

impl StepSums {
    fn plus(mut self, o: StepSums) -> StepSums {
        (0..6).for_each(|r| {
            self.b[r] += o.b[r];
            (0..6).for_each(|c| self.outside[r][c] += o.outside[r][c]);
        });
        self.cost += o.cost;
        self.valid += o.valid;
        self
    }
}

fn step_sums(
    level: &Level,
    img: &Image,
    g: &Affine,
    bspline: bool,
    range: std::ops::Range<usize>,
) -> StepSums {
    let stride = [1, img.dims[0], img.dims[0] * img.dims[1]];
    let mut s = StepSums::default();
    let samples = level.pos[range.clone()].iter().zip(&level.value[range.clone()]).zip(&level.sd[range]);
    for ((p, r), row) in samples {
        let u = g[0][0] * p[0] + g[0][1] * p[1] + g[0][2] * p[2] + g[0][3];
        let v = g[1][0] * p[0] + g[1][1] * p[1] + g[1][2] * p[2] + g[1][3];
        let w = g[2][0] * p[0] + g[2][1] * p[1] + g[2][2] * p[2] + g[2][3];
        let sampled = if bspline {
            super::bspline::value_at(&img.data, img.dims, u, v, w)
        } else {
            trilinear_at(&img.data, img.dims, stride, u, v, w)
        };
        match sampled {
            Some(x) if x.is_finite() => {
                let e = f64::from(x - r);
                for c in 0..6 {
                    s.b[c] += row[c] * e;
                }
                s.cost += e * e;
                s.valid += 1;
            }
            _ => {
                for rr in 0..6 {
                    for c in 0..6 {
                        s.outside[rr][c] += row[rr] * row[c];
                    }
                }
            }
        }
    }
    s
}

/// One Gauss–Newton step with `g` mapping centred positions to moving voxel coordinates.
fn gauss_newton_step(level: &Level, img: &Image, g: &Affine, bspline: bool) -> Result<Step, MotionError> {
    let n = level.pos.len();
    let sums = match super::split_here() {
        true => {
            let (a, b) = rayon::join(
                || step_sums(level, img, g, bspline, 0..n / 2),
                || step_sums(level, img, g, bspline, n / 2..n),
            );
            a.plus(b)
        }
        false => step_sums(level, img, g, bspline, 0..n),
    };
    let StepSums { b, outside, cost, valid } = sums;
    let mut h = level.hessian;
    (0..6).for_each(|r| (0..6).for_each(|c| h[r][c] -= outside[r][c]));
    let overlap = valid as f64 / level.pos.len().max(1) as f64;
    if overlap < 0.5 {
        return Err(MotionError::Degenerate(format!(
            "only {:.0}% of the reference brain overlaps the volume",
            overlap * 100.0
        )));
    }
    let dp = solve6(&h, &b)
        .ok_or_else(|| MotionError::Degenerate("the Gauss–Newton system is singular".into()))?;
    Ok(Step { dp, cost: cost / valid.max(1) as f64, overlap })
}

/// Solves the symmetric positive-definite system `h x = b` by Cholesky.
fn solve6(h: &[[f64; 6]; 6], b: &[f64; 6]) -> Option<[f64; 6]> {
    let mut l = [[0.0f64; 6]; 6];
    for i in 0..6 {
        for j in 0..=i {
            let s: f64 = h[i][j] - (0..j).map(|k| l[i][k] * l[j][k]).sum::<f64>();
            if i == j {
                if s.is_nan() || s <= 1e-12 * h[i][i].abs().max(1e-300) {
                    return None;
                }
                l[i][i] = s.sqrt();
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    }
    let mut y = [0.0; 6];
    for i in 0..6 {
        y[i] = (b[i] - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>()) / l[i][i];
    }
    let mut x = [0.0; 6];
    for i in (0..6).rev() {
        x[i] = (y[i] - (i + 1..6).map(|k| l[k][i] * x[k]).sum::<f64>()) / l[i][i];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_known_system() {
        let mut h = [[0.0; 6]; 6];
        for i in 0..6 {
            h[i][i] = 4.0 + i as f64;
            if i > 0 {
                h[i][i - 1] = 1.0;
                h[i - 1][i] = 1.0;
            }
        }
        let x = [1.0, -2.0, 0.5, 3.0, 0.0, -1.0];
        let b: [f64; 6] = std::array::from_fn(|i| (0..6).map(|j| h[i][j] * x[j]).sum());
        let got = solve6(&h, &b).unwrap();
        for i in 0..6 {
            assert!((got[i] - x[i]).abs() < 1e-12);
        }
        assert!(solve6(&[[0.0; 6]; 6], &b).is_none());
    }

    #[test]
    fn downsampling_keeps_world_positions() {
        let img = Image {
            data: (0..8 * 8 * 8).map(|i| i as f32).collect(),
            dims: [8, 8, 8],
            affine: IDENTITY_AFFINE,
        };
        let half = downsample(&img).unwrap();
        assert_eq!(half.dims, [4, 4, 4]);
        // Coarse voxel 0 averages fine voxels 0..1 on each axis: centre at 0.5.
        assert_eq!(world(&half.affine, 0, 0, 0), [0.5, 0.5, 0.5]);
        let mean0 = [0, 1, 8, 9, 64, 65, 72, 73].iter().sum::<i32>() as f32 / 8.0;
        assert_eq!(half.data[0], mean0);
    }
}
