//! Spatial smoothing on the volume path, between motion correction and the GLM: a Gaussian of a
//! given FWHM in mm, turned into a width in voxels per axis from the volume's voxel size, as
//! OpenNFT smooths (5 mm) before it averages an ROI. Off by default.
//!
//! Each axis is filtered in turn with the same kernel as `scipy.ndimage.gaussian_filter`
//! (weights `exp(-x²/2σ²)` normalised to sum 1, radius `⌊4σ + ½⌋`, edges mirrored as its
//! `reflect` mode: `d c b a | a b c d | d c b a`), accumulated in f64. A NaN voxel stays NaN and
//! lends nothing to its neighbours: their weights are renormalised over the finite voxels.

pub mod stage;

use serde::{Deserialize, Serialize};

use crate::volume::Volume;

/// FWHM over σ of a Gaussian: 2·√(2 ln 2).
pub const FWHM_PER_SIGMA: f64 = 2.354_820_045_030_949_3;

/// How far the kernel reaches, in σ (scipy's default `truncate`).
pub const TRUNCATE: f64 = 4.0;

/// `[smooth]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoothConfig {
    /// Smooth each volume before the GLM (off: the stage is not on the path).
    pub enabled: bool,
    /// Full width at half maximum, mm, the same along every axis (OpenNFT's default is 5).
    pub fwhm_mm: f64,
}

impl Default for SmoothConfig {
    fn default() -> SmoothConfig {
        SmoothConfig { enabled: false, fwhm_mm: 5.0 }
    }
}

impl SmoothConfig {
    /// Every mistake in the section.
    pub fn validate(&self) -> Vec<String> {
        match self.fwhm_mm.is_finite() && self.fwhm_mm > 0.0 && self.fwhm_mm <= 50.0 {
            true => Vec::new(),
            false => {
                vec![format!("smooth.fwhm_mm = {}: give a width in mm, above 0 and at most 50", self.fwhm_mm)]
            }
        }
    }
}

/// σ in voxels along each axis for a FWHM in mm and a voxel size in mm.
pub fn sigmas(fwhm_mm: f64, voxel_size: [f64; 3]) -> [f64; 3] {
    voxel_size.map(|v| if v > 0.0 { fwhm_mm / FWHM_PER_SIGMA / v } else { 0.0 })
}

/// The 1-D kernel of σ (voxels): `2r + 1` weights summing to 1, centre at `r`; `[1]` for σ = 0.
pub fn kernel(sigma: f64) -> Vec<f64> {
    if sigma.is_nan() || sigma <= 0.0 {
        return vec![1.0];
    }
    let radius = (TRUNCATE * sigma + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius).map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|x| x / sum).collect()
}

/// The index `i` of a line of `n` mirrored as scipy's `reflect` mode mirrors it.
fn reflect(i: i64, n: i64) -> usize {
    let period = 2 * n;
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - 1 - m }) as usize
}

/// A Gaussian smoother for one FWHM; its kernels are made once per voxel size.
#[derive(Clone, Debug)]
pub struct GaussianSmoother {
    fwhm_mm: f64,
    /// The voxel size the kernels were made for, and the kernel of each axis.
    kernels: Option<([f64; 3], [Vec<f64>; 3])>,
    /// Work buffers: the volume in f64, a second copy, and one line.
    work: Vec<f64>,
    spare: Vec<f64>,
    line: Vec<f64>,
}

impl GaussianSmoother {
    /// A smoother of `fwhm_mm`.
    pub fn new(fwhm_mm: f64) -> GaussianSmoother {
        GaussianSmoother { fwhm_mm, kernels: None, work: Vec::new(), spare: Vec::new(), line: Vec::new() }
    }

    /// The volume smoothed (a new volume with `v`'s grid and metadata).
    pub fn process(&mut self, v: &Volume) -> Volume {
        let size = v.voxel_size();
        if self.kernels.as_ref().is_none_or(|(s, _)| *s != size) {
            self.kernels = Some((size, sigmas(self.fwhm_mm, size).map(kernel)));
        }
        let Some((_, kernels)) = &self.kernels else { unreachable!("made above") };
        self.work.clear();
        self.work.extend(v.data.iter().map(|&x| f64::from(x)));
        let [nx, ny, nz] = v.dims;
        let strides = [1, nx, nx * ny];
        let has_nan = v.data.iter().any(|x| x.is_nan());
        for axis in 0..3 {
            let n = v.dims[axis];
            if kernels[axis].len() == 1 || n == 0 {
                continue;
            }
            if axis > 0 && !has_nan {
                // Whole rows along x at a time, so the inner loop is contiguous.
                std::mem::swap(&mut self.work, &mut self.spare);
                self.work.resize(self.spare.len(), 0.0);
                filter_rows(&self.spare, &mut self.work, v.dims, axis, &kernels[axis]);
                continue;
            }
            // Every line along `axis`: its first voxel runs over the other two axes.
            let (a, b) = match axis {
                0 => ((ny, nx), (nz, nx * ny)),
                1 => ((nx, 1), (nz, nx * ny)),
                _ => ((nx, 1), (ny, nx)),
            };
            for j in 0..b.0 {
                for i in 0..a.0 {
                    let start = i * a.1 + j * b.1;
                    filter_line(
                        &mut self.work,
                        start,
                        strides[axis],
                        n,
                        &kernels[axis],
                        &mut self.line,
                        has_nan,
                    );
                }
            }
        }
        let mut out = v.clone_meta();
        out.data = self
            .work
            .iter()
            .zip(&v.data)
            .map(|(&s, &x)| if x.is_nan() { f32::NAN } else { s as f32 })
            .collect();
        out
    }
}

