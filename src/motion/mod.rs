//! The motion stage: online rigid realignment of each volume to a reference.
//!
//! In: a [`Volume`]. Out: the volume resliced (trilinear) onto the reference grid, its six rigid
//! parameters, world matrix and framewise displacement ([`MotionEstimate`]). The reference is
//! volume K of the run (default 0; the first volume with index ≥ K, taken again at each new run)
//! or a NIfTI file (a volume from an earlier run, as OpenNFT and Turbo-BrainVoyager allow).
//! Each volume starts from the previous volume's estimate. Registration: [`register`].
//! Budget: ≤ 5 ms per 64×64×36 volume on one core (see `benches/motion.rs`).

pub mod bspline;
pub mod register;
pub mod rigid;
pub mod stage;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use self::register::{Fit, Optimiser, Reference};
use self::rigid::{affine_inverse, mat_mul, resample_trilinear, RigidParams};
use crate::io::nifti::read_nifti;
use crate::reason::Reason;
use crate::volume::{Affine, Volume, IDENTITY_AFFINE};

/// Counted when: a volume whose grid the motion stage cannot use.
pub const MOTION_SHAPE: Reason =
    Reason::new("motion_shape", "a volume whose grid the motion stage cannot use");
/// Counted when: a volume the registration could not fit.
pub const MOTION_DEGENERATE: Reason =
    Reason::new("motion_degenerate", "a volume the registration could not fit");
/// Counted when: a reference file that could not be used.
pub const MOTION_REFERENCE: Reason =
    Reason::new("motion_reference", "a reference file that could not be used");
/// What the motion stage counts.
pub const REASONS: &[Reason] = &[MOTION_SHAPE, MOTION_DEGENERATE, MOTION_REFERENCE];

/// Why a volume could not be realigned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MotionError {
    /// Data and grid disagree.
    #[error("motion: {0}")]
    Shape(String),
    /// The image carries no usable structure (constant, empty, no overlap, singular).
    #[error("motion: {0}")]
    Degenerate(String),
    /// The reference file could not be read.
    #[error("motion: reference {path}: {reason}")]
    ReferenceFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

impl MotionError {
    /// Counter name of this kind of error.
    pub fn reason(&self) -> Reason {
        match self {
            MotionError::Shape(_) => MOTION_SHAPE,
            MotionError::Degenerate(_) => MOTION_DEGENERATE,
            MotionError::ReferenceFile { .. } => MOTION_REFERENCE,
        }
    }
}

/// `[motion]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MotionConfig {
    /// Realign volumes (false: pass them on unchanged).
    pub enabled: bool,
    /// Index of the reference volume in each run.
    pub reference_volume: u64,
    /// A NIfTI whose first volume is the reference instead (overrides `reference_volume`).
    pub reference_file: Option<PathBuf>,
    /// Framewise displacement (mm) above which a volume is flagged.
    pub fd_threshold_mm: f64,
    /// Pyramid levels.
    pub levels: usize,
    /// Gauss–Newton steps per level at most.
    pub max_iterations: u32,
    /// Convergence: largest step on a 50 mm sphere, mm.
    pub tolerance_mm: f64,
    /// Brain mask threshold as a fraction of the reference's 99th percentile.
    pub mask_threshold: f64,
    /// Fraction of full-resolution brain voxels used (strongest gradients first).
    pub sample_fraction: f64,
    /// Read full-resolution images as cubic B-spline approximations (else trilinear).
    pub bspline: bool,
    /// Threads realigning one volume (its samples and its reslicing split between them).
    pub threads: usize,
}

impl crate::settings::InputFiles for MotionConfig {
    /// The reference volume's file.
    fn resolve_inputs(&mut self, base: &std::path::Path) {
        if let Some(p) = &mut self.reference_file {
            crate::settings::rebase(p, base);
        }
    }
}

impl Default for MotionConfig {
    fn default() -> MotionConfig {
        let o = Optimiser::default();
        MotionConfig {
            enabled: true,
            reference_volume: 0,
            reference_file: None,
            fd_threshold_mm: 0.5,
            levels: o.levels,
            max_iterations: o.max_iterations,
            tolerance_mm: o.tolerance_mm,
            mask_threshold: o.mask_threshold,
            sample_fraction: o.sample_fraction,
            bspline: o.bspline,
            threads: 2,
        }
    }
}

