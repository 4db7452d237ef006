//! The simulated head: a grid centred on the world origin and a static EPI-like image on it,
//! either a built-in phantom or a real volume resampled from a NIfTI file.

use std::path::Path;

use super::stimuli::SmoothField;
use super::SimError;
use crate::io::nifti::read_nifti;
use crate::motion::rigid::{affine_inverse, mat_mul, resample_trilinear};
use crate::rng::Rng;
use crate::volume::{Affine, IDENTITY_AFFINE};

/// Robust maximum (99th percentile of non-zero voxels) every anatomy is scaled to.
pub const ANATOMY_SCALE: f32 = 1000.0;
/// Voxels above this fraction of [`ANATOMY_SCALE`] are brain.
const BRAIN_THRESHOLD: f32 = 0.2;
/// The most posterior fraction of the brain's y extent forms the visual ROI.
const VISUAL_FRACTION: f64 = 0.3;

/// Head tissue beyond the acquisition grid (mm) that motion can bring into view.
const HEAD_MARGIN_MM: f64 = 15.0;

/// The static head on a grid larger than the acquisition grid, so that a moving head brings
/// real tissue, not zeros, into the field of view.
#[derive(Clone, Debug)]
pub struct Head {
    /// Grid of the padded head.
    pub dims: [usize; 3],
    /// Its voxel-to-world matrix (same orientation and voxel size as the acquisition grid).
    pub affine: Affine,
    /// Noise-free image.
    pub image: Vec<f32>,
    /// Head voxel of acquisition voxel (0, 0, 0).
    pub offset: [usize; 3],
}

impl Head {
    /// Index in the head grid of acquisition voxel index `v` on grid `dims`.
    pub fn index_of(&self, v: usize, dims: [usize; 3]) -> usize {
        let (i, j, k) = (v % dims[0], (v / dims[0]) % dims[1], v / (dims[0] * dims[1]));
        let [oi, oj, ok] = self.offset;
        (i + oi) + self.dims[0] * ((j + oj) + self.dims[1] * (k + ok))
    }
}

/// The static head image and its masks.
#[derive(Clone, Debug)]
pub struct Anatomy {
    /// Acquisition grid `[x, y, z]`.
    pub dims: [usize; 3],
    /// Voxel-to-world matrix; the grid centre is at world (0, 0, 0).
    pub affine: Affine,
    /// Noise-free image on the acquisition grid, x fastest.
    pub image: Vec<f32>,
    /// The same head on a padded grid.
    pub head: Head,
    /// Brain voxels (indices into the grid, ascending).
    pub brain: Vec<usize>,
    /// Visual-ROI voxels: the decode mask (indices, ascending).
    pub roi: Vec<usize>,
}

/// An affine with linear part `linear` whose grid centre maps to the world origin.
fn centred(linear: [[f64; 3]; 3], dims: [usize; 3]) -> Affine {
    let mut a = IDENTITY_AFFINE;
    for r in 0..3 {
        a[r][..3].copy_from_slice(&linear[r]);
        a[r][3] = -(0..3).map(|c| linear[r][c] * (dims[c] as f64 - 1.0) / 2.0).sum::<f64>();
    }
    a
}

/// World position of voxel index `v` on a grid.
pub fn world_of(affine: &Affine, dims: [usize; 3], v: usize) -> [f64; 3] {
    let (i, j, k) =
        ((v % dims[0]) as f64, ((v / dims[0]) % dims[1]) as f64, (v / (dims[0] * dims[1])) as f64);
    [0, 1, 2].map(|r| affine[r][0] * i + affine[r][1] * j + affine[r][2] * k + affine[r][3])
}

/// The padded head grid around an acquisition grid.
fn head_grid(dims: [usize; 3], affine: &Affine) -> ([usize; 3], Affine, [usize; 3]) {
    let vox = crate::volume::voxel_size(affine);
    let pad = [0, 1, 2].map(|a| (HEAD_MARGIN_MM / vox[a]).ceil().clamp(1.0, 32.0) as usize);
    let mut a = *affine;
    for r in 0..3 {
        a[r][3] -= (0..3).map(|c| affine[r][c] * pad[c] as f64).sum::<f64>();
    }
    ([0, 1, 2].map(|i| dims[i] + 2 * pad[i]), a, pad)
}

