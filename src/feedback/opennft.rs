//! OpenNFT's continuous percent-signal-change feedback, step for step as its MATLAB code does
//! it (OpenNFT master 7a7dc56: `preprSig.m`, `modifKalman.m`, `scaleTimeSeries.m`, `nfbCalc.m`;
//! Koush et al. 2017), so that a lab moving from OpenNFT sees the same number.
//!
//! Per ROI and volume `t` (1-based, causal: volume `t` uses volumes `1..t` only):
//! 1. AR(1) "filter" `y(1) = (1-a)·raw(1)`, `y(t) = raw(t) - a·y(t-1)` (a = 0.2);
//! 2. a cumulative GLM refitted every volume with regressors added in stages of
//!    `regrStep = n_task + 8` volumes: constant; + the linear trend (z-scored over the planned
//!    run length); + the six motion parameters (z-scored over `1..t`); + the task regressors,
//!    whose betas are fitted but kept in the signal. Each column is AR(1)-filtered like the data.
//!    The kept value is the residual's last element;
//! 3. a modified Kalman filter (Q = σ²/4, R = σ², σ the residuals' running std) whose first
//!    step of at least 0.9σ in a direction is held back one volume;
//! 4. scaling by running limits (max/min, then from volume 21 the medians of the top and bottom
//!    5%), never inside ±0.5% of the running mean raw signal;
//! 5. in a regulation block, the scaled value minus the median of the scaled values of the
//!    baseline block before it (from `ceil(6 s / TR)` volumes into it), combined over ROIs and
//!    shown as `round(100·value)` clipped to [0, 100] (or [-100, 100] with negative feedback).
//!
//! `tests/python/opennft_reference.py` is a numpy re-implementation of the same steps, checked
//! against OpenNFT's own MATLAB files in Octave; the tests compare every step with it.

use faer::Mat;

/// The AR(1) coefficient of OpenNFT's ROI path (`P.aAR1`).
pub const AR1: f64 = 0.2;

/// The protocol as OpenNFT encodes it: the condition of every volume (1 baseline, 2 regulation,
/// 3 feedback display) and the baseline blocks (runs of baseline volumes), all 1-based inclusive
/// volume numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Protocol {
    /// The planned run length (OpenNFT's `NrOfVolumes - nrSkipVol`).
    pub n_volumes: usize,
    /// TR in ms, as OpenNFT takes it (an integer in its GUI).
    pub tr_ms: f64,
    /// Regulation blocks `(first, last)`.
    pub regulation: Vec<(usize, usize)>,
    /// Feedback display blocks `(first, last)` (intermittent feedback's condition 3).
    pub display: Vec<(usize, usize)>,
    /// Baseline blocks `(first, last)`: the runs of volumes in neither.
    pub baseline: Vec<(usize, usize)>,
}

impl Protocol {
    /// A run of `n_volumes` at `tr_ms` whose regulation blocks are `regulation`; every other
    /// volume is baseline.
    ///
    /// The run must start with a baseline, and be shorter than 100 first baseline blocks:
    /// beyond that OpenNFT's scaling switches to a sliding window, which is not reproduced.
    pub fn new(n_volumes: usize, tr_ms: f64, regulation: Vec<(usize, usize)>) -> Result<Protocol, String> {
        Protocol::with_display(n_volumes, tr_ms, regulation, Vec::new())
    }

    /// As [`Protocol::new`], with feedback display blocks (intermittent feedback shows its value
    /// there); volumes in neither kind of block are baseline.
    pub fn with_display(
        n_volumes: usize,
        tr_ms: f64,
        regulation: Vec<(usize, usize)>,
        display: Vec<(usize, usize)>,
    ) -> Result<Protocol, String> {
        Protocol::with_baseline(n_volumes, tr_ms, regulation, display, None)
    }