impl MotionConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if !(1..=4).contains(&self.levels) {
            e.push("motion.levels must be 1..4".into());
        }
        if self.max_iterations == 0 {
            e.push("motion.max_iterations must be at least 1".into());
        }
        if !(self.tolerance_mm.is_finite() && self.tolerance_mm > 0.0) {
            e.push("motion.tolerance_mm must be positive".into());
        }
        if !(self.mask_threshold > 0.0 && self.mask_threshold < 1.0) {
            e.push("motion.mask_threshold must be in (0, 1)".into());
        }
        if !(self.sample_fraction > 0.0 && self.sample_fraction <= 1.0) {
            e.push("motion.sample_fraction must be in (0, 1]".into());
        }
        if !(1..=16).contains(&self.threads) {
            e.push("motion.threads must be 1..16".into());
        }
        if !(self.fd_threshold_mm.is_finite() && self.fd_threshold_mm > 0.0) {
            e.push("motion.fd_threshold_mm must be positive".into());
        }
        if let Some(p) = &self.reference_file {
            if !p.exists() {
                e.push(format!("motion.reference_file: {} does not exist", p.display()));
            }
        }
        e
    }

    fn optimiser(&self) -> Optimiser {
        Optimiser {
            levels: self.levels,
            max_iterations: self.max_iterations,
            tolerance_mm: self.tolerance_mm,
            mask_threshold: self.mask_threshold,
            sample_fraction: self.sample_fraction,
            bspline: self.bspline,
        }
    }
}

/// The motion of one volume.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MotionEstimate {
    /// The six parameters (about the world origin; see [`rigid`]).
    pub params: RigidParams,
    /// World matrix `M` with `reference(p) ≈ moving(M · p)`.
    pub matrix: Affine,
    /// Power's framewise displacement from the previous volume (0 for the first), mm.
    pub framewise_displacement: f64,
    /// True when the displacement exceeds the configured threshold.
    pub fd_exceeded: bool,
    /// Gauss–Newton steps taken.
    pub iterations: u32,
    /// Mean squared residual at the end.
    pub cost: f64,
    /// Whether the optimiser met its tolerance.
    pub converged: bool,
    /// Index of the reference volume (`None`: a reference file).
    pub reference_index: Option<u64>,
}

/// A realigned volume and its motion.
#[derive(Clone, Debug)]
pub struct Realigned {
    /// The volume resliced onto the reference grid.
    pub volume: Volume,
    /// Its motion.
    pub estimate: MotionEstimate,
}

/// Online realignment: holds the reference and the previous estimate.
pub struct MotionCorrector {
    cfg: MotionConfig,
    opt: Optimiser,
    reference: Option<(Reference, Option<u64>)>,
    /// The run's reference volume, checked and used but not yet prepared.
    pending: Option<Volume>,
    from_file: bool,
    previous: Option<(Affine, RigidParams)>,
}

impl MotionCorrector {
    /// Builds the corrector, reading the reference file if one is configured.
    pub fn new(cfg: &MotionConfig) -> Result<MotionCorrector, MotionError> {
        let opt = cfg.optimiser();
        let reference = match &cfg.reference_file {
            Some(path) => {
                let err = |reason: String| MotionError::ReferenceFile { path: path.clone(), reason };
                let img = read_nifti(path, 1 << 26).map_err(|e| err(e.to_string()))?;
                let first = img.volumes.first().ok_or_else(|| err("no volume".into()))?;
                Some((Reference::prepare(first, img.dims, &img.affine, &opt)?, None))
            }
            None => None,
        };
        Ok(MotionCorrector {
            from_file: reference.is_some(),
            cfg: cfg.clone(),
            opt,
            reference,
            pending: None,
            previous: None,
        })
    }

    /// Threads the runner gives this corrector (`motion.threads`).
    pub fn threads(&self) -> usize {
        self.cfg.threads
    }

    /// A corrector whose reference is the volume `v` (e.g. volume K of a file read ahead).
    pub fn with_reference_volume(cfg: &MotionConfig, v: &Volume) -> Result<MotionCorrector, MotionError> {
        let opt = cfg.optimiser();
        let reference = Reference::prepare(&v.data, v.dims, &v.affine, &opt)?;
        Ok(MotionCorrector {
            from_file: true,
            cfg: cfg.clone(),
            opt,
            reference: Some((reference, Some(v.index))),
            pending: None,
            previous: None,
        })
    }

