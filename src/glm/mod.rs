//! The GLM stage: exact online least squares with HRF-convolved trial regressors, drift and
//! motion nuisance; ROI feedback every volume and single-trial betas as each trial closes.
//!
//! Time: volume `i` of a run is acquired at `i · TR` (the scanner's clock). Events with an
//! onset relative to the run are placed as they are; events stamped on the daemon's clock
//! (LSL markers) are placed relative to the acquisition time of the run's first volume (its
//! receipt time when the sender gives none, as pyneal-scanner does).
//!
//! In: realigned volumes (with their motion estimates) and trial events. Out per volume: the
//! mean signal of each ROI, detrended, as percent signal change ([`RoiValue`]); per trial, once
//! its window has passed (onset + `trial_window_s`): its betas over the mask
//! ([`TrialBetas`]). At every volume the estimates are exactly those of an offline fit of the
//! volumes so far ([`estimator`]); the update costs O(voxels × regressors).
//!
//! AR(1): with `ar1 = true`, the first `ar1_warmup` volumes are fitted by OLS; the pooled lag-1
//! autocorrelation of their residuals (an estimate, not bias-corrected) is then frozen as ρ and
//! every row so far is prewhitened (Prais–Winsten). From then on the estimates are exactly the
//! GLS fit for that ρ; what is approximate is ρ itself.

pub mod design;
pub mod estimator;
pub mod events;
pub mod hrf;
pub mod offline;
pub mod stage;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use self::design::{Column, RowInfo};
use self::estimator::{Factor, OlsStats};
use self::events::{Event, Onset};
use crate::motion::MotionEstimate;
use crate::reason::Reason;
use crate::volume::Volume;

/// Counted when: GLM settings that could not be used.
pub const GLM_SETUP: Reason = Reason::new("glm_setup", "GLM settings that could not be used");
/// Counted when: a volume the GLM could not take.
pub const GLM_VOLUME: Reason = Reason::new("glm_volume", "a volume the GLM could not take");
/// Counted when: a voxel gone NaN for the first time (masked out from then on).
pub const NAN_VOXELS: Reason = Reason::new("nan_voxels", "voxels found NaN and masked out");
/// Counted when: an event arrived later than the volumes the GLM keeps (its estimates are
/// approximate).
pub const LATE_EVENTS: Reason =
    Reason::new("late_events", "events later than the kept volumes: approximate estimates");
/// Counted when: an event that could not be used (a trial id already taken).
pub const REJECTED_EVENTS: Reason =
    Reason::new("rejected_events", "events refused: their trial id was already taken");
/// What the GLM stage counts.
pub const REASONS: &[Reason] = &[GLM_SETUP, GLM_VOLUME, NAN_VOXELS, LATE_EVENTS, REJECTED_EVENTS];

/// Why the GLM could not process a volume or start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GlmError {
    /// A mask, ROI or events file could not be used.
    #[error("glm: {0}")]
    Setup(String),
    /// The volume does not fit the run's grid or timing.
    #[error("glm: {0}")]
    Volume(String),
}

impl GlmError {
    /// Counter name of this kind of error.
    pub fn reason(&self) -> Reason {
        match self {
            GlmError::Setup(_) => GLM_SETUP,
            GlmError::Volume(_) => GLM_VOLUME,
        }
    }
}

/// One regressor per trial, or one per condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// Least squares all: one regressor per trial (single-trial betas).
    Trial,
    /// One regressor per condition label.
    Condition,
}

/// Slow drift regressors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Drift {
    /// Legendre polynomials up to `drift_order` in `t / drift_scale_s − 1`.
    Polynomial,
    /// SPM's discrete cosine set up to the `highpass_s` cut-off; needs `run_length_s`.
    Cosine,
    /// None.
    None,
}

/// One ROI whose mean is fed back every volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoiSpec {
    /// Name in the `roi` topic.
    pub name: String,
    /// NIfTI mask on the reference grid; values > 0 are weights.
    pub path: PathBuf,
}

/// An ROI `path` that names the simulator's visual ROI (with `sim://` ingest).
pub const SIM_ROI: &str = "sim";

/// `[glm]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlmConfig {
    /// Fit the GLM (false: pass volumes on).
    pub enabled: bool,
    /// Trial (LSA) or condition regressors.
    pub model: Model,
    /// A BIDS `events.tsv` known before the run (applied to every run).
    pub events: Option<PathBuf>,
    /// A live marker stream, `lsl://NAME`.
    pub markers: Option<String>,
    /// Duration (s) of events that do not give one.
    pub default_duration_s: f64,
    /// Drift model.
    pub drift: Drift,
    /// Highest polynomial degree.
    pub drift_order: usize,
    /// Seconds mapped onto the polynomials' unit interval.
    pub drift_scale_s: f64,
    /// High-pass cut-off of the cosine drift, s.
    pub highpass_s: f64,
    /// Run length for the cosine drift, s.
    pub run_length_s: Option<f64>,
    /// Add the six motion parameters as regressors.
    pub motion_regressors: bool,
    /// Add their backward differences too.
    pub motion_derivatives: bool,
    /// AR(1) prewhitening (see the module docs).
    pub ar1: bool,
    /// Volumes fitted by OLS before ρ is estimated and frozen.
    pub ar1_warmup: usize,
    /// Voxels fitted: `auto` (brain mask of the run's first volume), `sim` (the simulator's
    /// visual ROI, with `sim://` ingest) or a NIfTI mask path.
    pub mask: String,
    /// `auto` mask: voxels above this fraction of the first volume's 99th percentile.
    pub mask_threshold: f64,
    /// ROIs fed back every volume.
    pub rois: Vec<RoiSpec>,
    /// A trial's betas are published at its onset plus this many seconds.
    pub trial_window_s: f64,
    /// Repetition time (s) for volumes whose sender gives none.
    pub tr: Option<f64>,
    /// Rows folded per batch; the last `batch` volumes are always kept, so events up to
    /// `batch` volumes late stay exact.
    pub batch: usize,
}

impl crate::settings::InputFiles for GlmConfig {
    /// The events file, the mask and each ROI's mask.
    fn resolve_inputs(&mut self, base: &std::path::Path) {
        if let Some(p) = &mut self.events {
            crate::settings::rebase(p, base);
        }
        crate::settings::rebase_text(&mut self.mask, base);
        for r in &mut self.rois {
            crate::settings::rebase(&mut r.path, base);
        }
    }
}