    /// As [`Protocol::with_display`], with the baseline blocks named (none: every volume in
    /// neither kind of block); named, other volumes belong to no block.
    pub fn with_baseline(
        n_volumes: usize,
        tr_ms: f64,
        regulation: Vec<(usize, usize)>,
        display: Vec<(usize, usize)>,
        named: Option<Vec<(usize, usize)>>,
    ) -> Result<Protocol, String> {
        if !(tr_ms.is_finite() && tr_ms > 0.0) {
            return Err(format!("TR {tr_ms} ms: give a positive repetition time"));
        }
        let mut cond = vec![1u8; n_volumes];
        for (blocks, c, what) in [(&regulation, 2, "regulation"), (&display, 3, "display")] {
            for &(on, off) in blocks {
                if on == 0 || off < on || off > n_volumes {
                    return Err(format!("{what} block {on}..{off} is not within volumes 1..{n_volumes}"));
                }
                cond[on - 1..off].iter_mut().for_each(|x| *x = c);
            }
        }
        if let Some(named) = &named {
            let mut inside = vec![false; n_volumes];
            for &(on, off) in named {
                if on == 0 || off < on || off > n_volumes {
                    return Err(format!("baseline block {on}..{off} is not within volumes 1..{n_volumes}"));
                }
                if cond[on - 1..off].iter().any(|&c| c != 1) {
                    return Err(format!("baseline block {on}..{off} overlaps a regulation or display block"));
                }
                inside[on - 1..off].iter_mut().for_each(|x| *x = true);
            }
            cond.iter_mut().zip(&inside).filter(|(c, i)| **c == 1 && !**i).for_each(|(c, _)| *c = 0);
        }
        let mut baseline: Vec<(usize, usize)> = Vec::new();
        for (i, c) in cond.iter().enumerate() {
            let v = i + 1;
            match (c, baseline.last_mut()) {
                (1, Some(b)) if b.1 + 1 == v => b.1 = v,
                (1, _) => baseline.push((v, v)),
                _ => {}
            }
        }
        let p = Protocol { n_volumes, tr_ms, regulation, display, baseline };
        match p.baseline.first() {
            Some(&(1, last)) if n_volumes < 100 * last => Ok(p),
            Some(&(1, last)) => Err(format!(
                "{n_volumes} volumes is 100 first baseline blocks ({last} volumes) or more: OpenNFT's sliding-window \
                 scaling would take over, which is not reproduced"
            )),
            _ => Err("the run must start with a baseline block (volume 1 is in no baseline block)".into()),
        }
    }

    /// The condition of 1-based volume `t` (1 baseline, 2 regulation, 3 display).
    pub fn condition(&self, t: usize) -> u8 {
        let within = |blocks: &[(usize, usize)]| blocks.iter().any(|&(on, off)| (on..=off).contains(&t));
        match (within(&self.regulation), within(&self.display)) {
            (true, _) => 2,
            (_, true) => 3,
            _ => 1,
        }
    }

    /// `basBlockLength`: the last volume of the first baseline block (0 without one).
    pub fn bas_block_length(&self) -> usize {
        self.baseline.first().map_or(0, |b| b.1)
    }

    /// `nVolDelay = ceil(6000 / TR)`: baseline volumes left out at a block's start (the HRF).
    pub fn n_vol_delay(&self) -> usize {
        (6000.0 / self.tr_ms).ceil() as usize
    }
}

/// When the value is made (OpenNFT's `Prot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every regulation volume, against the baseline block before (`Cont`).
    Continuous,
    /// Once per regulation block, at its last volume, from the medians over the block and the
    /// baseline before it, shown through the display volumes after it (`Inter`).
    Intermittent,
}

/// How the ROIs' normalised values become the one feedback value (`P.RoiAnatOperation`).
#[derive(Clone, Debug, PartialEq)]
pub enum Combine {
    /// `mean(norm_percValues)`: OpenNFT's GUI default.
    Mean,
    /// `median(norm_percValues)`.
    Median,
    /// `norm_percValues(a) - norm_percValues(b)`: differential feedback (0-based ROI indices).
    Difference(usize, usize),
    /// `w1*norm_percValues(1) + w2*norm_percValues(2) + …`: a weighted sum, a weight per ROI.
    Weighted(Vec<f64>),
}

impl Combine {
    /// The ROIs' normalised values combined.
    pub fn apply(&self, norms: &[f64]) -> f64 {
        match self {
            Combine::Mean => norms.iter().sum::<f64>() / norms.len() as f64,
            Combine::Median => median(norms),
            Combine::Difference(a, b) => {
                norms.get(*a).copied().unwrap_or(f64::NAN) - norms.get(*b).copied().unwrap_or(f64::NAN)
            }
            Combine::Weighted(w) => norms.iter().zip(w).map(|(n, w)| n * w).sum(),
        }
    }
}

