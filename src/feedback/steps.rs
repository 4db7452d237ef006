//! mirage's own feedback recipe (`recipe = "steps"`): optional steps in a fixed order, per ROI
//! and volume, causal (volume `t` uses volumes `1..t` only).
//!
//! 1. **detrend**: an exact cumulative least-squares fit over volumes `1..t` (accumulated normal
//!    equations) of a constant, a linear trend, the task regressor (the regulation blocks
//!    convolved with SPM's canonical HRF; fitted and kept in the signal), the six motion
//!    parameters and a nuisance ROI's mean. A column enters once there are three volumes per
//!    column and it is not collinear with the ones before it. The value is percent of the fitted
//!    baseline `b` (every fitted column but the task): `100·(y − b)/b`.
//! 2. **despike**: a value further than `k` robust σ (1.4826·MAD of the values so far) from the
//!    median of the last five is clipped to that bound.
//! 3. **smooth**: an exponential moving average with time constant `τ` seconds.
//! 4. **normalise**: minus the median over the last baseline block before this regulation block
//!    (from 6 s into it, as OpenNFT skips the HRF's rise).
//! 5. **show**: combined over the ROIs, then `max·value/full_scale` rounded and clipped as
//!    OpenNFT's display ([`Display::show`]); 0 outside regulation blocks, as OpenNFT shows it.
//!
//! `tests/python/feedback_steps_reference.py` computes the same steps with numpy's `lstsq` on the
//! explicit design every volume; the tests compare every step with it.

use super::opennft::{median, spm_hrf, Combine, Display, Protocol};

/// Volumes needed per fitted column before a column enters the fit.
pub const VOLUMES_PER_COLUMN: usize = 3;
/// A column whose Cholesky pivot is below this share of its own sum of squares is collinear
/// with the columns before it and left out.
pub const COLLINEAR: f64 = 1e-10;
/// Values the despiking's robust σ needs before it clips.
pub const DESPIKE_MIN_VALUES: usize = 10;
/// How many recent values the despiking's median is taken over.
pub const DESPIKE_WINDOW: usize = 5;
/// Baseline volumes left out at a baseline block's start (the HRF's fall), in seconds.
pub const BASELINE_DELAY_S: f64 = 6.0;

/// Which steps run, with their settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Steps {
    /// A linear trend in the fit.
    pub trend: bool,
    /// The task regressor in the fit (its fit is kept in the signal).
    pub task: bool,
    /// The six motion parameters in the fit.
    pub motion: bool,
    /// A nuisance ROI's mean in the fit (given with each volume).
    pub nuisance: bool,
    /// The despiking threshold in robust σ (0: no despiking).
    pub despike: f64,
    /// The smoothing's time constant in seconds (0: no smoothing).
    pub smooth_s: f64,
    /// Minus the last baseline block's median.
    pub normalise: bool,
    /// The percent change shown as `Display::max` (0: the percent itself, unclipped).
    pub full_scale: f64,
}

/// What the steps made of one ROI at one volume (NaN where a step had no value).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoiStep {
    /// The ROI mean as given.
    pub raw: f64,
    /// The fitted baseline `b` at this volume.
    pub baseline: f64,
    /// `100·(raw − b)/b`.
    pub percent: f64,
    /// After despiking.
    pub despiked: f64,
    /// After smoothing.
    pub smoothed: f64,
    /// After normalisation, in a regulation volume.
    pub norm: Option<f64>,
    /// This ROI's own value shown, as the combined one is.
    pub shown: f64,
}

/// One volume's result.
#[derive(Clone, Debug, PartialEq)]
pub struct StepsVolume {
    /// Per ROI, in the order given.
    pub rois: Vec<RoiStep>,
    /// The combined value (0 outside regulation, NaN where undefined).
    pub feedback: f64,
    /// The value shown.
    pub display: f64,
}

/// One ROI's state: the normal equations, the volumes in them and the step series so far.
#[derive(Clone, Debug)]
struct RoiState {
    xtx: Vec<f64>,
    xty: Vec<f64>,
    rows: usize,
    /// The volumes (0-based) in the fit, with their means.
    fitted: Vec<(usize, f64)>,
    despiked: Vec<f64>,
    smoothed: Vec<f64>,
    ema: Option<f64>,
}

