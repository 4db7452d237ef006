//! Simulated stimuli (small grayscale pictures with semantic embeddings) and the voxel
//! encoding model that turns a stimulus into a response amplitude in each ROI voxel.

use crate::rng::Rng;

/// The stimulus set: picture `s` is `pictures[s]` (`size × size`, row-major, values in [0, 1]).
#[derive(Clone, Debug)]
pub struct Stimuli {
    /// Side of each square picture in pixels.
    pub size: usize,
    /// One picture per stimulus, row-major.
    pub pictures: Vec<Vec<f32>>,
    /// One unit-norm semantic embedding per stimulus.
    pub embeddings: Vec<Vec<f32>>,
    /// Semantic category of each stimulus (embeddings cluster by category).
    pub categories: Vec<usize>,
}

/// Number of semantic categories the embeddings cluster into.
const N_CATEGORIES: usize = 4;

impl Stimuli {
    /// Draws `n` pictures of `size²` pixels and `dim`-dimensional embeddings.
    pub fn generate(rng: &mut Rng, n: usize, size: usize, dim: usize) -> Stimuli {
        let centroids: Vec<Vec<f64>> =
            (0..N_CATEGORIES).map(|_| unit((0..dim).map(|_| rng.normal()).collect())).collect();
        let mut pictures = Vec::with_capacity(n);
        let mut embeddings = Vec::with_capacity(n);
        let mut categories = Vec::with_capacity(n);
        for s in 0..n {
            pictures.push(picture(rng, size));
            let c = s % N_CATEGORIES;
            let e: Vec<f64> =
                centroids[c].iter().map(|m| m + 0.7 * rng.normal() / (dim as f64).sqrt()).collect();
            embeddings.push(unit(e).into_iter().map(|v| v as f32).collect());
            categories.push(c);
        }
        Stimuli { size, pictures, embeddings, categories }
    }
}

/// What a decoder head is trained to predict for each stimulus: a stand-in for MIRAGE's CLIP,
/// VDVAE and pixel targets, one array per stimulus.
#[derive(Clone, Debug)]
pub struct HeadTarget {
    /// Head name.
    pub name: &'static str,
    /// Shape of one target.
    pub shape: Vec<usize>,
    /// One flattened target per stimulus.
    pub per_stimulus: Vec<Vec<f32>>,
}

/// Side of the low-level target grid (block means of the picture).
const LOWLEVEL_GRID: usize = 8;

impl Stimuli {
    /// Targets of the five heads: `image` (the embedding), `text` (4 tokens × 16, a fixed
    /// nonlinear projection of it), `lowlevel` (8×8 block means of the picture), `retrieval`
    /// (2 tokens: the embedding and a projection of the low-level features) and `pixels`
    /// (the picture itself, `[1, size, size]`).
    pub fn head_targets(&self, rng: &mut Rng) -> Vec<HeadTarget> {
        let dim = self.embeddings.first().map_or(0, Vec::len);
        let g = LOWLEVEL_GRID;
        let text_proj: Vec<f64> = (0..64 * dim).map(|_| rng.normal() / (dim.max(1) as f64).sqrt()).collect();
        let low_proj: Vec<f64> = (0..dim * g * g).map(|_| rng.normal() / g as f64).collect();
        let lowlevel: Vec<Vec<f32>> = self
            .pictures
            .iter()
            .map(|pic| {
                (0..g * g)
                    .map(|cell| {
                        let (gy, gx) = (cell / g, cell % g);
                        let (y0, y1) =
                            (gy * self.size / g, ((gy + 1) * self.size / g).max(gy * self.size / g + 1));
                        let (x0, x1) =
                            (gx * self.size / g, ((gx + 1) * self.size / g).max(gx * self.size / g + 1));
                        let mut s = 0.0;
                        for y in y0..y1.min(self.size) {
                            for x in x0..x1.min(self.size) {
                                s += pic[y * self.size + x];
                            }
                        }
                        s / ((y1 - y0) * (x1 - x0)) as f32
                    })
                    .collect()
            })
            .collect();
        let text = self
            .embeddings
            .iter()
            .map(|e| {
                (0..64)
                    .map(|r| {
                        (0..dim).map(|c| text_proj[r * dim + c] * f64::from(e[c])).sum::<f64>().tanh() as f32
                    })
                    .collect()
            })
            .collect();
        let retrieval = self
            .embeddings
            .iter()
            .zip(&lowlevel)
            .map(|(e, l)| {
                let p: Vec<f64> = (0..dim)
                    .map(|r| (0..g * g).map(|c| low_proj[r * g * g + c] * (f64::from(l[c]) - 0.5)).sum())
                    .collect();
                e.iter().copied().chain(unit(p).into_iter().map(|v| v as f32)).collect()
            })
            .collect();
        vec![
            HeadTarget { name: "image", shape: vec![dim], per_stimulus: self.embeddings.clone() },
            HeadTarget { name: "text", shape: vec![4, 16], per_stimulus: text },
            HeadTarget { name: "lowlevel", shape: vec![g * g], per_stimulus: lowlevel },
            HeadTarget { name: "retrieval", shape: vec![2, dim], per_stimulus: retrieval },
            HeadTarget {
                name: "pixels",
                shape: vec![1, self.size, self.size],
                per_stimulus: self.pictures.clone(),
            },
        ]
    }
}

