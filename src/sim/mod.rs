//! The built-in scanner: a seeded simulation of an fMRI run with exact ground truth.
//!
//! A static head image (phantom or real NIfTI) is driven by trials through a voxel encoding
//! model and the canonical HRF, moved rigidly, and given drift and AR(1) noise:
//!
//! ```text
//! signal(v, t)  = anatomy(v) · (1 + 0.01 · Σ_trials amplitude(trial, v) · boxcar_response(t))
//! bold(q, t)    = signal(M_t⁻¹ q, t)                 (head moved by M_t, cubic B-spline)
//!               + anatomy(q) · 0.01 · drift_pct · (a_q · (2t/T − 1) + b_q · cos(π t / T)) / 2
//!               + e(q, t),   e(q, t) = ar1 · e(q, t−1) + √(1 − ar1²) · σ_q · z
//! ```
//!
//! with `σ_q = 0.01 · noise_pct · (anatomy(q) + 20)`. Volume `i` is acquired at `i · tr`. Every
//! term is written beside the data by [`Simulator::write_run`], so each stage can be checked.

pub mod anatomy;
pub mod stimuli;
mod truth;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use self::anatomy::{world_of, Anatomy};
use self::stimuli::{EncodingModel, EncodingParams, Stimuli, TrialCondition};
use crate::calibrate::protocol::Protocol;
use crate::glm::hrf::boxcar_response;
use crate::motion::bspline;
use crate::motion::rigid::{affine_inverse, mat_mul, RigidParams};
use crate::rng::Rng;
use crate::volume::{sanitize_run_id, Affine, Volume};

/// Why a simulation could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A parameter is out of range or unknown.
    #[error("sim: {0}")]
    Config(String),
    /// The anatomy file could not be used.
    #[error("sim: anatomy: {0}")]
    Anatomy(String),
    /// Writing the run or its truth failed.
    #[error("sim: writing {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Which trials a run holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunCondition {
    /// Every trial shows its picture.
    Seen,
    /// Every trial is imagined.
    Imagery,
    /// Trials alternate seen, imagery, seen, …
    Mixed,
}

/// How the simulated head moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MotionKind {
    /// Slow drifts (sums of sinusoids), as in a cooperative participant.
    Smooth,
    /// An independent uniform draw within the limits for every volume after the first (a hard
    /// registration benchmark: the previous estimate says nothing about the next).
    Random,
}

/// Simulation parameters; every one can also be set as `key=value` (URI query or CLI).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Seed of the participant: head, stimuli and encoding model (and, unless `run_seed` is
    /// set, of everything else).
    pub seed: u64,
    /// Seed of one run of that participant: trial order, amplitudes, motion, drift, noise.
    /// Runs with one `seed` and different `run_seed`s are sessions of the same brain.
    pub run_seed: Option<u64>,
    /// Number of volumes in the run.
    pub volumes: usize,
    /// Repetition time in seconds.
    pub tr: f64,
    /// Grid `[x, y, z]` (default 64×64×36, or the anatomy file's grid).
    pub shape: Option<[usize; 3]>,
    /// Voxel size in mm (default 3 mm, or the anatomy's field of view over `shape`).
    pub voxel_mm: Option<[f64; 3]>,
    /// A NIfTI whose first volume is the head image, instead of the built-in phantom.
    pub anatomy: Option<PathBuf>,
    /// Run id carried by every volume.
    pub run: String,
    /// Seen, imagery or mixed trials.
    pub condition: RunCondition,
    /// Number of distinct stimuli.
    pub n_stimuli: usize,
    /// Side of each stimulus picture in pixels.
    pub picture_size: usize,
    /// Dimension of each stimulus's semantic embedding.
    pub embedding_dim: usize,
    /// Stimulus (boxcar) duration in seconds.
    pub trial_duration: f64,
    /// Mean onset-to-onset interval in seconds (jittered by up to ±1 s).
    pub trial_interval: f64,
    /// Response scale in percent signal change.
    pub signal_pct: f64,
    /// Trial-to-trial amplitude variability (relative standard deviation).
    pub trial_jitter: f64,
    /// Noise standard deviation in percent of the baseline.
    pub noise_pct: f64,
    /// AR(1) coefficient of the noise.
    pub ar1: f64,
    /// Peak drift over the run in percent of the baseline.
    pub drift_pct: f64,
    /// Largest translation in mm on any axis.
    pub motion_mm: f64,
    /// Largest rotation in degrees about any axis.
    pub motion_deg: f64,
    /// Smooth or random motion.
    pub motion_kind: MotionKind,
    /// Low-level drive kept under imagery (fraction of seen).
    pub imagery_lowlevel: f64,
    /// Gain of imagery responses relative to seen.
    pub imagery_gain: f64,
    /// Structured voxel-space shift under imagery, percent signal change.
    pub imagery_shift_pct: f64,
    /// Stimulus information imagery spreads through a few large-scale spatial modes
    /// (relative to `signal_pct`; see [`stimuli::EncodingModel::build`]).
    pub imagery_mixing: f64,
    /// A calibration protocol (`calibration/*.toml`) whose imagery cues open the run; random
    /// trials of `condition` follow.
    pub protocol: Option<PathBuf>,
    /// Largest voxel count a grid may have.
    pub max_voxels: usize,
}