/// Correlates `src` with `k` along `axis` (1: y, 2: z) into `dst`, a whole x row at a time, edges
/// mirrored as in [`filter_line`] (no NaN).
fn filter_rows(src: &[f64], dst: &mut [f64], [nx, ny, nz]: [usize; 3], axis: usize, k: &[f64]) {
    let r = k.len() as i64 / 2;
    for z in 0..nz {
        for y in 0..ny {
            let out = &mut dst[(z * ny + y) * nx..][..nx];
            out.fill(0.0);
            for (t, w) in k.iter().enumerate() {
                let (yy, zz) = match axis {
                    1 => (reflect(y as i64 + t as i64 - r, ny as i64), z),
                    _ => (y, reflect(z as i64 + t as i64 - r, nz as i64)),
                };
                let row = &src[(zz * ny + yy) * nx..][..nx];
                out.iter_mut().zip(row).for_each(|(o, x)| *o += w * x);
            }
        }
    }
}

/// Correlates the line of `n` voxels from `start` by `stride` in `data` with `k`, in place;
/// with `skip_nan`, NaN voxels stay NaN, lend nothing, and the weights are renormalised over
/// the rest.
fn filter_line(
    data: &mut [f64],
    start: usize,
    stride: usize,
    n: usize,
    k: &[f64],
    line: &mut Vec<f64>,
    skip_nan: bool,
) {
    let r = k.len() / 2;
    line.clear();
    line.extend((0..n).map(|i| data[start + i * stride]));
    for i in 0..n {
        let out = &mut data[start + i * stride];
        if !skip_nan && i >= r && i + r < n {
            // The interior: no edge to mirror, no NaN to skip.
            *out = line[i - r..=i + r].iter().zip(k).map(|(x, w)| x * w).sum();
            continue;
        }
        if skip_nan && line[i].is_nan() {
            continue;
        }
        let (mut acc, mut weight) = (0.0, 0.0);
        for (t, w) in k.iter().enumerate() {
            let x = line[reflect(i as i64 + t as i64 - r as i64, n as i64)];
            if skip_nan && x.is_nan() {
                continue;
            }
            acc += w * x;
            weight += w;
        }
        *out = match skip_nan {
            false => acc,
            true if weight > 0.0 => acc / weight,
            true => f64::NAN,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dims: [usize; 3], voxel: [f64; 3], data: Vec<f32>) -> Volume {
        let mut affine = crate::volume::IDENTITY_AFFINE;
        (0..3).for_each(|a| affine[a][a] = voxel[a]);
        Volume {
            data,
            dims,
            affine,
            index: 0,
            run: "r".into(),
            tr: Some(2.0),
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        }
    }

    #[test]
    fn kernels_are_scipys_and_widths_follow_the_voxel_size() {
        // scipy.ndimage._gaussian_kernel1d(1.0, 0, 4): radius 4.
        let k = kernel(1.0);
        assert_eq!(k.len(), 9);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert!((k[4] - 0.398_943_469_356_097_76).abs() < 1e-15, "{}", k[4]);
        // 5 mm at 3 mm voxels: σ 0.708, radius 3.
        let k = kernel(5.0 / FWHM_PER_SIGMA / 3.0);
        let scipy = [
            7.073_367_969_732_56e-5,
            0.010_400_212_673_434_252,
            0.207_726_451_125_146_87,
            0.563_605_205_043_443_1,
        ];
        assert_eq!(k.len(), 7);
        assert!(
            (0..4).all(|i| (k[i] - scipy[i]).abs() < 1e-15 && (k[6 - i] - scipy[i]).abs() < 1e-15),
            "{k:?}"
        );
        assert_eq!(kernel(0.0), vec![1.0]);
        let s = sigmas(5.0, [2.0, 2.5, 0.0]);
        assert!((s[0] - 5.0 / FWHM_PER_SIGMA / 2.0).abs() < 1e-15 && s[2] == 0.0);
        assert_eq!((0..8).map(|i| reflect(i - 3, 3)).collect::<Vec<_>>(), [2, 1, 0, 0, 1, 2, 2, 1]);
    }

    #[test]
    fn a_constant_stays_constant_and_an_impulse_spreads_by_the_kernel() {
        let dims = [9, 7, 5];
        let n = dims.iter().product();
        let mut s = GaussianSmoother::new(6.0);
        let out = s.process(&volume(dims, [3.0, 3.0, 3.0], vec![2.5; n]));
        assert!(out.data.iter().all(|x| (x - 2.5).abs() < 1e-6));
        let mut data = vec![0.0; n];
        data[4 + 9 * (3 + 7 * 2)] = 1.0;
        let out = s.process(&volume(dims, [3.0, 3.0, 3.0], data));
        let k = kernel(6.0 / FWHM_PER_SIGMA / 3.0);
        let r = k.len() / 2;
        let at = |x: usize, y: usize, z: usize| out.data[x + 9 * (y + 7 * z)] as f64;
        assert!((at(4, 3, 2) - k[r].powi(3)).abs() < 1e-7);
        assert!((at(5, 3, 1) - k[r + 1] * k[r] * k[r - 1]).abs() < 1e-7);
        assert!((out.data.iter().map(|&x| f64::from(x)).sum::<f64>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn a_nan_voxel_stays_nan_and_lends_nothing_to_its_neighbours() {
        let dims = [6, 5, 4];
        let n = dims.iter().product();
        let mut data = vec![1.0; n];
        data[7] = f32::NAN;
        let out = GaussianSmoother::new(5.0).process(&volume(dims, [2.0, 2.0, 2.0], data));
        assert!(out.data[7].is_nan());
        assert!(out.data.iter().enumerate().all(|(i, x)| i == 7 || (x - 1.0).abs() < 1e-6), "{:?}", out.data);
    }
}