/// The recipe over a run, volume by volume.
pub struct StepsFeedback {
    steps: Steps,
    protocol: Protocol,
    combine: Combine,
    display: Display,
    /// The task regressor over the planned run.
    task: Vec<f64>,
    /// The smoothing's weight of a new value.
    alpha: f64,
    /// The first volume's motion and nuisance mean, subtracted from theirs (for conditioning).
    first_motion: Option<[f64; 6]>,
    first_nuisance: Option<f64>,
    /// Every volume's row of the design so far (the task column as it was last computed).
    rows: Vec<Vec<f64>>,
    /// The task column's index in a row.
    task_col: Option<usize>,
    rois: Vec<RoiState>,
    t: usize,
}

impl StepsFeedback {
    /// The recipe for `n_rois` ROIs over `protocol`.
    pub fn new(steps: Steps, protocol: Protocol, n_rois: usize, combine: Combine, display: Display) -> Self {
        let tr = protocol.tr_ms / 1000.0;
        let task = task_regressor(&protocol.regulation, protocol.n_volumes, tr);
        let alpha = if steps.smooth_s > 0.0 { 1.0 - (-tr / steps.smooth_s).exp() } else { 1.0 };
        let p = columns(&steps);
        let state = RoiState {
            xtx: vec![0.0; p * p],
            xty: vec![0.0; p],
            rows: 0,
            fitted: Vec::new(),
            despiked: Vec::new(),
            smoothed: Vec::new(),
            ema: None,
        };
        StepsFeedback {
            steps,
            protocol,
            combine,
            display,
            task,
            alpha,
            first_motion: None,
            first_nuisance: None,
            rows: Vec::new(),
            task_col: None,
            rois: vec![state; n_rois],
            t: 0,
        }
    }

    /// Replaces the protocol (blocks known later, as live markers bring them): the task
    /// regressor is recomputed and every ROI's fit rebuilt from the rows so far, so the next fit
    /// is exactly the fit of those rows under the new blocks. Values already shown stay.
    pub fn set_protocol(&mut self, protocol: Protocol) {
        self.task = task_regressor(&protocol.regulation, protocol.n_volumes, protocol.tr_ms / 1000.0);
        self.protocol = protocol;
        let Some(c) = self.task_col else { return };
        for (t, row) in self.rows.iter_mut().enumerate() {
            row[c] = self.task.get(t).copied().unwrap_or(0.0);
        }
        let p = columns(&self.steps);
        for r in &mut self.rois {
            r.xtx.iter_mut().for_each(|v| *v = 0.0);
            r.xty.iter_mut().for_each(|v| *v = 0.0);
            for &(t, raw) in &r.fitted {
                accumulate(&mut r.xtx, &mut r.xty, &self.rows[t], raw, p);
            }
        }
    }

    /// Volumes taken so far.
    pub fn volumes(&self) -> usize {
        self.t
    }

    /// Takes the next volume: the ROI means, the motion (x, y, z mm, three rotations in rad;
    /// `None` taken as zero) and the nuisance ROI's mean.
    ///
    /// A mean that is not finite (or a missing nuisance mean) leaves that volume out of the ROI's
    /// fit and gives it NaN steps: one bad volume costs that volume only.
    pub fn step(&mut self, means: &[f64], motion: Option<[f64; 6]>, nuisance: Option<f64>) -> StepsVolume {
        self.t += 1;
        let t = self.t;
        let m = motion.unwrap_or([0.0; 6]);
        let m0 = *self.first_motion.get_or_insert(m);
        let nuisance = nuisance.filter(|v| v.is_finite());
        let n0 = match nuisance {
            Some(v) => Some(*self.first_nuisance.get_or_insert(v)),
            None => self.first_nuisance,
        };
        // The row: constant, trend, task, motion, nuisance (those configured); the task's index.
        let mut row = vec![1.0];
        if self.steps.trend {
            row.push((t - 1) as f64 / self.protocol.n_volumes.max(1) as f64);
        }
        let task_col = self.steps.task.then(|| {
            row.push(self.task.get(t - 1).copied().unwrap_or(0.0));
            row.len() - 1
        });
        self.task_col = task_col;
        if self.steps.motion {
            row.extend((0..6).map(|k| m[k] - m0[k]));
        }
        if self.steps.nuisance {
            row.push(match (nuisance, n0) {
                (Some(v), Some(v0)) => v - v0,
                _ => f64::NAN,
            });
        }
        let row_ok = row.iter().all(|v| v.is_finite());
        let p = row.len();
        let mut rois = Vec::with_capacity(self.rois.len());
        for (j, r) in self.rois.iter_mut().enumerate() {
            let raw = means.get(j).copied().unwrap_or(f64::NAN);
            let mut s = RoiStep {
                raw,
                baseline: f64::NAN,
                percent: f64::NAN,
                despiked: f64::NAN,
                smoothed: f64::NAN,
                norm: None,
                shown: 0.0,
            };
            if raw.is_finite() && row_ok {
                accumulate(&mut r.xtx, &mut r.xty, &row, raw, p);
                r.fitted.push((t - 1, raw));
                r.rows += 1;
                let beta = solve(&r.xtx, &r.xty, p, r.rows);
                let baseline: f64 = (0..p).filter(|&k| Some(k) != task_col).map(|k| row[k] * beta[k]).sum();
                s.baseline = baseline;
                s.percent = if baseline > 0.0 { 100.0 * (raw - baseline) / baseline } else { f64::NAN };
            }
            s.despiked = despike(&r.despiked, s.percent, self.steps.despike);
            s.smoothed = match s.despiked.is_finite() {
                true => {
                    let e = r.ema.map_or(s.despiked, |e| e + self.alpha * (s.despiked - e));
                    r.ema = Some(e);
                    e
                }
                false => f64::NAN,
            };
            r.despiked.push(s.despiked);
            r.smoothed.push(s.smoothed);
            rois.push(s);
        }
        self.rows.push(row);
        let (feedback, display) = self.feedback(t, &mut rois);
        StepsVolume { rois, feedback, display }
    }