fn unit(v: Vec<f64>) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / n).collect()
}

/// Mid-grey background, two to four Gaussian blobs of either sign, and a faint grating.
fn picture(rng: &mut Rng, size: usize) -> Vec<f32> {
    let s = size as f64;
    let n_blobs = 2 + rng.below(3);
    let blobs: Vec<[f64; 4]> = (0..n_blobs)
        .map(|_| {
            let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            [
                rng.range(0.15, 0.85) * s,
                rng.range(0.15, 0.85) * s,
                rng.range(0.06, 0.2) * s,
                sign * rng.range(0.2, 0.45),
            ]
        })
        .collect();
    let theta = rng.range(0.0, std::f64::consts::PI);
    let freq = rng.range(1.5, 4.0) * std::f64::consts::TAU / s;
    let phase = rng.range(0.0, std::f64::consts::TAU);
    let mut out = Vec::with_capacity(size * size);
    for row in 0..size {
        for col in 0..size {
            let (x, y) = (col as f64 + 0.5, row as f64 + 0.5);
            let mut v = 0.5 + 0.12 * (freq * (x * theta.cos() + y * theta.sin()) + phase).sin();
            for [cx, cy, sd, amp] in &blobs {
                v += amp * (-((x - cx).powi(2) + (y - cy).powi(2)) / (2.0 * sd * sd)).exp();
            }
            out.push(v.clamp(0.0, 1.0) as f32);
        }
    }
    out
}

/// Which condition a trial belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrialCondition {
    /// The participant sees the picture.
    Seen,
    /// The participant imagines the picture.
    Imagery,
}

impl TrialCondition {
    /// The BIDS `trial_type` label.
    pub fn label(self) -> &'static str {
        match self {
            TrialCondition::Seen => "seen",
            TrialCondition::Imagery => "imagery",
        }
    }
}

/// Parameters of the voxel encoding model.
#[derive(Clone, Copy, Debug)]
pub struct EncodingParams {
    /// Overall response scale in percent signal change.
    pub signal_pct: f64,
    /// Low-level (pixel) drive kept during imagery, as a fraction of the seen drive.
    pub imagery_lowlevel: f64,
    /// Gain of all imagery responses relative to seen ones.
    pub imagery_gain: f64,
    /// Amplitude (percent signal change) of the structured voxel-space shift under imagery.
    pub imagery_shift_pct: f64,
    /// Strength (relative to `signal_pct`) of the stimulus information that imagery spreads
    /// through a few large-scale spatial modes.
    pub imagery_mixing: f64,
}

/// Number of large-scale spatial modes imagery mixes stimulus information into.
pub const IMAGERY_MODES: usize = 4;

/// Per-voxel response amplitudes (percent signal change) of every stimulus in both conditions.
#[derive(Clone, Debug)]
pub struct EncodingModel {
    /// Amplitudes when seen: `seen[s][r]` for stimulus `s`, ROI voxel `r`.
    pub seen: Vec<Vec<f32>>,
    /// Amplitudes when imagined.
    pub imagery: Vec<Vec<f32>>,
}