impl crate::settings::InputFiles for SimConfig {
    /// The anatomy template and the protocol.
    fn resolve_inputs(&mut self, base: &std::path::Path) {
        for p in [&mut self.anatomy, &mut self.protocol].into_iter().flatten() {
            crate::settings::rebase(p, base);
        }
    }
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            seed: 1,
            run_seed: None,
            volumes: 200,
            tr: 1.0,
            shape: None,
            voxel_mm: None,
            anatomy: None,
            run: "sim".into(),
            condition: RunCondition::Mixed,
            n_stimuli: 12,
            picture_size: 32,
            embedding_dim: 32,
            trial_duration: 4.0,
            trial_interval: 8.0,
            signal_pct: 2.0,
            trial_jitter: 0.1,
            noise_pct: 1.0,
            ar1: 0.3,
            drift_pct: 1.0,
            motion_mm: 0.5,
            motion_deg: 0.5,
            motion_kind: MotionKind::Smooth,
            imagery_lowlevel: 0.3,
            imagery_gain: 0.3,
            imagery_shift_pct: 0.5,
            imagery_mixing: 4.0,
            protocol: None,
            max_voxels: 1 << 24,
        }
    }
}

/// Default phantom grid.
const PHANTOM_SHAPE: [usize; 3] = [64, 64, 36];
/// Default phantom voxel size (mm).
const PHANTOM_VOXEL_MM: [f64; 3] = [3.0, 3.0, 3.0];
/// Absolute noise floor added to the baseline when scaling noise (background voxels).
const NOISE_FLOOR: f64 = 20.0;

impl SimConfig {
    /// Sets one parameter from text, e.g. `("volumes", "120")` or `("shape", "64,64,36")`, in
    /// the dialect of every `--set` ([`crate::settings`]).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        crate::settings::set(self, key, value).map_err(|e| format!("sim parameter {e}"))
    }

    /// Every problem with the parameters, each on its own line.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = self.parameter_errors();
        if let Err(e) = self.load_protocol() {
            errors.push(e);
        }
        errors
    }

    /// The calibration protocol whose cues open the run, read and checked against the
    /// stimuli (`None` when there is none).
    fn load_protocol(&self) -> Result<Option<Protocol>, String> {
        let Some(path) = &self.protocol else { return Ok(None) };
        let p = Protocol::load(path).map_err(|e| format!("sim: {e}"))?;
        let bad: Vec<&String> = p.stimuli.iter().filter(|s| self.stimulus_number(s).is_none()).collect();
        if !bad.is_empty() {
            return Err(format!("sim: protocol stimuli {bad:?} are not stimulus numbers below n_stimuli"));
        }
        Ok(Some(p))
    }

    /// The stimulus a protocol's id names: a number below `n_stimuli`.
    fn stimulus_number(&self, id: &str) -> Option<usize> {
        id.parse().ok().filter(|&s| s < self.n_stimuli)
    }

    /// Every problem with the parameters other than the protocol.
    fn parameter_errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                errors.push(format!("sim: {msg}"));
            }
        };
        check(self.volumes >= 1, "volumes must be at least 1");
        check(self.tr.is_finite() && self.tr > 0.0, "tr must be a positive number of seconds");
        if let Some(s) = self.shape {
            check(s.iter().all(|&d| (2..=2048).contains(&d)), "shape: each dimension must be 2..2048");
            check(s.iter().product::<usize>() <= self.max_voxels, "shape exceeds max_voxels");
        }
        if let Some(v) = self.voxel_mm {
            check(v.iter().all(|x| x.is_finite() && *x > 0.0), "voxel_mm must be positive");
        }
        check(self.n_stimuli >= 1, "n_stimuli must be at least 1");
        check((4..=256).contains(&self.picture_size), "picture_size must be 4..256");
        check((1..=4096).contains(&self.embedding_dim), "embedding_dim must be 1..4096");
        check(self.trial_duration.is_finite() && self.trial_duration >= 0.0, "trial_duration must be >= 0");
        check(self.trial_interval.is_finite() && self.trial_interval > 2.0, "trial_interval must exceed 2 s");
        for (name, v) in [
            ("signal_pct", self.signal_pct),
            ("trial_jitter", self.trial_jitter),
            ("noise_pct", self.noise_pct),
            ("drift_pct", self.drift_pct),
            ("motion_mm", self.motion_mm),
            ("motion_deg", self.motion_deg),
            ("imagery_lowlevel", self.imagery_lowlevel),
            ("imagery_gain", self.imagery_gain),
            ("imagery_shift_pct", self.imagery_shift_pct),
            ("imagery_mixing", self.imagery_mixing),
        ] {
            check(v.is_finite() && v >= 0.0, &format!("{name} must be a non-negative number"));
        }
        check((0.0..1.0).contains(&self.ar1), "ar1 must be in [0, 1)");
        errors
    }
}