    /// The prepared reference, once there is one.
    pub fn reference(&self) -> Option<&Reference> {
        self.reference.as_ref().map(|(r, _)| r)
    }

    /// Prepares the reference volume that [`MotionCorrector::process`] took (10–40 ms at
    /// 64×64×36). The runner calls it once that volume's frame has gone on, so no volume's
    /// feedback waits for it; otherwise `process` does, before the next volume. On failure the
    /// next volume becomes the reference.
    pub fn prepare_reference(&mut self) -> Result<(), MotionError> {
        let Some(v) = self.pending.take() else { return Ok(()) };
        let r = Reference::prepare(&v.data, v.dims, &v.affine, &self.opt)?;
        self.reference = Some((r, Some(v.index)));
        Ok(())
    }

    /// Realigns `v`. `new_run` resets the run's reference and history. Returns `None` while
    /// waiting for the reference volume (the volume is then passed on as it is).
    pub fn process(&mut self, v: &Volume, new_run: bool) -> Result<Option<Realigned>, MotionError> {
        if new_run {
            self.previous = None;
            if !self.from_file {
                self.reference = None;
                self.pending = None;
            }
        }
        self.prepare_reference()?;
        if self.reference.is_none() {
            if v.index < self.cfg.reference_volume {
                return Ok(None);
            }
            // The reference is its own realignment: it goes on now, prepared afterwards.
            Reference::check(&v.data, v.dims)?;
            self.pending = Some(v.clone());
            let estimate = self.estimate(IDENTITY_AFFINE, 0, 0.0, true, Some(v.index));
            return Ok(Some(Realigned { volume: v.clone(), estimate }));
        }
        let Some((reference, reference_index)) = &self.reference else { return Ok(None) };
        let start = self.previous.map_or(IDENTITY_AFFINE, |(m, _)| m);
        let fit: Fit = reference.register(&v.data, v.dims, &v.affine, &start, &self.opt)?;
        let volume = reslice(v, reference, &fit.matrix)?;
        let reference_index = *reference_index;
        let estimate = self.estimate(fit.matrix, fit.iterations, fit.cost, fit.converged, reference_index);
        Ok(Some(Realigned { volume, estimate }))
    }

    fn estimate(
        &mut self,
        matrix: Affine,
        iterations: u32,
        cost: f64,
        converged: bool,
        reference_index: Option<u64>,
    ) -> MotionEstimate {
        let params = RigidParams::from_matrix(&matrix);
        let fd = self.previous.map_or(0.0, |(_, p)| params.framewise_displacement(&p));
        self.previous = Some((matrix, params));
        MotionEstimate {
            params,
            matrix,
            framewise_displacement: fd,
            fd_exceeded: fd > self.cfg.fd_threshold_mm,
            iterations,
            cost,
            converged,
            reference_index,
        }
    }
}

/// Whether work here may be split in two: inside a pool of more than one thread (the runner's,
/// for `motion.threads` > 1), never spilling onto rayon's global pool.
pub(crate) fn split_here() -> bool {
    rayon::current_thread_index().is_some() && rayon::current_num_threads() > 1
}

/// `v` resampled onto the reference grid through `m` (`out(p) = v(M · p)`); outside is 0.
pub fn reslice(v: &Volume, reference: &Reference, m: &Affine) -> Result<Volume, MotionError> {
    reslice_onto(v, reference.dims, &reference.affine, m)
}