    /// Fills each ROI's `norm` and `shown` in a regulation volume; the combined and shown value.
    fn feedback(&self, t: usize, rois: &mut [RoiStep]) -> (f64, f64) {
        if self.protocol.condition(t) != 2 {
            return (0.0, 0.0);
        }
        let reference: Option<Vec<usize>> = match self.steps.normalise {
            false => Some(Vec::new()),
            true => {
                let start =
                    self.protocol.regulation.iter().find(|b| (b.0..=b.1).contains(&t)).map_or(t, |b| b.0);
                self.protocol.baseline.iter().rev().find(|b| b.1 < start).map(|&(first, last)| {
                    let delay =
                        ((BASELINE_DELAY_S * 1000.0 / self.protocol.tr_ms).ceil() as usize).min(last - first);
                    (first + delay..=last).collect()
                })
            }
        };
        let Some(reference) = reference else {
            rois.iter_mut().for_each(|r| r.shown = f64::NAN);
            return (f64::NAN, f64::NAN);
        };
        let mut norms = Vec::with_capacity(rois.len());
        for (r, s) in self.rois.iter().zip(rois.iter_mut()) {
            let base = match reference.is_empty() {
                true => 0.0,
                false => {
                    let v: Vec<f64> =
                        reference.iter().map(|&v| r.smoothed[v - 1]).filter(|v| v.is_finite()).collect();
                    median(&v)
                }
            };
            let norm = s.smoothed - base;
            s.norm = Some(norm);
            s.shown = self.show(norm);
            norms.push(norm);
        }
        let value = self.combine.apply(&norms);
        (value, self.show(value))
    }

    /// The value shown for a percent change.
    fn show(&self, value: f64) -> f64 {
        match self.steps.full_scale > 0.0 {
            true => self.display.show(value / self.steps.full_scale),
            false => {
                let scale = 10f64.powi(self.display.decimals);
                (value.abs() * scale + 0.5).floor().copysign(value) / scale
            }
        }
    }
}

/// Adds one row `x` with value `y` to the normal equations (p × p, row-major).
fn accumulate(xtx: &mut [f64], xty: &mut [f64], x: &[f64], y: f64, p: usize) {
    for a in 0..p {
        xty[a] += x[a] * y;
        for b in 0..p {
            xtx[a * p + b] += x[a] * x[b];
        }
    }
}

/// The number of fitted columns `steps` has.
fn columns(steps: &Steps) -> usize {
    1 + steps.trend as usize + steps.task as usize + 6 * steps.motion as usize + steps.nuisance as usize
}

/// The regulation blocks' boxes (1-based inclusive volumes) convolved with SPM's canonical HRF
/// at the TR, over `n` volumes, peaking at 1.
pub fn task_regressor(blocks: &[(usize, usize)], n: usize, tr: f64) -> Vec<f64> {
    let mut boxes = vec![0.0; n];
    for &(on, off) in blocks {
        boxes.iter_mut().take(off.min(n)).skip(on.saturating_sub(1)).for_each(|v| *v = 1.0);
    }
    let h = spm_hrf(tr);
    let mut x: Vec<f64> =
        (0..n).map(|i| (0..=i.min(h.len() - 1)).map(|k| h[k] * boxes[i - k]).sum()).collect();
    let peak = x.iter().copied().fold(0.0, f64::max);
    if peak > 0.0 {
        x.iter_mut().for_each(|v| *v /= peak);
    }
    x
}