impl Default for GlmConfig {
    fn default() -> GlmConfig {
        GlmConfig {
            enabled: true,
            model: Model::Trial,
            events: None,
            markers: None,
            default_duration_s: 0.0,
            drift: Drift::Polynomial,
            drift_order: 2,
            drift_scale_s: 300.0,
            highpass_s: 128.0,
            run_length_s: None,
            motion_regressors: true,
            motion_derivatives: false,
            ar1: false,
            ar1_warmup: 30,
            mask: "auto".into(),
            mask_threshold: 0.2,
            rois: Vec::new(),
            trial_window_s: 12.0,
            tr: None,
            batch: 16,
        }
    }
}

impl GlmConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if self.drift == Drift::Cosine && !self.run_length_s.is_some_and(positive) {
            e.push("glm.drift = \"cosine\" needs glm.run_length_s (the run's length in seconds)".into());
        }
        if !positive(self.drift_scale_s) || !positive(self.highpass_s) || !positive(self.trial_window_s) {
            e.push("glm.drift_scale_s, glm.highpass_s and glm.trial_window_s must be positive".into());
        }
        if !(self.default_duration_s.is_finite() && self.default_duration_s >= 0.0) {
            e.push("glm.default_duration_s must be >= 0".into());
        }
        if self.ar1 && self.ar1_warmup < 8 {
            e.push("glm.ar1_warmup must be at least 8 volumes".into());
        }
        if self.batch == 0 {
            e.push("glm.batch must be at least 1".into());
        }
        if !(self.mask_threshold > 0.0 && self.mask_threshold < 1.0) {
            e.push("glm.mask_threshold must be in (0, 1)".into());
        }
        if self.tr.is_some_and(|t| !positive(t)) {
            e.push("glm.tr must be positive".into());
        }
        if let Some(p) = &self.events {
            if !p.exists() {
                e.push(format!("glm.events: {} does not exist", p.display()));
            }
        }
        if self.mask != "auto" && self.mask != "sim" && !PathBuf::from(&self.mask).exists() {
            e.push(format!("glm.mask: {} is not \"auto\", \"sim\" or an existing file", self.mask));
        }
        for r in &self.rois {
            if r.path != std::path::Path::new(SIM_ROI) && !r.path.exists() {
                e.push(format!("glm.rois: {} ({}) does not exist", r.path.display(), r.name));
            }
        }
        if let Some(m) = &self.markers {
            if !m.starts_with("lsl://") || m.len() <= 6 {
                e.push(format!("glm.markers {m:?}: use lsl://NAME"));
            }
        }
        e
    }
}

/// One ROI's value at one volume.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoiValue {
    /// ROI name.
    pub name: String,
    /// Weighted mean of the volume over the ROI.
    pub mean: f64,
    /// The mean with drift and motion removed, in percent of the fitted baseline (`None`
    /// until the baseline is estimable).
    pub psc: Option<f64>,
}

/// One trial's betas at the moment its window closed (or at the end of the run).
#[derive(Clone, Debug, PartialEq)]
pub struct TrialBetas {
    /// Run id.
    pub run: String,
    /// Trial id.
    pub trial: u64,
    /// Stimulus id.
    pub stim: Option<u64>,
    /// Condition label.
    pub condition: String,
    /// Onset, s after the run's first volume.
    pub onset: f64,
    /// Duration, s.
    pub duration: f64,
    /// Volumes in the fit.
    pub n_volumes: usize,
    /// False when the design cannot separate this trial yet (betas are then zeros).
    pub estimable: bool,
    /// True for the estimate from all of the run's volumes (sent when the run ends).
    pub at_run_end: bool,
    /// One beta per mask voxel (ascending voxel index; 0 where a voxel was NaN).
    pub betas: Vec<f32>,
    /// The mask voxels' grid indices (x fastest), in the order of `betas`.
    pub voxels: Vec<u32>,
}

/// What the stage adds to one volume.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GlmOutput {
    /// ROI feedback.
    pub roi: Vec<RoiValue>,
    /// Trials whose window closed with this volume.
    pub trials: Vec<TrialBetas>,
    /// Voxels found NaN for the first time in this volume (now masked out).
    pub new_nan_voxels: usize,
    /// Events that arrived too late for exact estimates.
    pub late_events: usize,
    /// Events that could not be used (duplicate trial id).
    pub rejected_events: usize,
}

/// The fit of every column at once (end of run, offline).
#[derive(Clone, Debug)]
pub struct FullFit {
    /// Column names.
    pub names: Vec<String>,
    /// Rows of the (unwhitened) design used.
    pub design: Vec<Vec<f64>>,
    /// Betas, column by column, one per mask voxel.
    pub betas: Vec<Vec<f32>>,
    /// t statistics, column by column (0 where not estimable).
    pub tstats: Vec<Vec<f32>>,
    /// Mask voxels (ascending indices into the grid).
    pub mask: Vec<usize>,
    /// Estimated AR(1) coefficient, when prewhitening.
    pub rho: Option<f64>,
}

struct TrialState {
    id: u64,
    stim: Option<u64>,
    condition: String,
    onset: f64,
    duration: f64,
    column: usize,
    closed: bool,
}

struct Roi {
    name: String,
    /// (position in the mask-independent grid, weight)
    voxels: Vec<(usize, f32)>,
    series: Vec<f64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Ar1 {
    Off,
    WarmingUp,
    Frozen(f64),
}

struct Run {
    name: String,
    dims: [usize; 3],
    mask: Vec<usize>,
    nan: Vec<bool>,
    rois: Vec<Roi>,
    rows: Vec<RowInfo>,
    columns: Vec<Column>,
    stats: OlsStats,
    t0: f64,
    tr: f64,
    trials: Vec<TrialState>,
    next_trial: u64,
    ar1: Ar1,
    prev_y: Option<Vec<f32>>,
}

/// Online GLM over the runs of a session.
pub struct GlmEstimator {
    cfg: GlmConfig,
    given: Option<Vec<Column>>,
    fixed_mask: Option<([usize; 3], Vec<usize>)>,
    roi_masks: Vec<(String, WeightedMask)>,
    /// The mask and ROI files' grids, checked against each run's first volume.
    file_grids: Vec<(String, std::path::PathBuf, [usize; 3], crate::volume::Affine)>,
    run_events: Vec<Event>,
    queued: Vec<Event>,
    run: Option<Run>,
}

/// A mask's grid and its voxels with their weights.
type WeightedMask = ([usize; 3], Vec<(usize, f32)>);

/// World coordinates (mm) two affines may differ by and still be one grid.
pub const AFFINE_TOLERANCE_MM: f64 = 1e-3;

/// Whether two voxel-to-world matrices are the same grid (to [`AFFINE_TOLERANCE_MM`]). An
/// identity matrix is a file that says nothing of where it lies (pyneal's test series, a
/// header without orientation): it matches any placement, and only the dimensions are compared.
pub fn same_affine(a: &crate::volume::Affine, b: &crate::volume::Affine) -> bool {
    let identity: crate::volume::Affine =
        std::array::from_fn(|i| std::array::from_fn(|j| (i == j) as u8 as f64));
    let close = |a: &crate::volume::Affine, b: &crate::volume::Affine| {
        a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| (x - y).abs() <= AFFINE_TOLERANCE_MM)
    };
    close(a, b) || close(a, &identity) || close(b, &identity)
}