/// The displayed value's range and rounding (`MaxFeedbackVal`, `MinFeedbackVal`,
/// `FeedbackValDec`, `NegFeedback`; OpenNFT's GUI defaults 100, -100, 0, false).
#[derive(Clone, Debug, PartialEq)]
pub struct Display {
    /// The value shown for a full-scale change.
    pub max: f64,
    /// The lowest value shown with negative feedback.
    pub min: f64,
    /// Decimals kept.
    pub decimals: i32,
    /// Negative values are shown (else clipped to 0).
    pub negative: bool,
}

impl Default for Display {
    fn default() -> Display {
        Display { max: 100.0, min: -100.0, decimals: 0, negative: false }
    }
}

impl Display {
    /// `dispValue` of a value in units of full scale: `max·value` rounded half away from zero,
    /// then clipped as nfbCalc.m:79-89 clips it.
    pub fn show(&self, value: f64) -> f64 {
        let scale = 10f64.powi(self.decimals);
        let x = self.max * value;
        let mut v = if x.is_finite() { (x.abs() * scale + 0.5).floor().copysign(x) / scale } else { x };
        if !self.negative && v < 0.0 {
            v = 0.0;
        } else if self.negative && v < self.min {
            v = self.min;
        }
        if v > self.max {
            v = self.max;
        }
        v
    }
}

/// What the steps made of one ROI at one volume.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoiSteps {
    /// The ROI mean as given.
    pub raw: f64,
    /// `initLim`: 0.5% of the running mean raw signal.
    pub init_lim: f64,
    /// After the AR(1) recursion.
    pub raw_ar1: f64,
    /// The cumulative GLM's residual at this volume.
    pub glm: f64,
    /// The running std of the residuals (N-1).
    pub sigma: f64,
    /// The modified Kalman filter's output.
    pub kalman: f64,
    /// The scaling's lower and upper limits.
    pub pos_min: f64,
    /// See `pos_min`.
    pub pos_max: f64,
    /// The scaled value.
    pub scaled: f64,
    /// The scaled value minus the baseline's median, in a regulation volume.
    pub norm: Option<f64>,
    /// This ROI's own value shown, as the combined one is (0 where it is 0, NaN where undefined).
    pub shown: f64,
}

/// One volume's result: each ROI's steps and the feedback.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeSteps {
    /// Per ROI, in the order given.
    pub rois: Vec<RoiSteps>,
    /// The combined value (`vectNFBs(t)`): 0 outside regulation, NaN when the baseline it
    /// needs is missing or not yet acquired.
    pub feedback: f64,
    /// The displayed value (`dispValue`).
    pub display: f64,
}

/// One ROI's state across volumes.
#[derive(Clone, Debug, Default)]
struct RoiState {
    raw: Vec<f64>,
    ar1: Vec<f64>,
    glm: Vec<f64>,
    kalman: Vec<f64>,
    scaled: Vec<f64>,
    /// Kalman state and spike counters.
    x: f64,
    p: f64,
    f_pos: u32,
    f_neg: u32,
}

/// OpenNFT's PSC feedback over a run, volume by volume.
pub struct OpenNftFeedback {
    protocol: Protocol,
    mode: Mode,
    combine: Combine,
    display: Display,
    /// With the six motion parameters in the GLM's third stage (OpenNFT always has them).
    use_motion: bool,
    /// The z-scored linear trend over the planned run.
    trend: Vec<f64>,
    /// The task regressors, AR(1)-filtered, one column per condition (regulation).
    task: Vec<Vec<f64>>,
    /// Motion rows so far, relative to the first, row 1 set to 1e-5 as OpenNFT sets it.
    motion: Vec<[f64; 6]>,
    first_motion: Option<[f64; 6]>,
    rois: Vec<RoiState>,
    /// Continuous feedback's regulation block (1-based; 0 before the first).
    block_nf: usize,
    /// Intermittent feedback's value held for display (combined, then each ROI's), and whether
    /// it is shown.
    held: f64,
    held_rois: Vec<f64>,
    showing: bool,
}