/// One simulated trial.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trial {
    /// Trial number in the run (0-based).
    pub id: usize,
    /// Stimulus shown or imagined.
    pub stim: usize,
    /// Seen or imagery.
    pub condition: TrialCondition,
    /// Onset in seconds from the run start (volume 0 acquisition).
    pub onset: f64,
    /// Boxcar duration in seconds.
    pub duration: f64,
}

/// A seeded simulated run that produces its volumes in order.
#[derive(Clone, Debug)]
pub struct Simulator {
    cfg: SimConfig,
    anatomy: Anatomy,
    stimuli: Stimuli,
    trials: Vec<Trial>,
    /// `amplitudes[trial][r]`: percent signal change in ROI voxel `r`.
    amplitudes: Vec<Vec<f32>>,
    motion: Vec<RigidParams>,
    drift_coef: Vec<[f32; 2]>,
    noise_sd: Vec<f32>,
    noise_state: Vec<f32>,
    noise_rng: Rng,
    next: usize,
    signal: Vec<f32>,
}

impl Simulator {
    /// Builds the run: anatomy, stimuli, encoding model, schedule, motion and noise state.
    pub fn new(cfg: &SimConfig) -> Result<Simulator, SimError> {
        // The protocol is read once, here, and checked with the parameters.
        let mut errors = cfg.parameter_errors();
        let protocol = cfg.load_protocol().unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        if !errors.is_empty() {
            return Err(SimError::Config(errors.join("; ")));
        }
        let seed = cfg.seed;
        let anatomy = match &cfg.anatomy {
            Some(path) => Anatomy::from_nifti(path, cfg.shape, cfg.voxel_mm, cfg.max_voxels)?,
            None => Anatomy::phantom(
                &mut Rng::new(seed, 1),
                cfg.shape.unwrap_or(PHANTOM_SHAPE),
                cfg.voxel_mm.unwrap_or(PHANTOM_VOXEL_MM),
            ),
        };
        if anatomy.roi.is_empty() {
            return Err(SimError::Anatomy("the head image has no brain voxels above threshold".into()));
        }
        let stimuli =
            Stimuli::generate(&mut Rng::new(seed, 2), cfg.n_stimuli, cfg.picture_size, cfg.embedding_dim);
        let roi_world: Vec<[f64; 3]> =
            anatomy.roi.iter().map(|&v| world_of(&anatomy.affine, anatomy.dims, v)).collect();
        let params = EncodingParams {
            signal_pct: cfg.signal_pct,
            imagery_lowlevel: cfg.imagery_lowlevel,
            imagery_gain: cfg.imagery_gain,
            imagery_shift_pct: cfg.imagery_shift_pct,
            imagery_mixing: cfg.imagery_mixing,
        };
        let encoding = EncodingModel::build(&mut Rng::new(seed, 3), &stimuli, &roi_world, &params);
        let run_seed = cfg.run_seed.unwrap_or(seed);
        let trials = schedule(&mut Rng::new(run_seed, 4), cfg, protocol.as_ref())?;
        let mut jitter_rng = Rng::new(run_seed, 5);
        let amplitudes = trials
            .iter()
            .map(|t| {
                let scale = (1.0 + cfg.trial_jitter * jitter_rng.normal()) as f32;
                encoding.pattern(t.stim, t.condition).iter().map(|a| a * scale).collect()
            })
            .collect();
        let (max_mm, max_rad) = (cfg.motion_mm, cfg.motion_deg.to_radians());
        let motion = motion_course(&mut Rng::new(run_seed, 6), cfg.volumes, max_mm, max_rad, cfg.motion_kind);
        let mut drift_rng = Rng::new(run_seed, 7);
        let n = anatomy.image.len();
        let drift_coef =
            (0..n).map(|_| [drift_rng.range(-1.0, 1.0) as f32, drift_rng.range(-1.0, 1.0) as f32]).collect();
        let noise_sd: Vec<f32> = anatomy
            .image
            .iter()
            .map(|&a| (0.01 * cfg.noise_pct * (f64::from(a) + NOISE_FLOOR)) as f32)
            .collect();
        let mut noise_rng = Rng::new(run_seed, 8);
        let noise_state = noise_sd.iter().map(|&sd| (f64::from(sd) * noise_rng.normal()) as f32).collect();
        Ok(Simulator {
            cfg: cfg.clone(),
            signal: vec![0f32; anatomy.head.image.len()],
            anatomy,
            stimuli,
            trials,
            amplitudes,
            motion,
            drift_coef,
            noise_sd,
            noise_state,
            noise_rng,
            next: 0,
        })
    }