/// A grid as an error names it: its dimensions and its voxel-to-world matrix's rows.
fn grid_text(dims: [usize; 3], a: &crate::volume::Affine) -> String {
    let rows: Vec<String> =
        a[..3].iter().map(|r| format!("[{:.3}, {:.3}, {:.3}, {:.3}]", r[0], r[1], r[2], r[3])).collect();
    format!("{}x{}x{} at {}", dims[0], dims[1], dims[2], rows.join(" "))
}

/// The mask and ROI files of `cfg`, each with the key that names it.
fn mask_files(cfg: &GlmConfig) -> Vec<(String, std::path::PathBuf)> {
    let mut files = Vec::new();
    if !matches!(cfg.mask.as_str(), "auto" | "sim") {
        files.push(("glm.mask".to_string(), std::path::PathBuf::from(&cfg.mask)));
    }
    for r in cfg.rois.iter().filter(|r| r.path != std::path::Path::new(SIM_ROI)) {
        files.push((format!("glm.rois {:?}", r.name), r.path.clone()));
    }
    files
}

/// A NIfTI file's grid, from its header.
fn file_grid(path: &std::path::Path) -> Result<([usize; 3], crate::volume::Affine), String> {
    let r = crate::io::nifti::NiftiReader::open(path, 1 << 26).map_err(|e| e.to_string())?;
    Ok((r.header().volume_dims(), r.header().affine()))
}

/// The error for a file whose grid is not the volumes', naming both; `None` when it is.
fn grid_mismatch(
    what: &str,
    path: &std::path::Path,
    (d, a): ([usize; 3], crate::volume::Affine),
    (dims, affine): ([usize; 3], &crate::volume::Affine),
) -> Option<String> {
    (d != dims || !same_affine(&a, affine)).then(|| {
        format!(
            "{what} {}: its grid {} is not the volumes' {}; resample it onto the EPI grid",
            path.display(),
            grid_text(d, &a),
            grid_text(dims, affine)
        )
    })
}

/// Each mask and ROI file of `cfg` whose grid is not the volumes' (`dims`, `affine`), named with
/// both grids: masks are used voxel by voxel, so another grid (or the same dimensions placed
/// elsewhere) would read the wrong voxels.
pub fn grid_errors(cfg: &GlmConfig, dims: [usize; 3], affine: &crate::volume::Affine) -> Vec<String> {
    mask_files(cfg)
        .iter()
        .filter_map(|(what, path)| match file_grid(path) {
            Ok(grid) => grid_mismatch(what, path, grid, (dims, affine)),
            Err(e) => Some(format!("{what} {}: {e}", path.display())),
        })
        .collect()
}

fn read_mask(path: &std::path::Path) -> Result<WeightedMask, GlmError> {
    let img = crate::io::nifti::read_nifti(path, 1 << 26).map_err(|e| GlmError::Setup(e.to_string()))?;
    let first =
        img.volumes.first().ok_or_else(|| GlmError::Setup(format!("{}: no volume", path.display())))?;
    let voxels: Vec<(usize, f32)> =
        first.iter().enumerate().filter(|(_, w)| w.is_finite() && **w > 0.0).map(|(i, w)| (i, *w)).collect();
    if voxels.is_empty() {
        return Err(GlmError::Setup(format!("{}: the mask is empty", path.display())));
    }
    Ok((img.dims, voxels))
}

impl GlmEstimator {
    /// Reads the events file and masks named in the configuration.
    pub fn new(cfg: &GlmConfig) -> Result<GlmEstimator, GlmError> {
        let run_events = match &cfg.events {
            Some(p) => events::read_events_tsv(p).map_err(|e| GlmError::Setup(e.to_string()))?,
            None => Vec::new(),
        };
        let fixed_mask = match cfg.mask.as_str() {
            "auto" | "sim" => None,
            path => {
                let (dims, v) = read_mask(std::path::Path::new(path))?;
                Some((dims, v.into_iter().map(|(i, _)| i).collect()))
            }
        };
        // The simulator's ROI is filled in by `with_roi` once the simulator is known.
        let roi_masks = cfg
            .rois
            .iter()
            .map(|r| match r.path == std::path::Path::new(SIM_ROI) {
                true => Ok((r.name.clone(), ([0; 3], Vec::new()))),
                false => read_mask(&r.path).map(|m| (r.name.clone(), m)),
            })
            .collect::<Result<_, _>>()?;
        let file_grids = mask_files(cfg)
            .into_iter()
            .filter_map(|(what, path)| file_grid(&path).ok().map(|(d, a)| (what, path, d, a)))
            .collect();
        Ok(GlmEstimator {
            cfg: cfg.clone(),
            given: None,
            fixed_mask,
            roi_masks,
            file_grids,
            run_events,
            queued: Vec::new(),
            run: None,
        })
    }

    /// A mask given as voxel indices on a grid (e.g. the simulator's visual ROI).
    pub fn with_mask(mut self, dims: [usize; 3], voxels: Vec<usize>) -> GlmEstimator {
        self.fixed_mask = Some((dims, voxels));
        self
    }

    /// Sets ROI `name`'s voxels (weight 1) on a grid, e.g. the simulator's visual ROI.
    pub fn with_roi(mut self, name: &str, dims: [usize; 3], voxels: &[usize]) -> GlmEstimator {
        for (n, mask) in &mut self.roi_masks {
            if n == name {
                *mask = (dims, voxels.iter().map(|&v| (v, 1.0)).collect());
            }
        }
        self
    }