impl OpenNftFeedback {
    /// The feedback of `n_rois` ROIs over `protocol`, made as `mode` says.
    pub fn new(
        protocol: Protocol,
        mode: Mode,
        n_rois: usize,
        combine: Combine,
        display: Display,
        use_motion: bool,
    ) -> OpenNftFeedback {
        let n = protocol.n_volumes;
        let trend = zscore(&(1..=n).map(|i| i as f64).collect::<Vec<_>>());
        // A task column per condition the protocol has, regulation then display (nrBasFct).
        let task = [&protocol.regulation, &protocol.display]
            .into_iter()
            .filter(|b| !b.is_empty())
            .map(|b| ar_filter(AR1, &block_design(b, n, protocol.tr_ms)))
            .collect();
        OpenNftFeedback {
            task,
            protocol,
            mode,
            combine,
            display,
            use_motion,
            trend,
            motion: Vec::new(),
            first_motion: None,
            rois: vec![RoiState::default(); n_rois],
            block_nf: 0,
            held: 0.0,
            held_rois: vec![0.0; n_rois],
            showing: false,
        }
    }

    /// Volumes taken so far.
    pub fn volumes(&self) -> usize {
        self.rois.first().map_or(self.motion.len(), |r| r.raw.len())
    }

    /// Takes the next volume's ROI means and its motion parameters (x, y, z mm, then the three
    /// rotations in rad; `None`: none, taken as zero as OpenNFT would).
    ///
    /// A mean that is not finite gives that ROI NaN steps and a NaN feedback for this volume; the
    /// ROI's series carries its last finite mean in its place, so one bad volume does not poison
    /// the rest of the run (OpenNFT's own series would stay NaN).
    pub fn step(&mut self, means: &[f64], motion: Option<[f64; 6]>) -> VolumeSteps {
        let t = self.volumes() + 1;
        let m = motion.unwrap_or([0.0; 6]);
        let first = *self.first_motion.get_or_insert(m);
        self.motion.push(match t {
            1 => [1e-5; 6],
            _ => std::array::from_fn(|k| m[k] - first[k]),
        });
        let regr_step = self.task.len() + 8;
        let design = self.design(t, regr_step);
        let mut rois = Vec::with_capacity(self.rois.len());
        for (j, r) in self.rois.iter_mut().enumerate() {
            let given = means.get(j).copied().unwrap_or(f64::NAN);
            let raw = match given.is_finite() {
                true => given,
                false => r.raw.last().copied().unwrap_or(f64::NAN),
            };
            r.raw.push(raw);
            let init_lim = 0.005 * r.raw.iter().sum::<f64>() / t as f64;
            let y = match t {
                1 => (1.0 - AR1) * raw,
                _ => raw - AR1 * r.ar1[t - 2],
            };
            r.ar1.push(y);
            let glm = residual(&design, &r.ar1);
            r.glm.push(glm);
            let sigma = std_n1(&r.glm);
            let kalman = kalman_step(r, glm, sigma);
            r.kalman.push(kalman);
            // With OpenNFT's sliding window out of reach (see `Protocol::new`), the limits are
            // made afresh from the whole series every volume.
            let (tmax, tmin) = scale_limits(&r.kalman);
            let pos_max = if tmax > init_lim { tmax } else { init_lim };
            let pos_min = if tmin < -init_lim { tmin } else { -init_lim };
            let mut scaled = (kalman - pos_min) / (pos_max - pos_min);
            if scaled.is_nan() {
                scaled = 0.0;
            }
            r.scaled.push(scaled);
            let steps = RoiSteps {
                raw,
                init_lim,
                raw_ar1: y,
                glm,
                sigma,
                kalman,
                pos_min,
                pos_max,
                scaled,
                norm: None,
                shown: 0.0,
            };
            rois.push(match given.is_finite() {
                true => steps,
                false => RoiSteps { raw: given, scaled: f64::NAN, ..steps },
            });
        }
        let (feedback, display) = match self.mode {
            Mode::Continuous => self.feedback(t, &mut rois),
            Mode::Intermittent => self.intermittent(t, &mut rois),
        };
        VolumeSteps { rois, feedback, display }
    }