    /// The parameters this run was built from.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Grid `[x, y, z]`.
    pub fn dims(&self) -> [usize; 3] {
        self.anatomy.dims
    }

    /// Voxel-to-world matrix of every volume.
    pub fn affine(&self) -> &Affine {
        &self.anatomy.affine
    }

    /// The static head image and its masks.
    pub fn anatomy(&self) -> &Anatomy {
        &self.anatomy
    }

    /// The stimulus set.
    pub fn stimuli(&self) -> &Stimuli {
        &self.stimuli
    }

    /// What each decoder head should predict, per stimulus (see [`Stimuli::head_targets`]).
    pub fn head_targets(&self) -> Vec<stimuli::HeadTarget> {
        self.stimuli.head_targets(&mut Rng::new(self.cfg.seed, 9))
    }

    /// The trials, in onset order.
    pub fn trials(&self) -> &[Trial] {
        &self.trials
    }

    /// True amplitude of each trial in each ROI voxel (percent signal change).
    pub fn amplitudes(&self) -> &[Vec<f32>] {
        &self.amplitudes
    }

    /// True head position of every volume.
    pub fn motion(&self) -> &[RigidParams] {
        &self.motion
    }

    /// Number of volumes in the run.
    pub fn n_volumes(&self) -> usize {
        self.cfg.volumes
    }