    /// Uses these columns (e.g. from a design file) instead of events: with an intercept unless
    /// one of them is constant, and the configured drift.
    pub fn with_design(mut self, columns: Vec<Column>) -> GlmEstimator {
        self.given = Some(columns);
        self
    }

    /// Queues a live event; it is placed on the run's clock with the next volume.
    pub fn add_event(&mut self, e: Event) {
        self.queued.push(e);
    }

    /// The mask voxels of the current run.
    pub fn mask(&self) -> Option<&[usize]> {
        self.run.as_ref().map(|r| r.mask.as_slice())
    }

    /// Takes in one (realigned) volume. `new_run` starts a fresh fit; the previous run's
    /// trials are returned with their end-of-run estimates, then those this volume closed.
    pub fn process(
        &mut self,
        v: &Volume,
        motion: Option<&MotionEstimate>,
        new_run: bool,
    ) -> Result<GlmOutput, GlmError> {
        let mut out = self.update(v, motion, new_run)?;
        out.trials.extend(self.close_due_trials());
        Ok(out)
    }

    /// [`GlmEstimator::process`] but for the trials this volume closes: the fit and the ROI
    /// feedback. [`GlmEstimator::close_due_trials`], before the next volume, gives those.
    pub fn update(
        &mut self,
        v: &Volume,
        motion: Option<&MotionEstimate>,
        new_run: bool,
    ) -> Result<GlmOutput, GlmError> {
        let mut out = GlmOutput::default();
        if new_run || self.run.is_none() {
            if let Some(old) = self.run.as_mut() {
                out.trials = close_remaining(old);
            }
            self.run = Some(self.start_run(v)?);
            let events = self.run_events.clone();
            for e in events {
                self.place(e, &mut out);
            }
        }
        let queued = std::mem::take(&mut self.queued);
        for e in queued {
            self.place(e, &mut out);
        }
        let cfg = self.cfg.clone();
        let Some(run) = self.run.as_mut() else { return Ok(out) };
        if v.dims != run.dims {
            return Err(GlmError::Volume(format!("grid {:?} differs from the run's {:?}", v.dims, run.dims)));
        }
        // The scanner's clock: volume i is acquired at i · TR.
        let time = v.index as f64 * run.tr;
        if let Some(last) = run.rows.last() {
            if time <= last.time {
                return Err(GlmError::Volume(format!(
                    "volume {} at {time:.3} s is not after the previous one",
                    v.index
                )));
            }
        }
        let motion_params = motion.map(|m| m.params.to_array());
        if cfg.motion_regressors
            && motion_params.is_some()
            && !run.columns.iter().any(|c| matches!(c, Column::Motion(_)))
        {
            let mut cols: Vec<Column> = (0..6).map(Column::Motion).collect();
            if cfg.motion_derivatives {
                cols.extend((0..6).map(Column::MotionDerivative));
            }
            for c in cols {
                add_column(run, c);
            }
        }
        run.rows.push(RowInfo { time, motion: motion_params });
        // Data: masked voxels; NaN voxels are masked out for good.
        let mut y = Vec::with_capacity(run.mask.len());
        for (k, &vox) in run.mask.iter().enumerate() {
            let val = v.data[vox];
            if !val.is_finite() && !run.nan[k] {
                run.nan[k] = true;
                out.new_nan_voxels += 1;
            }
            y.push(if run.nan[k] { 0.0 } else { val });
        }
        for roi in &mut run.rois {
            let (mut s, mut w) = (0.0, 0.0);
            for &(vox, wt) in &roi.voxels {
                let val = v.data[vox];
                if val.is_finite() {
                    s += f64::from(wt) * f64::from(val);
                    w += f64::from(wt);
                }
            }
            roi.series.push(if w > 0.0 { s / w } else { f64::NAN });
        }
        let t = run.rows.len() - 1;
        let x = whitened_row(run, t);
        let y_row = match (run.ar1, &run.prev_y) {
            (Ar1::Frozen(rho), Some(prev)) => y.iter().zip(prev).map(|(a, b)| a - rho as f32 * b).collect(),
            _ => y.clone(),
        };
        run.stats.push_row(x, y_row);
        run.prev_y = Some(y);
        if run.ar1 == Ar1::WarmingUp && run.rows.len() >= cfg.ar1_warmup {
            freeze_ar1(run, cfg.batch);
        }
        let factor = Factor::new(run.stats.xtx());
        out.roi = roi_feedback(run, &factor);
        Ok(out)
    }

    /// The trials whose window the last volume completed, each closed with its betas from the
    /// fit so far: the costly part of a volume's GLM (a solve per mask voxel), which the
    /// volume's own feedback does not wait for.
    pub fn close_due_trials(&mut self) -> Vec<TrialBetas> {
        let window = self.cfg.trial_window_s;
        let Some(run) = self.run.as_mut() else { return Vec::new() };
        let Some(time) = run.rows.last().map(|r| r.time) else { return Vec::new() };
        let due: Vec<usize> = (0..run.trials.len())
            .filter(|&i| !run.trials[i].closed && time >= run.trials[i].onset + window)
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        let factor = Factor::new(run.stats.xtx());
        let out = due.iter().map(|&i| trial_betas(run, i, &factor, false)).collect();
        due.iter().for_each(|&i| run.trials[i].closed = true);
        out
    }

    /// Ends the run: every trial's betas from all its volumes (`at_run_end`).
    pub fn finish(&mut self) -> Vec<TrialBetas> {
        self.run.as_mut().map(close_remaining).unwrap_or_default()
    }