    /// The GLM's design at volume `t`: the AR(1)-filtered nuisance columns, then the task
    /// columns (their betas are fitted, not removed); with the number of nuisance columns.
    fn design(&self, t: usize, regr_step: usize) -> (Vec<Vec<f64>>, usize) {
        let mut cols = vec![vec![1.0; t]];
        if t >= regr_step {
            cols.push(self.trend[..t].to_vec());
        }
        if t >= 2 * regr_step && self.use_motion {
            for k in 0..6 {
                cols.push(zscore(&self.motion.iter().map(|m| m[k]).collect::<Vec<_>>()));
            }
        }
        let mut cols: Vec<Vec<f64>> = cols.iter().map(|c| ar_filter(AR1, c)).collect();
        let nuisance = cols.len();
        if t >= 3 * regr_step {
            cols.extend(self.task.iter().map(|c| c[..t].to_vec()));
        }
        (cols, nuisance)
    }

    /// Intermittent PSC at volume `t` (mainLoopEntry.m:81-97, nfbCalc.m:117-183): at the last
    /// volume of regulation block k, each ROI's median over the block minus its median over the
    /// baseline before it (both from `nVolDelay` volumes in; for k ≥ 2 the baseline runs on
    /// `nVolDelay - 1` volumes), each scaled by the ROIs' mean limits; shown then and through the
    /// display volumes after it, 0 elsewhere.
    fn intermittent(&mut self, t: usize, rois: &mut [RoiSteps]) -> (f64, f64) {
        let condition = self.protocol.condition(t);
        match condition {
            3 => self.showing = true,
            _ => {
                (self.showing, self.held) = (false, 0.0);
                self.held_rois.iter_mut().for_each(|v| *v = 0.0);
            }
        }
        let mut value = 0.0;
        if let Some(k) = self.protocol.regulation.iter().position(|b| b.1 == t).filter(|_| condition == 2) {
            self.showing = true;
            let d = self.protocol.n_vol_delay();
            let (nf_first, nf_last) = self.protocol.regulation[k];
            let cond_vols: Vec<usize> = (nf_first + d..=nf_last).collect();
            let base_vols = self.protocol.baseline.get(k).map(|&(first, last)| {
                let mut v: Vec<usize> = (first + d..=last).collect();
                if k >= 1 {
                    if let Some(&end) = v.last() {
                        v.extend(end + 1..end + d);
                    }
                }
                v
            });
            value = match base_vols {
                Some(b) if !b.is_empty() && b.iter().chain(&cond_vols).all(|&v| v <= t) => {
                    let n = rois.len() as f64;
                    let mpos_min = rois.iter().map(|r| r.pos_min).sum::<f64>() / n;
                    let mpos_max = rois.iter().map(|r| r.pos_max).sum::<f64>() / n;
                    let range = mpos_max - mpos_min;
                    let mut norms = Vec::with_capacity(rois.len());
                    for (r, steps) in self.rois.iter().zip(rois.iter_mut()) {
                        let at = |vols: &[usize]| {
                            median(&vols.iter().map(|&v| r.scaled[v - 1]).collect::<Vec<_>>())
                        };
                        let norm = (at(&cond_vols) - mpos_min) / range - (at(&b) - mpos_min) / range;
                        steps.norm = Some(norm);
                        norms.push(norm);
                    }
                    self.combine.apply(&norms)
                }
                _ => f64::NAN,
            };
            self.held = self.display.show(value);
            let each: Vec<f64> =
                rois.iter().map(|r| r.norm.map_or(f64::NAN, |n| self.display.show(n))).collect();
            self.held_rois = each;
        }
        for (steps, held) in rois.iter_mut().zip(&self.held_rois) {
            steps.shown = if self.showing { *held } else { 0.0 };
        }
        (value, if self.showing { self.held } else { 0.0 })
    }