/// β of the normal equations `xtx·β = xty` (p × p, row-major) over the columns that may enter
/// with `rows` rows: in order, each not collinear with those before; the rest get 0.
fn solve(xtx: &[f64], xty: &[f64], p: usize, rows: usize) -> Vec<f64> {
    let mut incl: Vec<usize> = Vec::new();
    let mut l: Vec<Vec<f64>> = Vec::new();
    for j in 0..p {
        if (incl.len() + 1) * VOLUMES_PER_COLUMN > rows {
            break;
        }
        let d = xtx[j * p + j];
        if d.is_nan() || d <= 0.0 {
            continue;
        }
        let mut z = Vec::with_capacity(incl.len() + 1);
        for (k, &c) in incl.iter().enumerate() {
            let s: f64 = (0..k).map(|m| l[k][m] * z[m]).sum();
            z.push((xtx[c * p + j] - s) / l[k][k]);
        }
        let pivot = d - z.iter().map(|v| v * v).sum::<f64>();
        if pivot > COLLINEAR * d {
            z.push(pivot.sqrt());
            l.push(z);
            incl.push(j);
        }
    }
    let n = incl.len();
    let mut y = vec![0.0; n];
    for k in 0..n {
        let s: f64 = (0..k).map(|m| l[k][m] * y[m]).sum();
        y[k] = (xty[incl[k]] - s) / l[k][k];
    }
    let mut b = vec![0.0; n];
    for k in (0..n).rev() {
        let s: f64 = (k + 1..n).map(|m| l[m][k] * b[m]).sum();
        b[k] = (y[k] - s) / l[k][k];
    }
    let mut beta = vec![0.0; p];
    incl.iter().zip(b).for_each(|(&c, v)| beta[c] = v);
    beta
}

/// `value` clipped to `k` robust σ of `history` about the median of its last values (`k` = 0:
/// unchanged).
fn despike(history: &[f64], value: f64, k: f64) -> f64 {
    if k <= 0.0 || !value.is_finite() {
        return value;
    }
    let past: Vec<f64> = history.iter().copied().filter(|v| v.is_finite()).collect();
    if past.len() < DESPIKE_MIN_VALUES {
        return value;
    }
    let centre = median(&past);
    let sigma = 1.4826 * median(&past.iter().map(|v| (v - centre).abs()).collect::<Vec<_>>());
    let recent = median(&past[past.len() - DESPIKE_WINDOW..]);
    let bound = k * sigma;
    if bound.is_nan() || bound <= 0.0 {
        return value;
    }
    value.clamp(recent - bound, recent + bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's ROI mean: a response in the blocks, drift and a little structure.
    fn mean(t: usize, blocks: &[(usize, usize)]) -> f64 {
        let on = blocks.iter().any(|&(a, b)| (a + 2..=b + 2).contains(&t));
        1000.0 + 10.0 * on as u8 as f64 + 0.05 * t as f64 + (t as f64 * 0.7).sin()
    }

    #[test]
    fn a_block_known_late_gives_the_fit_of_a_block_known_from_the_start() {
        let steps = Steps {
            trend: true,
            task: true,
            motion: true,
            nuisance: false,
            despike: 0.0,
            smooth_s: 0.0,
            normalise: true,
            full_scale: 1.0,
        };
        let blocks = vec![(11, 20), (31, 40)];
        let full = Protocol::new(50, 2000.0, blocks.clone()).unwrap();
        let none = Protocol::new(50, 2000.0, Vec::new()).unwrap();
        let new = |p: Protocol| StepsFeedback::new(steps.clone(), p, 1, Combine::Mean, Display::default());
        let (mut known, mut late) = (new(full.clone()), new(none));
        let motion =
            |t: usize| Some([0.01 * t as f64, 0.0, 0.02 * (t as f64).cos(), 0.0, 1e-4 * t as f64, 0.0]);
        for t in 1..=50 {
            if t == 15 {
                late.set_protocol(full.clone());
            }
            let m = [mean(t, &blocks)];
            let (a, b) = (known.step(&m, motion(t), None), late.step(&m, motion(t), None));
            if t >= 15 {
                let (x, y) = (a.rois[0].baseline, b.rois[0].baseline);
                assert!((x - y).abs() <= 1e-9 * x.abs(), "volume {t}: {x} against {y}");
                let (x, y) = (a.rois[0].percent, b.rois[0].percent);
                assert!((x - y).abs() <= 1e-6, "volume {t}: percent {x} against {y}");
            }
        }
    }
}