    /// Fits every column on every mask voxel (betas and t statistics), e.g. at the end.
    pub fn full_fit(&self) -> Option<FullFit> {
        let run = self.run.as_ref()?;
        let factor = Factor::new(run.stats.xtx());
        let p = run.columns.len();
        let n = run.stats.rows();
        let dof = n.saturating_sub(factor.rank()) as f64;
        let mut betas = Vec::with_capacity(p);
        let mut diag = Vec::with_capacity(p);
        for j in 0..p {
            let mut e = vec![0.0; p];
            e[j] = 1.0;
            let w = factor.solve(&e);
            diag.push(w[j]);
            betas.push(run.stats.combine(&w));
        }
        // Residual sum of squares per voxel: YᵀY − Σ_j β_j (XᵀY)_j.
        let mut rss = run.stats.yty().to_vec();
        for j in (0..p).filter(|&j| factor.estimable[j]) {
            let mut e = vec![0.0; p];
            e[j] = 1.0;
            let xty_j = run.stats.combine(&e);
            rss.iter_mut().zip(&betas[j]).zip(&xty_j).for_each(|((r, b), x)| *r -= b * x);
        }
        let tstats = (0..p)
            .map(|j| {
                betas[j]
                    .iter()
                    .zip(&rss)
                    .zip(&run.nan)
                    .map(|((b, r), bad)| {
                        let var = r.max(0.0) / dof * diag[j];
                        if *bad || !factor.estimable[j] || dof <= 0.0 || var <= 0.0 {
                            0.0
                        } else {
                            (b / var.sqrt()) as f32
                        }
                    })
                    .collect()
            })
            .collect();
        let betas = betas
            .iter()
            .enumerate()
            .map(|(j, b)| {
                b.iter()
                    .zip(&run.nan)
                    .map(|(v, bad)| if *bad || !factor.estimable[j] { 0.0 } else { *v as f32 })
                    .collect()
            })
            .collect();
        let design = (0..n).map(|t| run.columns.iter().map(|c| c.value(&run.rows, t)).collect()).collect();
        let rho = match run.ar1 {
            Ar1::Frozen(r) => Some(r),
            _ => None,
        };
        Some(FullFit {
            names: run.columns.iter().map(Column::name).collect(),
            design,
            betas,
            tstats,
            mask: run.mask.clone(),
            rho,
        })
    }

    fn start_run(&self, v: &Volume) -> Result<Run, GlmError> {
        let cfg = &self.cfg;
        let tr =
            v.tr.or(cfg.tr).ok_or_else(|| GlmError::Volume("the volume has no TR; set glm.tr".into()))?;
        if let Some(e) =
            self.file_grids.iter().find_map(|(w, p, d, a)| grid_mismatch(w, p, (*d, *a), (v.dims, &v.affine)))
        {
            return Err(GlmError::Setup(e));
        }
        let mask = match &self.fixed_mask {
            Some((dims, voxels)) if *dims == v.dims => voxels.clone(),
            Some((dims, _)) => {
                return Err(GlmError::Setup(format!(
                    "mask grid {dims:?} differs from the volumes' {:?}",
                    v.dims
                )))
            }
            None => auto_mask(&v.data, cfg.mask_threshold),
        };
        if mask.is_empty() {
            return Err(GlmError::Setup("the mask has no voxels".into()));
        }
        let mut rois = Vec::new();
        for (name, (dims, voxels)) in &self.roi_masks {
            if *dims != v.dims {
                return Err(GlmError::Setup(format!(
                    "ROI {name}: grid {dims:?} differs from the volumes' {:?}",
                    v.dims
                )));
            }
            rois.push(Roi { name: name.clone(), voxels: voxels.clone(), series: Vec::new() });
        }
        let now = v.acq_time.unwrap_or(v.recv_time);
        let mut columns = match &self.given {
            Some(given) => {
                let constant = given.iter().any(|c| match c {
                    Column::Given { values, .. } => {
                        values.windows(2).all(|w| w[0] == w[1]) && values.first().is_some_and(|v| *v != 0.0)
                    }
                    _ => false,
                });
                let mut cols = given.clone();
                if !constant {
                    cols.insert(0, Column::Intercept);
                }
                cols
            }
            None => vec![Column::Intercept],
        };
        match cfg.drift {
            Drift::Polynomial => columns.extend(
                (1..=cfg.drift_order).map(|order| Column::Polynomial { order, scale: cfg.drift_scale_s }),
            ),
            Drift::Cosine => {
                let length = cfg.run_length_s.unwrap_or(0.0);
                let k_max = (2.0 * length / cfg.highpass_s).floor() as usize;
                columns.extend((1..=k_max).map(|k| Column::Cosine { k, length, half_tr: tr / 2.0 }));
            }
            Drift::None => {}
        }
        let mut stats = OlsStats::new(mask.len(), cfg.batch);
        for j in 0..columns.len() {
            let _ = stats.set_column(j, &[]);
        }
        let ar1 = if cfg.ar1 {
            stats.set_hold(true);
            Ar1::WarmingUp
        } else {
            Ar1::Off
        };
        Ok(Run {
            name: v.run.clone(),
            dims: v.dims,
            nan: vec![false; mask.len()],
            mask,
            rois,
            rows: Vec::new(),
            columns,
            stats,
            t0: now - v.index as f64 * tr,
            tr,
            trials: Vec::new(),
            next_trial: 0,
            ar1,
            prev_y: None,
        })
    }

    /// Puts an event into the design of the current run.
    fn place(&mut self, e: Event, out: &mut GlmOutput) {
        let Some(run) = self.run.as_mut() else {
            self.queued.push(e);
            return;
        };
        let onset = match e.onset {
            Onset::Relative(s) => s,
            Onset::Absolute(t) => t - run.t0,
        };
        let duration = e.duration.unwrap_or(self.cfg.default_duration_s);
        let id = e.trial.unwrap_or(run.next_trial);
        if run.trials.iter().any(|t| t.id == id) {
            tracing::warn!("glm: trial {id} already exists; event ignored");
            out.rejected_events += 1;
            return;
        }
        run.next_trial = run.next_trial.max(id + 1);
        let late = match self.cfg.model {
            Model::Trial => {
                let column = run.columns.len();
                let late = add_column(run, Column::Trial { id, onset, duration });
                run.trials.push(TrialState {
                    id,
                    stim: e.stim,
                    condition: e.condition,
                    onset,
                    duration,
                    column,
                    closed: false,
                });
                late
            }
            Model::Condition => {
                let j = match run
                    .columns
                    .iter()
                    .position(|c| matches!(c, Column::Condition { label, .. } if *label == e.condition))
                {
                    Some(j) => j,
                    None => {
                        let _ = add_column(
                            run,
                            Column::Condition { label: e.condition.clone(), trials: Vec::new() },
                        );
                        run.columns.len() - 1
                    }
                };
                if let Column::Condition { trials, .. } = &mut run.columns[j] {
                    trials.push((onset, duration));
                }
                let values = column_values(run, j);
                let late = run.stats.set_column(j, &values).is_err();
                // No per-trial betas: the trial is recorded as closed.
                run.trials.push(TrialState {
                    id,
                    stim: e.stim,
                    condition: e.condition,
                    onset,
                    duration,
                    column: j,
                    closed: true,
                });
                late
            }
        };
        if late {
            tracing::warn!("glm: event for trial {id} (onset {onset:.2} s) is later than the kept volumes; its estimates are approximate");
            out.late_events += 1;
        }
    }
}