    /// Index of the next volume [`Simulator::next_volume`] will produce.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Produces the next volume (acquired at `index · tr`), or `None` after the last.
    ///
    /// `acq_time` and `recv_time` are left for the caller: the simulator has no clock.
    pub fn next_volume(&mut self) -> Option<Volume> {
        let index = self.next;
        if index >= self.cfg.volumes {
            return None;
        }
        let t = index as f64 * self.cfg.tr;
        let (image, head) = (&self.anatomy.image, &self.anatomy.head);
        let dims = self.anatomy.dims;
        // This TR's signal on the padded head grid.
        self.signal.copy_from_slice(&head.image);
        for (trial, amps) in self.trials.iter().zip(&self.amplitudes) {
            let x = boxcar_response(t, trial.onset, trial.duration);
            if x.abs() < 1e-12 {
                continue;
            }
            for (&v, &a) in self.anatomy.roi.iter().zip(amps) {
                let h = head.index_of(v, dims);
                self.signal[h] += (f64::from(head.image[h]) * 0.01 * f64::from(a) * x) as f32;
            }
        }
        // The moving head: the cubic B-spline through the signal, sampled where the scanner's
        // grid now falls; with the head still, the acquisition window of the grid itself.
        let mut data = vec![0f32; image.len()];
        let m = self.motion[index].matrix();
        let to_head = affine_inverse(&head.affine)
            .and_then(|h| Some(mat_mul(&h, &mat_mul(&affine_inverse(&m)?, &self.anatomy.affine))));
        match to_head {
            Some(k) if self.motion[index] != RigidParams::default() => {
                let coeffs = bspline::coefficients(&self.signal, head.dims);
                bspline::resample(&coeffs, head.dims, &k, 0.0, &mut data, dims)
            }
            _ => data.iter_mut().enumerate().for_each(|(v, d)| *d = self.signal[head.index_of(v, dims)]),
        }
        let run_len = self.cfg.volumes as f64 * self.cfg.tr;
        let lin = 2.0 * t / run_len - 1.0;
        let cos = (std::f64::consts::PI * t / run_len).cos();
        let drift = 0.01 * self.cfg.drift_pct / 2.0;
        let phi = self.cfg.ar1;
        let innov = (1.0 - phi * phi).sqrt();
        for (q, out) in data.iter_mut().enumerate() {
            let e = if index == 0 {
                f64::from(self.noise_state[q])
            } else {
                phi * f64::from(self.noise_state[q])
                    + innov * f64::from(self.noise_sd[q]) * self.noise_rng.normal()
            };
            self.noise_state[q] = e as f32;
            let [a, b] = self.drift_coef[q];
            let d = f64::from(image[q]) * drift * (f64::from(a) * lin + f64::from(b) * cos);
            *out = (f64::from(*out) + d + e) as f32;
        }
        self.next += 1;
        Some(Volume {
            data,
            dims,
            affine: self.anatomy.affine,
            index: index as u64,
            run: sanitize_run_id(&self.cfg.run),
            tr: Some(self.cfg.tr),
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        })
    }
}