impl Anatomy {
    /// The built-in phantom: an ellipsoidal brain with a cortical ribbon, white matter,
    /// two ventricles and smooth texture, RAS+, on `dims` voxels of `voxel_mm`.
    pub fn phantom(rng: &mut Rng, dims: [usize; 3], voxel_mm: [f64; 3]) -> Anatomy {
        let linear = [[voxel_mm[0], 0.0, 0.0], [0.0, voxel_mm[1], 0.0], [0.0, 0.0, voxel_mm[2]]];
        let affine = centred(linear, dims);
        let fov = [0, 1, 2].map(|a| dims[a] as f64 * voxel_mm[a]);
        let semi = [0.36 * fov[0], 0.44 * fov[1], 0.42 * fov[2]];
        let texture = [SmoothField::new(rng), SmoothField::new(rng)];
        let edge = |d: f64| 1.0 / (1.0 + (d / 1.5).exp()); // 1 inside, 0 outside, 1.5 mm soft edge
        let (head_dims, head_affine, offset) = head_grid(dims, &affine);
        let mut image = vec![0f32; head_dims.iter().product()];
        for (v, out) in image.iter_mut().enumerate() {
            let p = world_of(&head_affine, head_dims, v);
            let r = ((p[0] / semi[0]).powi(2) + (p[1] / semi[1]).powi(2) + (p[2] / semi[2]).powi(2)).sqrt();
            let scale = semi.iter().copied().fold(f64::INFINITY, f64::min);
            let depth = (1.0 - r) * scale; // mm inside the surface (approx.)
            let brain = edge(-depth);
            let cortex = edge(depth - 8.0);
            let vent = [-1.0, 1.0]
                .iter()
                .map(|s| {
                    let q = [
                        (p[0] - s * 0.12 * semi[0]) / (0.08 * semi[0]),
                        (p[1] + 0.05 * semi[1]) / (0.3 * semi[1]),
                        (p[2] - 0.1 * semi[2]) / (0.18 * semi[2]),
                    ];
                    edge(((q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt() - 1.0) * 6.0)
                })
                .fold(0.0, f64::max);
            let tissue = 750.0 + 250.0 * cortex;
            let value = brain * (tissue * (1.0 - vent) + 1350.0 * vent);
            let tex = 1.0 + 0.05 * texture[0].at(&p) + 0.03 * texture[1].at(&[p[1], p[2], p[0]]);
            *out = (value * tex) as f32;
        }
        Self::finish(dims, affine, Head { dims: head_dims, affine: head_affine, image, offset })
    }

    /// A real volume (the first of `path`) resampled onto a grid centred at the world origin
    /// with the file's orientation; `shape` changes the grid keeping the field of view, and
    /// `voxel_mm` overrides the voxel size.
    pub fn from_nifti(
        path: &Path,
        shape: Option<[usize; 3]>,
        voxel_mm: Option<[f64; 3]>,
        max_voxels: usize,
    ) -> Result<Anatomy, SimError> {
        let img = read_nifti(path, max_voxels).map_err(|e| SimError::Anatomy(e.to_string()))?;
        let first =
            img.volumes.first().ok_or_else(|| SimError::Anatomy(format!("{}: no volume", path.display())))?;
        let dims = shape.unwrap_or(img.dims);
        let zooms = crate::volume::voxel_size(&img.affine);
        let mut linear = [[0.0; 3]; 3];
        for c in 0..3 {
            let size = voxel_mm.map_or(zooms[c] * img.dims[c] as f64 / dims[c] as f64, |v| v[c]);
            for r in 0..3 {
                linear[r][c] = img.affine[r][c] / zooms[c] * size;
            }
        }
        let affine = centred(linear, dims);
        // Source voxel = A_src⁻¹ · (world + centre of the source grid).
        let mut shift = IDENTITY_AFFINE;
        for r in 0..3 {
            shift[r][3] = img.affine[r][3]
                + (0..3).map(|c| img.affine[r][c] * (img.dims[c] as f64 - 1.0) / 2.0).sum::<f64>();
        }
        let src_inv = affine_inverse(&img.affine)
            .ok_or_else(|| SimError::Anatomy(format!("{}: singular affine", path.display())))?;
        let (head_dims, head_affine, offset) = head_grid(dims, &affine);
        let k = mat_mul(&src_inv, &mat_mul(&shift, &head_affine));
        let n: usize = head_dims.iter().product();
        if n > max_voxels {
            return Err(SimError::Config(format!(
                "grid {dims:?} with its margin exceeds {max_voxels} voxels"
            )));
        }
        let mut image = vec![0f32; n];
        resample_trilinear(first, img.dims, &k, 0.0, &mut image, head_dims);
        let mut positive: Vec<f32> = image.iter().copied().filter(|v| *v > 0.0 && v.is_finite()).collect();
        if positive.is_empty() {
            return Err(SimError::Anatomy(format!("{}: no positive voxels", path.display())));
        }
        let at = (positive.len() - 1) * 99 / 100;
        let (_, p99, _) = positive.select_nth_unstable_by(at, f32::total_cmp);
        let scale = ANATOMY_SCALE / *p99;
        image.iter_mut().for_each(|v| *v = if v.is_finite() { (*v * scale).max(0.0) } else { 0.0 });
        Ok(Self::finish(dims, affine, Head { dims: head_dims, affine: head_affine, image, offset }))
    }

    fn finish(dims: [usize; 3], affine: Affine, head: Head) -> Anatomy {
        let image: Vec<f32> =
            (0..dims.iter().product()).map(|v| head.image[head.index_of(v, dims)]).collect();
        let brain: Vec<usize> =
            (0..image.len()).filter(|&v| image[v] > BRAIN_THRESHOLD * ANATOMY_SCALE).collect();
        let ys: Vec<f64> = brain.iter().map(|&v| world_of(&affine, dims, v)[1]).collect();
        let (y0, y1) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(*y), b.max(*y)));
        let cut = y0 + VISUAL_FRACTION * (y1 - y0);
        let roi = brain.iter().zip(&ys).filter(|(_, y)| **y <= cut).map(|(v, _)| *v).collect();
        Anatomy { dims, affine, image, head, brain, roi }
    }
}