/// Brain voxels of a volume: above `fraction` of its 99th percentile.
fn auto_mask(data: &[f32], fraction: f64) -> Vec<usize> {
    let mut finite: Vec<f32> = data.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Vec::new();
    }
    let at = (finite.len() - 1) * 99 / 100;
    let p99 = *finite.select_nth_unstable_by(at, f32::total_cmp).1;
    let threshold = fraction as f32 * p99;
    (0..data.len()).filter(|&i| data[i].is_finite() && data[i] > threshold).collect()
}

/// Column `j`'s values over every row so far, whitened if AR(1) is frozen.
fn column_values(run: &Run, j: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..run.rows.len()).map(|t| run.columns[j].value(&run.rows, t)).collect();
    match run.ar1 {
        Ar1::Frozen(rho) => whiten(&raw, rho),
        _ => raw,
    }
}

/// Prais–Winsten: `√(1−ρ²) v₀`, then `v_t − ρ v_{t−1}`.
fn whiten(v: &[f64], rho: f64) -> Vec<f64> {
    (0..v.len())
        .map(|t| if t == 0 { (1.0 - rho * rho).sqrt() * v[0] } else { v[t] - rho * v[t - 1] })
        .collect()
}

/// Appends a column; true when it changed rows already folded.
fn add_column(run: &mut Run, c: Column) -> bool {
    run.columns.push(c);
    let j = run.columns.len() - 1;
    let values = column_values(run, j);
    run.stats.set_column(j, &values).is_err()
}

/// The design row of volume `t` as the statistics take it (whitened if AR(1) is frozen).
fn whitened_row(run: &Run, t: usize) -> Vec<f64> {
    let raw = |t: usize| -> Vec<f64> { run.columns.iter().map(|c| c.value(&run.rows, t)).collect() };
    match run.ar1 {
        Ar1::Frozen(rho) if t > 0 => raw(t).iter().zip(raw(t - 1)).map(|(a, b)| a - rho * b).collect(),
        Ar1::Frozen(rho) => raw(0).iter().map(|a| (1.0 - rho * rho).sqrt() * a).collect(),
        _ => raw(t),
    }
}

/// Estimates ρ from the OLS residuals of the warm-up rows, then rebuilds every sum prewhitened.
fn freeze_ar1(run: &mut Run, batch: usize) {
    let p = run.columns.len();
    let n = run.stats.rows();
    let factor = Factor::new(run.stats.xtx());
    let betas: Vec<Vec<f64>> = (0..p)
        .map(|j| {
            let mut e = vec![0.0; p];
            e[j] = 1.0;
            run.stats.combine(&factor.solve(&e))
        })
        .collect();
    let (mut num, mut den) = (0.0, 0.0);
    let mut prev: Option<Vec<f64>> = None;
    let mut raw_rows = Vec::with_capacity(n);
    for t in 0..n {
        let Some(y) = run.stats.kept_row(t) else { return };
        let x = run.stats.row(t);
        let e: Vec<f64> =
            (0..y.len()).map(|v| f64::from(y[v]) - (0..p).map(|j| x[j] * betas[j][v]).sum::<f64>()).collect();
        if let Some(pe) = &prev {
            num += e.iter().zip(pe).map(|(a, b)| a * b).sum::<f64>();
        }
        den += e.iter().map(|a| a * a).sum::<f64>();
        prev = Some(e);
        raw_rows.push(y.to_vec());
    }
    let rho = bias_corrected_rho(run, &factor, num, den);
    tracing::info!("glm: AR(1) coefficient {rho:.3} from {n} volumes; prewhitening from now on");
    run.ar1 = Ar1::Frozen(rho);
    let mut stats = OlsStats::new(run.mask.len(), batch);
    for j in 0..p {
        let _ = stats.set_column(j, &[]);
    }
    let scale = (1.0 - rho * rho).sqrt() as f32;
    for t in 0..n {
        let x = whitened_row(run, t);
        let y: Vec<f32> = if t == 0 {
            raw_rows[0].iter().map(|v| scale * v).collect()
        } else {
            raw_rows[t].iter().zip(&raw_rows[t - 1]).map(|(a, b)| a - rho as f32 * b).collect()
        };
        stats.push_row(x, y);
    }
    run.stats = stats;
}

/// The AR(1) coefficient from pooled residual sums `num = Σ e_t e_{t−1}`, `den = Σ e_t²`,
/// corrected for the bias the residual-forming matrix `R = I − X X⁺` puts in them (Worsley et
/// al. 2002): with `V ∝ I + ρ D` (D: ones on the first off-diagonals),
/// `E[eᵀe] = σ² (tr R + ρ tr RD)` and `E[eᵀ(D/2)e] = σ² (tr R(D/2)R + ρ tr R(D/2)RD)`.
fn bias_corrected_rho(run: &Run, factor: &Factor, num: f64, den: f64) -> f64 {
    let n = run.stats.rows();
    let p = run.columns.len();
    // W = (XᵀX)⁺ on the estimable columns; R = I − X W Xᵀ.
    let w: Vec<Vec<f64>> = (0..p)
        .map(|j| {
            let mut e = vec![0.0; p];
            e[j] = 1.0;
            factor.solve(&e)
        })
        .collect();
    let xw: Vec<Vec<f64>> = (0..n)
        .map(|t| (0..p).map(|j| (0..p).map(|k| run.stats.row(t)[k] * w[k][j]).sum()).collect())
        .collect();
    let r: Vec<Vec<f64>> = (0..n)
        .map(|a| {
            (0..n)
                .map(|b| {
                    f64::from(u8::from(a == b)) - (0..p).map(|j| xw[a][j] * run.stats.row(b)[j]).sum::<f64>()
                })
                .collect()
        })
        .collect();
    // Products with D/2: (M H)[a][b] = (M[a][b−1] + M[a][b+1]) / 2.
    let times_half_d = |m: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        (0..n)
            .map(|a| {
                (0..n)
                    .map(|b| {
                        0.5 * ((if b > 0 { m[a][b - 1] } else { 0.0 })
                            + (if b + 1 < n { m[a][b + 1] } else { 0.0 }))
                    })
                    .collect()
            })
            .collect()
    };
    let matmul = |x: &Vec<Vec<f64>>, y: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        (0..n).map(|a| (0..n).map(|b| (0..n).map(|k| x[a][k] * y[k][b]).sum()).collect()).collect()
    };
    let trace = |m: &Vec<Vec<f64>>| (0..n).map(|i| m[i][i]).sum::<f64>();
    let rh = times_half_d(&r);
    let rhr = matmul(&rh, &r);
    let a11 = trace(&r);
    let a12 = 2.0 * trace(&rh);
    let a21 = trace(&rhr);
    let a22 = 2.0 * trace(&times_half_d(&rhr));
    // Solve [a11 a12; a21 a22] [σ²; ρσ²] = [den; num].
    let det = a11 * a22 - a12 * a21;
    if det.abs() < 1e-12 || den <= 0.0 {
        return 0.0;
    }
    let s2 = (den * a22 - a12 * num) / det;
    let q = (a11 * num - a21 * den) / det;
    if s2 <= 0.0 {
        return 0.0;
    }
    (q / s2).clamp(-0.95, 0.95)
}