impl EncodingModel {
    /// Builds the model for ROI voxels at world positions `roi_world` (mm).
    ///
    /// Each voxel has a retinotopic Gaussian receptive field on the picture (its position in the
    /// ROI's x–z extent sets the field's centre) and random semantic weights. Its amplitude is
    /// `gain · (0.5 + 0.6·L̂ + 0.6·Ŝ)`, where `L̂` and `Ŝ` are the low-level and semantic drives
    /// standardised over the stimulus set. Imagery scales `L̂` by `imagery_lowlevel` and everything
    /// by `imagery_gain`, modulates gains by a smooth spatial field and adds a smooth shift.
    /// It also adds `imagery_mixing · Σₖ φₖ(r)·cₖ(s)`: [`IMAGERY_MODES`] smooth fields `φₖ`
    /// driven by random linear read-outs `cₖ` of the seen pattern — a low-rank, stimulus-
    /// dependent distortion that per-voxel z-scoring cannot undo but `I + U·Vᵀ` can.
    pub fn build(
        rng: &mut Rng,
        stimuli: &Stimuli,
        roi_world: &[[f64; 3]],
        p: &EncodingParams,
    ) -> EncodingModel {
        let n_stim = stimuli.pictures.len();
        let size = stimuli.size;
        let dim = stimuli.embeddings.first().map_or(0, Vec::len);
        let lo = |a: usize| roi_world.iter().map(|w| w[a]).fold(f64::INFINITY, f64::min);
        let hi = |a: usize| roi_world.iter().map(|w| w[a]).fold(f64::NEG_INFINITY, f64::max);
        let (x0, x1, z0, z1) = (lo(0), hi(0), lo(2), hi(2));
        let gain_field = SmoothField::new(rng);
        let shift_field = SmoothField::new(rng);
        let mut seen = vec![vec![0f32; roi_world.len()]; n_stim];
        let mut imagery = vec![vec![0f32; roi_world.len()]; n_stim];
        let mut low = vec![0f64; n_stim];
        let mut sem = vec![0f64; n_stim];
        for (r, w) in roi_world.iter().enumerate() {
            let fx = if x1 > x0 { (w[0] - x0) / (x1 - x0) } else { 0.5 };
            let fz = if z1 > z0 { (w[2] - z0) / (z1 - z0) } else { 0.5 };
            let cx = (fx * 0.8 + 0.1 + rng.range(-0.05, 0.05)) * size as f64;
            let cy = ((1.0 - fz) * 0.8 + 0.1 + rng.range(-0.05, 0.05)) * size as f64;
            let sd = rng.range(1.5, 4.5);
            let weights: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
            let gain = rng.range(0.5, 1.5);
            // The receptive field is separable: exp(-(dx² + dy²) / 2σ²) = gx(col) · gy(row).
            let gauss = |c: f64| -> Vec<f64> {
                (0..size).map(|p| (-(p as f64 + 0.5 - c).powi(2) / (2.0 * sd * sd)).exp()).collect()
            };
            let (gx, gy) = (gauss(cx), gauss(cy));
            let norm: f64 = gx.iter().sum::<f64>() * gy.iter().sum::<f64>();
            for s in 0..n_stim {
                let pic = &stimuli.pictures[s];
                let mut acc = 0.0;
                for (row, wy) in gy.iter().enumerate() {
                    let line: f64 = gx
                        .iter()
                        .zip(&pic[row * size..(row + 1) * size])
                        .map(|(wx, p)| wx * (f64::from(*p) - 0.5))
                        .sum();
                    acc += wy * line;
                }
                low[s] = acc / norm.max(1e-12);
                sem[s] = weights.iter().zip(&stimuli.embeddings[s]).map(|(a, b)| a * f64::from(*b)).sum();
            }
            standardize(&mut low);
            standardize(&mut sem);
            let g_img = p.imagery_gain * (1.0 + 0.4 * gain_field.at(w));
            let shift = p.imagery_shift_pct * shift_field.at(w);
            for s in 0..n_stim {
                seen[s][r] = (p.signal_pct * gain * (0.5 + 0.6 * low[s] + 0.6 * sem[s])) as f32;
                imagery[s][r] =
                    (p.signal_pct * gain * g_img * (0.5 + 0.6 * p.imagery_lowlevel * low[s] + 0.6 * sem[s])
                        + shift) as f32;
            }
        }
        let modes: Vec<SmoothField> = (0..IMAGERY_MODES).map(|_| SmoothField::new(rng)).collect();
        let readouts: Vec<Vec<f64>> =
            (0..IMAGERY_MODES).map(|_| (0..roi_world.len()).map(|_| rng.normal()).collect()).collect();
        let mean: Vec<f64> = (0..roi_world.len())
            .map(|r| seen.iter().map(|p| f64::from(p[r])).sum::<f64>() / n_stim.max(1) as f64)
            .collect();
        for (field, readout) in modes.iter().zip(&readouts) {
            let mut c: Vec<f64> = seen
                .iter()
                .map(|p| readout.iter().zip(p).zip(&mean).map(|((v, x), m)| v * (f64::from(*x) - m)).sum())
                .collect();
            standardize(&mut c);
            for (r, w) in roi_world.iter().enumerate() {
                let phi = p.signal_pct * p.imagery_mixing * field.at(w);
                for s in 0..n_stim {
                    imagery[s][r] += (phi * c[s]) as f32;
                }
            }
        }
        EncodingModel { seen, imagery }
    }

    /// Amplitudes of stimulus `s` under `condition`.
    pub fn pattern(&self, s: usize, condition: TrialCondition) -> &[f32] {
        match condition {
            TrialCondition::Seen => &self.seen[s],
            TrialCondition::Imagery => &self.imagery[s],
        }
    }
}

fn standardize(v: &mut [f64]) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    v.iter_mut().for_each(|x| *x = if sd > 1e-12 { (*x - mean) / sd } else { 0.0 });
}

/// A smooth random field in `[-1, 1]` over world space (a sum of four low-frequency waves).
#[derive(Clone, Debug)]
pub struct SmoothField {
    waves: Vec<([f64; 3], f64)>,
}

impl SmoothField {
    /// Draws wave vectors with wavelengths between 30 and 120 mm.
    pub fn new(rng: &mut Rng) -> SmoothField {
        let waves = (0..4)
            .map(|_| {
                let dir = unit((0..3).map(|_| rng.normal()).collect());
                let k = std::f64::consts::TAU / rng.range(30.0, 120.0);
                ([dir[0] * k, dir[1] * k, dir[2] * k], rng.range(0.0, std::f64::consts::TAU))
            })
            .collect();
        SmoothField { waves }
    }

    /// The field at a world point.
    pub fn at(&self, p: &[f64; 3]) -> f64 {
        let n = self.waves.len().max(1) as f64;
        self.waves.iter().map(|(k, ph)| (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + ph).sin()).sum::<f64>() / n
    }
}