/// `v` resampled onto the grid `dims` / `affine` through `m`: the live stage's reslicing, for
/// whoever holds the matrix but not the prepared reference (the BIDS export).
pub fn reslice_onto(
    v: &Volume,
    dims: [usize; 3],
    affine: &Affine,
    m: &Affine,
) -> Result<Volume, MotionError> {
    let inv = affine_inverse(&v.affine)
        .ok_or_else(|| MotionError::Degenerate("the volume's affine is singular".into()))?;
    let k = mat_mul(&inv, &mat_mul(m, affine));
    let mut data = vec![0f32; dims.iter().product()];
    resample_trilinear(&v.data, v.dims, &k, 0.0, &mut data, dims);
    Ok(Volume { data, dims, affine: *affine, ..v.clone_meta() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth blob image on a 24×24×16 grid at 4 mm.
    fn blob(index: u64) -> Volume {
        let dims = [24, 24, 16];
        let affine =
            [[4.0, 0.0, 0.0, -46.0], [0.0, 4.0, 0.0, -46.0], [0.0, 0.0, 4.0, -30.0], [0.0, 0.0, 0.0, 1.0]];
        let data = (0..24 * 24 * 16)
            .map(|v| {
                let (i, j, k) = ((v % 24) as f32, ((v / 24) % 24) as f32, (v / 576) as f32);
                let r2 = ((i - 11.0) / 6.0).powi(2) + ((j - 12.5) / 7.0).powi(2) + ((k - 7.5) / 4.5).powi(2);
                1000.0 * (-r2).exp()
                    + 300.0 * (-(((i - 8.0) / 2.0).powi(2) + ((j - 15.0) / 3.0).powi(2))).exp()
            })
            .collect();
        Volume {
            data,
            dims,
            affine,
            index,
            run: "r".into(),
            tr: Some(1.0),
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        }
    }

    #[test]
    fn degenerate_volumes_are_clear_errors_and_the_corrector_recovers() {
        let mut mc = MotionCorrector::new(&MotionConfig::default()).unwrap();
        mc.process(&blob(0), true).unwrap().unwrap();
        let mut constant = blob(1);
        constant.data.fill(500.0);
        assert!(matches!(mc.process(&constant, false), Err(MotionError::Degenerate(_))));
        let mut zeros = blob(2);
        zeros.data.fill(0.0);
        assert!(matches!(mc.process(&zeros, false), Err(MotionError::Degenerate(_))));
        let mut all_nan = blob(3);
        all_nan.data.fill(f32::NAN);
        assert!(matches!(mc.process(&all_nan, false), Err(MotionError::Degenerate(_))));
        let mut short = blob(4);
        short.data.truncate(100);
        assert!(matches!(mc.process(&short, false), Err(MotionError::Shape(_))));
        // A few NaN voxels drop out of the estimate; the result stays finite and near identity.
        let mut holes = blob(5);
        for v in (0..holes.data.len()).step_by(97) {
            holes.data[v] = f32::NAN;
        }
        let r = mc.process(&holes, false).unwrap().unwrap();
        assert!(
            r.estimate.params.to_array().iter().all(|p| p.is_finite() && p.abs() < 0.05),
            "{:?}",
            r.estimate.params
        );
        // A constant reference cannot be used.
        let mut flat = MotionCorrector::new(&MotionConfig::default()).unwrap();
        assert!(matches!(flat.process(&constant, true), Err(MotionError::Degenerate(_))));
    }

    #[test]
    fn two_threads_realign_as_one_does() {
        // The blob moved 1.3 voxels along x: a real estimate, then a reslice off the grid.
        let mut moved = blob(1);
        let n = moved.dims[0];
        let src = moved.data.clone();
        for (v, x) in moved.data.iter_mut().enumerate() {
            let i = (v % n) as f32 - 1.3;
            let (i0, t) = (i.floor().clamp(0.0, n as f32 - 2.0) as usize, i - i.floor());
            let base = v - v % n;
            *x = src[base + i0] * (1.0 - t) + src[base + i0 + 1] * t;
        }
        let realign = || {
            let mut mc = MotionCorrector::new(&MotionConfig::default()).unwrap();
            mc.process(&blob(0), true).unwrap().unwrap();
            mc.process(&moved, false).unwrap().unwrap()
        };
        let one = realign();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (two, split) = pool.install(|| (realign(), split_here()));
        assert!(split && !split_here());
        assert!((one.estimate.params.trans[0].abs() - 5.2).abs() < 0.3, "{:?}", one.estimate.params);
        // Only the order of the sums differs.
        let (a, b) = (one.estimate.params.to_array(), two.estimate.params.to_array());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-9), "{a:?} {b:?}");
        assert_eq!(one.estimate.iterations, two.estimate.iterations);
        // Slices are resliced independently: the halves join into the same volume.
        let (dims, affine, m) = (one.volume.dims, one.volume.affine, one.estimate.matrix);
        let halves = pool.install(|| reslice_onto(&moved, dims, &affine, &m)).unwrap();
        assert_eq!(halves.data, reslice_onto(&moved, dims, &affine, &m).unwrap().data);
        assert_eq!(halves.data, one.volume.data);
    }

    #[test]
    fn the_reference_volume_goes_on_before_it_is_prepared() {
        let mut moved = blob(1);
        moved.data.rotate_left(1);
        let mut deferred = MotionCorrector::new(&MotionConfig::default()).unwrap();
        let first = deferred.process(&blob(0), true).unwrap().unwrap();
        assert!(deferred.reference().is_none());
        assert_eq!((first.estimate.reference_index, first.estimate.iterations), (Some(0), 0));
        assert_eq!(first.volume.data, blob(0).data);
        deferred.prepare_reference().unwrap();
        assert!(deferred.reference().is_some());
        let after = deferred.process(&moved, false).unwrap().unwrap();
        // Without the runner's call, the next volume prepares it: the same estimate.
        let mut inline = MotionCorrector::new(&MotionConfig::default()).unwrap();
        inline.process(&blob(0), true).unwrap().unwrap();
        let next = inline.process(&moved, false).unwrap().unwrap();
        assert!(after.estimate.params.trans[0].abs() > 3.0, "{:?}", after.estimate.params);
        assert_eq!(after.estimate, next.estimate);
        // A reference that fails its preparation hands the part to the next volume.
        let mut sparse = blob(0);
        sparse.data.iter_mut().enumerate().for_each(|(v, x)| *x = if v % 1000 == 0 { 1.0 } else { 0.0 });
        let mut failing = MotionCorrector::new(&MotionConfig::default()).unwrap();
        failing.process(&sparse, true).unwrap().unwrap();
        assert!(matches!(failing.prepare_reference(), Err(MotionError::Degenerate(_))));
        let taken = failing.process(&blob(1), false).unwrap().unwrap().estimate;
        assert_eq!((taken.reference_index, taken.iterations), (Some(1), 0));
    }

    #[test]
    fn another_grid_is_realigned_in_world_space_onto_the_reference_grid() {
        let mut mc = MotionCorrector::new(&MotionConfig::default()).unwrap();
        let reference = blob(0);
        mc.process(&reference, true).unwrap().unwrap();
        // The same object on a grid shifted by half a voxel and with x flipped (LAS).
        let mut las = blob(1);
        let n = las.dims[0];
        for k in 0..las.dims[2] {
            for j in 0..las.dims[1] {
                for i in 0..n {
                    las.data[i + n * (j + las.dims[1] * k)] =
                        reference.data[(n - 1 - i) + n * (j + las.dims[1] * k)];
                }
            }
        }
        las.affine[0][0] = -4.0;
        las.affine[0][3] = -46.0 + 4.0 * (n as f64 - 1.0);
        let r = mc.process(&las, false).unwrap().unwrap();
        assert!(r.estimate.params.to_array().iter().all(|p| p.abs() < 1e-3), "{:?}", r.estimate.params);
        assert_eq!((r.volume.dims, r.volume.affine), (reference.dims, reference.affine));
        let worst = r.volume.data.iter().zip(&reference.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1.0, "resliced LAS volume differs from the reference by {worst}");
    }

    #[test]
    fn reference_volume_k_and_framewise_displacement_flags() {
        let cfg = MotionConfig { reference_volume: 2, fd_threshold_mm: 0.2, ..MotionConfig::default() };
        let mut mc = MotionCorrector::new(&cfg).unwrap();
        assert!(mc.process(&blob(0), true).unwrap().is_none());
        assert!(mc.process(&blob(1), false).unwrap().is_none());
        let first = mc.process(&blob(2), false).unwrap().unwrap().estimate;
        assert_eq!((first.reference_index, first.framewise_displacement), (Some(2), 0.0));
        // Move the object one voxel (4 mm) along y: FD about 4 mm, flagged.
        let mut moved = blob(3);
        let d = moved.dims;
        let src = moved.data.clone();
        for v in 0..src.len() {
            let j = (v / d[0]) % d[1];
            moved.data[v] = if j == 0 { 0.0 } else { src[v - d[0]] };
        }
        let e = mc.process(&moved, false).unwrap().unwrap().estimate;
        assert!((e.params.trans[1] - 4.0).abs() < 0.05, "{:?}", e.params);
        assert!(e.fd_exceeded && (e.framewise_displacement - 4.0).abs() < 0.1);
        // A new run takes its own reference.
        let again = mc.process(&blob(0), true).unwrap();
        assert!(again.is_none());
    }
}