/// ROI means with drift and motion removed, as percent of the fitted baseline.
fn roi_feedback(run: &Run, factor: &Factor) -> Vec<RoiValue> {
    let t = run.rows.len() - 1;
    let p = run.columns.len();
    let raw_row: Vec<f64> = run.columns.iter().map(|c| c.value(&run.rows, t)).collect();
    // A baseline exists once the fit leaves a residual: before, the model passes through every
    // volume and the signal change would be 0 by construction.
    let residual_dof = run.rows.len() as i64 - factor.estimable.iter().filter(|e| **e).count() as i64;
    run.rois
        .iter()
        .map(|roi| {
            let series = match run.ar1 {
                Ar1::Frozen(rho) => whiten(&roi.series, rho),
                _ => roi.series.clone(),
            };
            let mean = roi.series[t];
            let mut b = vec![0.0; p];
            for (r, s) in series.iter().enumerate() {
                if s.is_finite() {
                    run.stats.row(r).iter().zip(b.iter_mut()).for_each(|(x, bj)| *bj += x * s);
                }
            }
            let beta = factor.solve(&b);
            let baseline = beta[0];
            let psc = (residual_dof > 0 && factor.estimable[0] && baseline.abs() > 1e-12 && mean.is_finite())
                .then(|| {
                    let nuisance: f64 =
                        (0..p).filter(|&j| run.columns[j].is_nuisance()).map(|j| raw_row[j] * beta[j]).sum();
                    100.0 * (mean - nuisance - baseline) / baseline
                });
            RoiValue { name: roi.name.clone(), mean, psc }
        })
        .collect()
}

fn trial_betas(run: &Run, i: usize, factor: &Factor, at_run_end: bool) -> TrialBetas {
    let tr = &run.trials[i];
    let p = run.columns.len();
    let estimable = factor.estimable[tr.column];
    let betas = if estimable {
        let mut e = vec![0.0; p];
        e[tr.column] = 1.0;
        let b = run.stats.combine(&factor.solve(&e));
        b.iter().zip(&run.nan).map(|(v, bad)| if *bad { 0.0 } else { *v as f32 }).collect()
    } else {
        vec![0.0; run.mask.len()]
    };
    TrialBetas {
        run: run.name.clone(),
        trial: tr.id,
        stim: tr.stim,
        condition: tr.condition.clone(),
        onset: tr.onset,
        duration: tr.duration,
        n_volumes: run.rows.len(),
        estimable,
        at_run_end,
        betas,
        voxels: run.mask.iter().map(|&v| v as u32).collect(),
    }
}