/// The calibration protocol's imagery cues first (when one is set), then onsets every
/// `trial_interval` ± 1 s until 12 s before the run ends; stimuli in shuffled rounds;
/// conditions per the run's setting.
fn schedule(rng: &mut Rng, cfg: &SimConfig, protocol: Option<&Protocol>) -> Result<Vec<Trial>, SimError> {
    let run_len = cfg.volumes as f64 * cfg.tr;
    let mut trials = Vec::new();
    let mut onset = 4.0;
    if let Some(p) = protocol {
        for cue in p.schedule() {
            if cue.onset + cue.duration + 12.0 > run_len {
                break;
            }
            let stim = cfg.stimulus_number(&cue.stim).ok_or_else(|| {
                SimError::Config(format!(
                    "protocol stimulus {:?} is not a stimulus number below n_stimuli",
                    cue.stim
                ))
            })?;
            trials.push(Trial {
                id: trials.len(),
                stim,
                condition: TrialCondition::Imagery,
                onset: cue.onset,
                duration: cue.duration,
            });
            onset = cue.onset + p.interval_s;
        }
    }
    let first = trials.len();
    let mut order: Vec<usize> = Vec::new();
    while onset + cfg.trial_duration + 12.0 <= run_len {
        if order.is_empty() {
            order = (0..cfg.n_stimuli).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        let id = trials.len();
        let condition = match cfg.condition {
            RunCondition::Seen => TrialCondition::Seen,
            RunCondition::Imagery => TrialCondition::Imagery,
            RunCondition::Mixed if (id - first) % 2 == 0 => TrialCondition::Seen,
            RunCondition::Mixed => TrialCondition::Imagery,
        };
        let stim = order.pop().unwrap_or(0);
        // Onsets are kept to the millisecond so events.tsv round-trips exactly.
        trials.push(Trial {
            id,
            stim,
            condition,
            onset: (onset * 1e3).round() / 1e3,
            duration: cfg.trial_duration,
        });
        onset += cfg.trial_interval + rng.range(-1.0, 1.0);
    }
    Ok(trials)
}

/// Head motion, zero at volume 0. Smooth: per parameter, three slow sinusoids scaled to a random
/// fraction of the limit and clipped to ±limit. Random: uniform within ±limit per volume.
fn motion_course(rng: &mut Rng, n: usize, max_mm: f64, max_rad: f64, kind: MotionKind) -> Vec<RigidParams> {
    if kind == MotionKind::Random {
        let mut draw = |limit: f64| rng.range(-limit, limit);
        return (0..n)
            .map(|t| match t {
                0 => RigidParams::default(),
                _ => RigidParams {
                    trans: [draw(max_mm), draw(max_mm), draw(max_mm)],
                    rot: [draw(max_rad), draw(max_rad), draw(max_rad)],
                },
            })
            .collect();
    }
    let mut per_param: Vec<Vec<f64>> = Vec::with_capacity(6);
    for p in 0..6 {
        let limit = if p < 3 { max_mm } else { max_rad };
        let waves: Vec<[f64; 3]> = (0..3)
            .map(|_| {
                [rng.range(0.3, 1.0), 1.0 / rng.range(20.0, 200.0), rng.range(0.0, std::f64::consts::TAU)]
            })
            .collect();
        let raw: Vec<f64> = (0..n)
            .map(|t| {
                waves
                    .iter()
                    .map(|[a, f, ph]| a * (std::f64::consts::TAU * f * t as f64 + ph).sin())
                    .sum::<f64>()
            })
            .collect();
        let start = raw.first().copied().unwrap_or(0.0);
        let centred: Vec<f64> = raw.iter().map(|v| v - start).collect();
        let peak = centred.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let target = limit * rng.range(0.5, 1.0);
        let scale = if peak > 0.0 { target / peak } else { 0.0 };
        per_param.push(centred.iter().map(|v| (v * scale).clamp(-limit, limit)).collect());
    }
    (0..n)
        .map(|t| RigidParams {
            trans: [per_param[0][t], per_param[1][t], per_param[2][t]],
            rot: [per_param[3][t], per_param[4][t], per_param[5][t]],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            volumes: 30,
            shape: Some([24, 24, 16]),
            voxel_mm: Some([6.0, 6.0, 6.0]),
            ..SimConfig::default()
        }
    }

    #[test]
    fn same_seed_same_volumes_other_seed_differs() {
        let mut a = Simulator::new(&small()).unwrap();
        let mut b = Simulator::new(&small()).unwrap();
        let mut c = Simulator::new(&SimConfig { seed: 2, ..small() }).unwrap();
        for _ in 0..5 {
            let (va, vb, vc) = (a.next_volume().unwrap(), b.next_volume().unwrap(), c.next_volume().unwrap());
            assert_eq!(va, vb);
            assert_ne!(va.data, vc.data);
        }
    }

    #[test]
    fn noiseless_static_run_is_anatomy_plus_signal() {
        let cfg = SimConfig { noise_pct: 0.0, drift_pct: 0.0, motion_mm: 0.0, motion_deg: 0.0, ..small() };
        let mut sim = Simulator::new(&cfg).unwrap();
        assert!(!sim.trials().is_empty());
        let first = sim.next_volume().unwrap();
        // No trial has started at t = 0: volume 0 is the anatomy itself.
        assert_eq!(first.data, sim.anatomy().image);
        assert!(sim.motion().iter().all(|m| *m == RigidParams::default()));
    }

    #[test]
    fn motion_starts_at_zero_and_respects_limits() {
        let sim = Simulator::new(&SimConfig { motion_mm: 1.0, motion_deg: 2.0, ..small() }).unwrap();
        assert_eq!(sim.motion()[0], RigidParams::default());
        for m in sim.motion() {
            assert!(m.trans.iter().all(|t| t.abs() <= 1.0 + 1e-12));
            assert!(m.rot.iter().all(|r| r.abs() <= 2f64.to_radians() + 1e-12));
        }
        assert!(sim.motion().iter().any(|m| m.trans[0].abs() > 0.1));
    }

    #[test]
    fn bad_parameters_are_all_reported() {
        let mut cfg = SimConfig::default();
        assert!(cfg.set("volumes", "ten").is_err());
        assert!(cfg.set("bogus", "1").is_err());
        cfg.set("shape", "10,10,10").unwrap();
        assert_eq!(cfg.shape, Some([10, 10, 10]));
        let e = cfg.set("shape", "10x10x10").unwrap_err();
        assert!(e.contains("shape=10x10x10"), "{e}");
        assert_eq!(cfg.shape, Some([10, 10, 10]));
        cfg.set("condition", "imagery").unwrap();
        cfg.set("run", "a b").unwrap();
        assert_eq!((cfg.condition, cfg.run.as_str()), (RunCondition::Imagery, "a b"));
        // Volumes carry the run id sanitised, however it was set.
        let mut sim = Simulator::new(&SimConfig { run: "a b/c".into(), ..small() }).unwrap();
        assert_eq!(sim.next_volume().unwrap().run, sanitize_run_id("a b/c"));
        cfg.tr = -1.0;
        cfg.ar1 = 1.5;
        assert_eq!(cfg.validate().len(), 2);
    }
}