    /// Continuous PSC at volume `t` (nfbCalc.m:43-114): fills each ROI's `norm`.
    fn feedback(&mut self, t: usize, rois: &mut [RoiSteps]) -> (f64, f64) {
        if self.protocol.condition(t) != 2 {
            return (0.0, 0.0);
        }
        if let Some(k) = self.protocol.regulation.iter().position(|b| b.0 == t) {
            self.block_nf = k + 1;
        }
        let Some(&(first, last)) = self.block_nf.checked_sub(1).and_then(|k| self.protocol.baseline.get(k))
        else {
            rois.iter_mut().for_each(|r| r.shown = f64::NAN);
            return (f64::NAN, f64::NAN);
        };
        let from = first + self.protocol.n_vol_delay();
        if last > t {
            rois.iter_mut().for_each(|r| r.shown = f64::NAN);
            return (f64::NAN, f64::NAN);
        }
        let mut norms = Vec::with_capacity(rois.len());
        for (r, steps) in self.rois.iter().zip(rois.iter_mut()) {
            let base: Vec<f64> = (from..=last).map(|v| r.scaled[v - 1]).collect();
            let norm = steps.scaled - median(&base);
            steps.norm = Some(norm);
            steps.shown = self.display.show(norm);
            norms.push(norm);
        }
        let value = self.combine.apply(&norms);
        (value, self.display.show(value))
    }
}

/// One modified-Kalman update of `r` with the residual `glm` (modifKalman.m:28-69).
fn kalman_step(r: &mut RoiState, glm: f64, sigma: f64) -> f64 {
    let (q, rr, threshold) = (0.25 * sigma * sigma, sigma * sigma, 0.9 * sigma);
    let (x_prior, p_prior) = (r.x, r.p + q);
    let denom = p_prior + rr;
    let gain = if denom != 0.0 { p_prior / denom } else { 0.0 };
    let diff = gain * (glm - x_prior);
    r.x = x_prior + diff;
    r.p = (1.0 - gain) * p_prior;
    let held_back = |count: &mut u32| {
        if *count < 1 {
            *count += 1;
            true
        } else {
            *count = 0;
            false
        }
    };
    let reject = if diff.abs() < threshold {
        (r.f_pos, r.f_neg) = (0, 0);
        false
    } else if diff > 0.0 {
        held_back(&mut r.f_pos)
    } else {
        held_back(&mut r.f_neg)
    };
    if reject {
        (r.x, r.p) = (x_prior, p_prior);
    }
    r.x
}

/// `tmax`, `tmin` of scaleTimeSeries.m:44-54 over the series so far.
fn scale_limits(series: &[f64]) -> (f64, f64) {
    let mut s = series.to_vec();
    s.sort_by(f64::total_cmp);
    let t = s.len();
    if t < 21 {
        return (s[t - 1], s[0]);
    }
    let nr = (0.05 * t as f64 + 0.5).floor() as usize;
    (median(&s[t - nr - 1..]), median(&s[..nr + 1]))
}

/// The last element of `y`'s residual on `design` (columns, the first `nuisance` of them removed;
/// the rest fitted and kept), least squares by the pseudoinverse as MATLAB's `pinv`.
fn residual((cols, nuisance): &(Vec<Vec<f64>>, usize), y: &[f64]) -> f64 {
    let (t, p) = (y.len(), cols.len());
    if y.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let x = Mat::<f64>::from_fn(t, p, |i, j| cols[j][i]);
    let Ok(svd) = x.thin_svd() else { return f64::NAN };
    let (u, v) = (svd.U(), svd.V());
    let s: Vec<f64> = (0..p.min(t)).map(|k| svd.S()[k]).collect();
    // MATLAB's pinv: singular values up to max(m, n)·eps(σ_max) count as zero.
    let smax = s.iter().copied().fold(0.0, f64::max);
    let tol = t.max(p) as f64 * spacing(smax);
    let mut beta = vec![0.0; p];
    for (k, &sk) in s.iter().enumerate().filter(|(_, sk)| **sk > tol) {
        let uy: f64 = (0..t).map(|i| u[(i, k)] * y[i]).sum();
        beta.iter_mut().enumerate().for_each(|(j, b)| *b += v[(j, k)] * uy / sk);
    }
    y[t - 1] - (0..*nuisance).map(|j| cols[j][t - 1] * beta[j]).sum::<f64>()
}