/// The end-of-run estimates of every trial of the run (the best ones: all volumes are in).
fn close_remaining(run: &mut Run) -> Vec<TrialBetas> {
    if run.rows.is_empty() || run.columns.iter().all(|c| !matches!(c, Column::Trial { .. })) {
        return Vec::new();
    }
    let factor = Factor::new(run.stats.xtx());
    let out = (0..run.trials.len()).map(|i| trial_betas(run, i, &factor, true)).collect();
    run.trials.iter_mut().for_each(|t| t.closed = true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4×4×2 volume at TR 1 s, voxel `v` at `value(v)` (also the GLM stage's tests' volume).
    pub(super) fn volume(index: u64, value: impl Fn(usize) -> f32) -> Volume {
        let dims = [4, 4, 2];
        Volume {
            data: (0..32).map(value).collect(),
            dims,
            affine: crate::volume::IDENTITY_AFFINE,
            index,
            run: "r".into(),
            tr: Some(1.0),
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        }
    }

    /// An automatic mask over the test volumes and a short batch (also the GLM stage's tests').
    pub(super) fn config() -> GlmConfig {
        GlmConfig { mask: "auto".into(), mask_threshold: 0.1, batch: 4, ..GlmConfig::default() }
    }

    fn trial(id: u64, onset: f64) -> Event {
        Event {
            trial: Some(id),
            stim: Some(id),
            condition: "seen".into(),
            onset: Onset::Relative(onset),
            duration: Some(2.0),
        }
    }

    /// Simulated data with two trials whose true betas are `2v` and `−v` (voxel v).
    fn signal(t: usize, v: usize) -> f32 {
        let time = t as f64;
        let a = design::Column::Trial { id: 0, onset: 5.0, duration: 2.0 };
        let b = design::Column::Trial { id: 1, onset: 12.0, duration: 2.0 };
        let rows: Vec<RowInfo> = (0..=t).map(|i| RowInfo { time: i as f64, motion: None }).collect();
        (1000.0 + 2.0 * v as f64 * a.value(&rows, t) - v as f64 * b.value(&rows, t) + 0.5 * time) as f32
    }

    #[test]
    fn volumes_before_events_out_of_order_events_and_exact_betas() {
        let mut glm = GlmEstimator::new(&config()).unwrap();
        let mut closed = Vec::new();
        for t in 0..40u64 {
            // Events arrive out of order, the second one first, both before their onsets.
            if t == 2 {
                glm.add_event(trial(1, 12.0));
            }
            if t == 3 {
                glm.add_event(trial(0, 5.0));
            }
            let out = glm.process(&volume(t, |v| signal(t as usize, v)), None, t == 0).unwrap();
            assert!(out.trials.iter().all(|b| b.betas.iter().all(|x| x.is_finite())));
            closed.extend(out.trials);
        }
        assert_eq!(closed.iter().map(|b| (b.trial, b.n_volumes)).collect::<Vec<_>>(), vec![(0, 18), (1, 25)]);
        // Noise-free data: exact betas as soon as the window closes.
        let mask = glm.mask().unwrap().to_vec();
        for (k, &v) in mask.iter().enumerate() {
            assert!((closed[0].betas[k] - 2.0 * v as f32).abs() < 1e-3, "voxel {v}: {}", closed[0].betas[k]);
            assert!((closed[1].betas[k] + v as f32).abs() < 1e-3);
        }
        let end = glm.finish();
        assert_eq!(end.len(), 2);
        assert!(end.iter().all(|b| b.at_run_end && b.estimable && b.n_volumes == 40));
    }

    #[test]
    fn a_run_with_no_events_and_an_early_rank_deficient_design() {
        let mut glm = GlmEstimator::new(&config()).unwrap();
        // A trial whose response has not begun: its column is all zero, so not estimable.
        glm.add_event(trial(0, 30.0));
        let out = glm.process(&volume(0, |v| 900.0 + v as f32), None, true).unwrap();
        assert!(out.trials.is_empty());
        let fit = glm.full_fit().unwrap();
        let j = fit.names.iter().position(|n| n == "trial_0000").unwrap();
        assert!(fit.betas[j].iter().all(|b| *b == 0.0) && fit.tstats[j].iter().all(|t| *t == 0.0));
        assert!(fit.betas.iter().flatten().chain(fit.tstats.iter().flatten()).all(|x| x.is_finite()));
        let end = glm.finish();
        assert!(!end[0].estimable && end[0].betas.iter().all(|b| *b == 0.0));
        // No events at all: the fit still runs.
        let mut plain = GlmEstimator::new(&config()).unwrap();
        for t in 0..10 {
            let out = plain.process(&volume(t, |v| 500.0 + v as f32 + t as f32), None, t == 0).unwrap();
            assert!(out.trials.is_empty());
        }
        assert!(plain.finish().is_empty());
    }

    #[test]
    fn nan_voxels_are_masked_out_and_counted_once() {
        let mut glm = GlmEstimator::new(&config()).unwrap();
        glm.add_event(trial(0, 2.0));
        let mut new_nan = 0;
        for t in 0..20u64 {
            let out = glm
                .process(
                    &volume(t, |v| if v == 5 && t >= 3 { f32::NAN } else { signal(t as usize, v) }),
                    None,
                    t == 0,
                )
                .unwrap();
            new_nan += out.new_nan_voxels;
        }
        assert_eq!(new_nan, 1);
        let end = glm.finish();
        let k = glm.mask().unwrap().iter().position(|&v| v == 5).unwrap();
        assert_eq!(end[0].betas[k], 0.0);
        assert!(end[0].betas.iter().all(|b| b.is_finite()));
    }

    #[test]
    fn roi_feedback_removes_the_drift() {
        let dir = tempfile::tempdir().unwrap();
        let roi = dir.path().join("roi.nii.gz");
        let mut mask = vec![0f32; 32];
        mask[9] = 1.0;
        mask[10] = 1.0;
        crate::io::nifti::write_nifti(&roi, [4, 4, 2], &crate::volume::IDENTITY_AFFINE, None, &[&mask])
            .unwrap();
        let cfg =
            GlmConfig { rois: vec![RoiSpec { name: "v1".into(), path: roi }], drift_order: 1, ..config() };
        let mut glm = GlmEstimator::new(&cfg).unwrap();
        // A linear drift, then a 1% step from volume 20.
        let y = |t: u64| 1000.0 + 2.0 * t as f64 + if t >= 20 { 10.0 } else { 0.0 };
        for t in 0..30u64 {
            let out = glm.process(&volume(t, |_| y(t) as f32), None, t == 0).unwrap();
            let psc = out.roi[0].psc;
            if t < 2 {
                continue;
            }
            // By hand: least squares of y on [1, s] (s = t/300 − 1) over volumes 0..=t; the
            // feedback is the last residual in percent of the intercept.
            let n = (t + 1) as f64;
            let s: Vec<f64> = (0..=t).map(|i| i as f64 / 300.0 - 1.0).collect();
            let (ss, sy, yy) = (
                s.iter().sum::<f64>(),
                (0..=t).map(|i| s[i as usize] * y(i)).sum::<f64>(),
                (0..=t).map(y).sum::<f64>(),
            );
            let s2 = s.iter().map(|v| v * v).sum::<f64>();
            let slope = (n * sy - ss * yy) / (n * s2 - ss * ss);
            let intercept = (yy - slope * ss) / n;
            let want = 100.0 * (y(t) - slope * s[t as usize] - intercept) / intercept;
            assert!((psc.unwrap() - want).abs() < 1e-6, "volume {t}: {psc:?} vs {want}");
            if t < 20 {
                assert!(want.abs() < 1e-9);
            }
        }
    }

    #[test]
    fn late_event_within_the_kept_volumes_is_exact_and_beyond_is_counted() {
        let mut glm = GlmEstimator::new(&GlmConfig { batch: 8, ..config() }).unwrap();
        let (mut late, mut closed) = (0, Vec::new());
        for t in 0..40u64 {
            // Trial 0 (onset 5 s) is announced 4 volumes late, at volume 9 — exact; trial 1
            // (onset 12 s) at volume 35, after its volumes were folded — counted as late.
            if t == 9 {
                glm.add_event(trial(0, 5.0));
            }
            if t == 35 {
                glm.add_event(trial(1, 12.0));
            }
            let out = glm.process(&volume(t, |v| signal(t as usize, v)), None, t == 0).unwrap();
            late += out.late_events;
            closed.extend(out.trials);
        }
        assert_eq!(late, 1);
        // Trial 0 closed at volume 17, before the late event: data up to then hold trial 1's
        // response too, which the design lacked, so compare with a fit that also lacks it.
        let first = &closed[0];
        assert_eq!((first.trial, first.n_volumes), (0, 18));
        let mut reference = GlmEstimator::new(&GlmConfig { batch: 64, ..config() }).unwrap();
        reference.add_event(trial(0, 5.0));
        let mut want = Vec::new();
        for t in 0..18u64 {
            want = reference.process(&volume(t, |v| signal(t as usize, v)), None, t == 0).unwrap().trials;
        }
        assert_eq!(want.len(), 1);
        for (a, b) in first.betas.iter().zip(&want[0].betas) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