/// MATLAB's `eps(x)`: the distance from |x| to the next larger double.
fn spacing(x: f64) -> f64 {
    let x = x.abs();
    if !x.is_finite() || x == 0.0 {
        return f64::MIN_POSITIVE;
    }
    f64::from_bits(x.to_bits() + 1) - x
}

/// OpenNFT's recursive AR(1) of a column: `y(1) = (1-a)·x(1)`, `y(t) = x(t) - a·y(t-1)`.
pub fn ar_filter(a: f64, x: &[f64]) -> Vec<f64> {
    let mut y: Vec<f64> = Vec::with_capacity(x.len());
    for (t, &v) in x.iter().enumerate() {
        let prev = if t == 0 { None } else { Some(y[t - 1]) };
        y.push(prev.map_or((1.0 - a) * v, |p| v - a * p));
    }
    y
}

/// MATLAB's `zscore` of a column (N-1; a zero std taken as 1; one value gives 0).
pub fn zscore(x: &[f64]) -> Vec<f64> {
    if x.len() <= 1 {
        return vec![0.0; x.len()];
    }
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let sd = std_n1(x);
    let sd = if sd == 0.0 { 1.0 } else { sd };
    x.iter().map(|v| (v - mean) / sd).collect()
}

/// MATLAB's `std` (N-1; 0 for one value).
fn std_n1(x: &[f64]) -> f64 {
    if x.len() <= 1 {
        return 0.0;
    }
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    (x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// MATLAB's `median` (NaN of nothing).
pub(crate) fn median(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    let mut s = x.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// SPM12's canonical HRF (`spm_hrf`) sampled every `rt` s, summing to 1.
pub fn spm_hrf(rt: f64) -> Vec<f64> {
    const FMRI_T: f64 = 16.0;
    let dt = rt / FMRI_T;
    let gamma = |u: f64, h: f64, l: f64| {
        if u > 0.0 {
            ((h - 1.0) * u.ln() + h * l.ln() - l * u - ln_gamma(h)).exp()
        } else {
            0.0
        }
    };
    let n = (32.0 / dt).ceil() as usize;
    let fine: Vec<f64> =
        (0..=n).map(|k| gamma(k as f64, 6.0, dt) - gamma(k as f64, 16.0, dt) / 6.0).collect();
    let samples: Vec<f64> = (0..=(32.0 / rt).floor() as usize).map(|i| fine[i * 16]).collect();
    let sum: f64 = samples.iter().sum();
    samples.into_iter().map(|v| v / sum).collect()
}

/// ln Γ(x) for the HRF's integer shapes (6 and 16).
fn ln_gamma(x: f64) -> f64 {
    (1..x.round() as u64).map(|k| (k as f64).ln()).sum()
}

/// One condition's regressor as OpenNFT's SPM design makes it (setupSPM.m, `spm_fMRI_design`
/// with T = 16, T0 = 1, units of scans, first-order Volterra): boxes of the blocks (their 1-based
/// onsets passed as SPM's 0-based ones, so each box starts one TR late, as in OpenNFT)
/// convolved with the canonical HRF at TR/16, sampled once per volume.
pub fn block_design(blocks: &[(usize, usize)], n_scans: usize, tr_ms: f64) -> Vec<f64> {
    const T: usize = 16;
    let rt = tr_ms / 1000.0;
    let dt = rt / T as f64;
    let bf = spm_hrf(dt);
    let n_sf = n_scans * T + 128;
    let mut sf = vec![0.0; n_sf];
    for &(on, off) in blocks {
        let dur = (off - on + 1) as f64;
        let ton = ((on as f64) * T as f64 + 0.5).floor() as usize + 33;
        let tof = (dur * T as f64 + 0.5).floor() as usize + ton + 1;
        if n_sf > ton {
            sf[ton - 1] += 1.0;
        }
        if n_sf > tof {
            sf[tof - 1] -= 1.0;
        }
    }
    let len = n_scans * T + 32;
    let mut acc = 0.0;
    let sf: Vec<f64> = sf[..len]
        .iter()
        .map(|v| {
            acc += v;
            acc
        })
        .collect();
    let conv = |i: usize| (0..bf.len().min(i + 1)).map(|k| sf[i - k] * bf[k]).sum::<f64>();
    (0..n_scans).map(|n| conv(n * T + 1 + 32 - 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(means: &[f64]) -> Vec<VolumeSteps> {
        let protocol = Protocol::new(means.len(), 2000.0, vec![(11, 20), (31, 40)]).unwrap();
        let mut psc =
            OpenNftFeedback::new(protocol, Mode::Continuous, 1, Combine::Mean, Display::default(), true);
        means.iter().map(|&m| psc.step(&[m], None)).collect()
    }

    #[test]
    fn protocols_are_encoded_as_opennft_encodes_them_and_bad_ones_refused() {
        let p = Protocol::new(50, 2000.0, vec![(11, 20), (31, 40)]).unwrap();
        assert_eq!(p.baseline, vec![(1, 10), (21, 30), (41, 50)]);
        assert_eq!((p.condition(10), p.condition(11), p.condition(40), p.condition(41)), (1, 2, 2, 1));
        assert_eq!((p.bas_block_length(), p.n_vol_delay()), (10, 3));
        assert_eq!(Protocol::new(50, 1970.0, vec![]).unwrap().n_vol_delay(), 4);
        assert!(Protocol::new(50, 2000.0, vec![(1, 10)]).unwrap_err().contains("start with a baseline"));
        assert!(Protocol::new(50, 2000.0, vec![(45, 60)]).unwrap_err().contains("not within"));
        assert!(Protocol::new(2000, 2000.0, vec![(11, 20)]).unwrap_err().contains("sliding-window"));
    }

    #[test]
    fn the_first_large_step_is_held_back_one_volume() {
        // At volume 1 σ = 0: the update is 0 and counts as a negative step held back.
        let mut r = RoiState::default();
        assert_eq!(kalman_step(&mut r, 5.0, 0.0), 0.0);
        assert_eq!((r.f_pos, r.f_neg), (0, 1));
        // A jump of far more than 0.9σ: held back once, taken the second time.
        let mut r = RoiState { x: 0.0, p: 1.0, ..RoiState::default() };
        let held = kalman_step(&mut r, 100.0, 1.0);
        assert_eq!((held, r.f_pos), (0.0, 1));
        let taken = kalman_step(&mut r, 100.0, 1.0);
        assert!(taken > 50.0 && r.f_pos == 0, "{taken}");
    }

    #[test]
    fn scaling_limits_are_extremes_then_medians_of_the_top_and_bottom_five_percent() {
        let s: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(scale_limits(&s), (20.0, 1.0));
        // 40 values: round(0.05·40) = 2, so the medians of the top and bottom three.
        let s: Vec<f64> = (1..=40).map(f64::from).collect();
        assert_eq!(scale_limits(&s), (39.0, 2.0));
        assert!(median(&[]).is_nan());
        assert_eq!(zscore(&[3.0, 3.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn the_hrf_and_the_block_design_have_spms_shape() {
        let h = spm_hrf(2.0);
        assert_eq!(h.len(), 17);
        assert!((h.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let peak = h.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(peak, 3, "SPM's canonical HRF peaks between 5 and 6 s: the 6 s sample at TR 2 s");
        // The box starts one TR late (OpenNFT hands SPM 1-based onsets): nothing before volume 11.
        let x = block_design(&[(11, 20)], 40, 2000.0);
        assert!(x[..11].iter().all(|v| v.abs() < 1e-12) && x[13] > 0.1, "{x:?}");
    }

    #[test]
    fn a_nan_roi_mean_gives_a_nan_value_for_its_volume_only() {
        let means: Vec<f64> = (1..=50)
            .map(|t| 1000.0 + if (13..=22).contains(&t) { 10.0 } else { 0.0 } + (t % 3) as f64)
            .collect();
        let clean = run(&means);
        let mut broken = means.clone();
        broken[14] = f64::NAN;
        let got = run(&broken);
        assert!(got[14].feedback.is_nan() && got[14].rois[0].raw.is_nan());
        assert!(got.iter().enumerate().all(|(t, v)| t == 14 || v.feedback.is_finite()), "{got:?}");
        // Before the regulation block it is "0 outside regulation", as OpenNFT gives.
        assert_eq!(clean[5].feedback, 0.0);
        assert!(clean[15].display > 0.0, "{:?}", clean[15]);
    }
}
