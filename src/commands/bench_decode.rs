//! `mirage bench-decode`: per-trial decode time of random heads at MIRAGE's output shapes on
//! one device, and (optionally) that device's outputs against the CPU's for the same weights.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::bench::summarise;
use crate::decode::model::{device, Decoder};
use crate::decode::synthetic::{random_decoder, to_device, MIRAGE_HEADS};
use crate::decode::WeightDtype;
use crate::pipeline::metrics::LatencySummary;
use crate::sim::rng::Rng;

/// `mirage bench-decode` options.
#[derive(Clone, Debug)]
pub struct DecodeBenchArgs {
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Input voxels (betas per trial).
    pub voxels: usize,
    /// Rank of the heads; `None`: full `[out, voxels]` weights.
    pub rank: Option<usize>,
    /// Precision of the weight matrices on the device.
    pub weight_dtype: WeightDtype,
    /// Timed trials (after a few untimed ones).
    pub trials: usize,
    /// Trials also decoded on the CPU and compared (0: none).
    pub compare_cpu: usize,
    /// Fail when any output differs from the CPU's by more than this.
    pub tolerance: Option<f64>,
    /// JSON report path.
    pub json: Option<PathBuf>,
}

/// One head's outputs on the device against the CPU's.
#[derive(Clone, Debug, Serialize)]
pub struct HeadComparison {
    /// Head name.
    pub head: String,
    /// Largest |device − CPU| over the compared trials.
    pub max_abs_diff: f64,
    /// Largest |CPU output|, for scale.
    pub max_abs_cpu: f64,
}

/// What `mirage bench-decode` measured.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeBenchReport {
    /// Device the decode ran on.
    pub device: String,
    /// Input voxels.
    pub voxels: usize,
    /// Rank (`None`: full heads).
    pub rank: Option<usize>,
    /// Precision of the weight matrices on the device.
    pub weight_dtype: WeightDtype,
    /// Weights over all heads.
    pub weights: usize,
    /// Seconds to build the random heads on the device.
    pub build_s: f64,
    /// Per-trial decode (upload betas, every head, renormalise, outputs back on the host), ms.
    pub per_trial_ms: LatencySummary,
    /// Mean per-trial decode, ms.
    pub mean_ms: f64,
    /// Per-trial decode of the same heads on the CPU, ms (when compared).
    pub cpu_per_trial_ms: Option<LatencySummary>,
    /// Outputs against the CPU's, per head (when compared).
    pub comparison: Vec<HeadComparison>,
    /// Peak resident memory of this process, MB.
    pub peak_host_mb: f64,
}

impl DecodeBenchReport {
    /// A short human-readable summary.
    pub fn table(&self) -> String {
        let rank = self.rank.map_or("full".to_string(), |r| format!("r={r}"));
        let p = &self.per_trial_ms;
        let mut s = format!(
            "decode on {}: {} voxels, {rank} heads of MIRAGE's shapes, {:.2} G {:?} weights ({:.1} GB as f32), built in {:.1} s\n\
             per trial ({} trials): p50 {:.3} ms  p90 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}\n",
            self.device,
            self.voxels,
            self.weights as f64 * 1e-9,
            self.weight_dtype,
            self.weights as f64 * 4e-9,
            self.build_s,
            p.count,
            p.p50,
            p.p90,
            p.p99,
            p.max,
            self.mean_ms,
        );
        if let Some(c) = &self.cpu_per_trial_ms {
            s += &format!("cpu per trial ({} trials): p50 {:.3} ms  max {:.3}\n", c.count, c.p50, c.max);
        }
        for c in &self.comparison {
            s += &format!(
                "  {:<10} max |device − cpu| {:.3e}  (max |cpu| {:.3})\n",
                c.head, c.max_abs_diff, c.max_abs_cpu
            );
        }
        s + &format!("peak host memory {:.0} MB\n", self.peak_host_mb)
    }

    /// Largest |device − CPU| over every head (0 when nothing was compared).
    pub fn max_abs_diff(&self) -> f64 {
        self.comparison.iter().map(|c| c.max_abs_diff).fold(0.0, f64::max)
    }
}

/// Random betas of unit scale for `trials` trials.
fn random_betas(trials: usize, voxels: usize) -> Vec<f32> {
    let mut rng = Rng::new(11, 5);
    (0..trials * voxels).map(|_| rng.normal() as f32).collect()
}

/// One trial's outputs, one array per head.
type TrialOutputs = Vec<Vec<f32>>;

/// Decodes every trial of `betas` one at a time, returning each one's time (ms) and outputs.
fn decode_each(decoder: &Decoder, betas: &[f32]) -> anyhow::Result<(Vec<f64>, Vec<TrialOutputs>)> {
    let n = decoder.cfg.n_voxels;
    let (mut ms, mut outputs) = (Vec::new(), Vec::new());
    for trial in betas.chunks_exact(n) {
        let t = Instant::now();
        let out = decoder.predict(trial, 1)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        outputs.push(out);
    }
    Ok((ms, outputs))
}

/// Runs the decode bench.
pub fn bench_decode(args: &DecodeBenchArgs) -> anyhow::Result<DecodeBenchReport> {
    anyhow::ensure!(args.voxels > 0 && args.trials > 0, "--voxels and --trials must be positive");
    let dev = device(&args.device)?;
    let started = Instant::now();
    let (mut decoder, weights) = random_decoder(&MIRAGE_HEADS, args.rank, args.voxels, &dev)?;
    // The CPU reference keeps float32 weights, so that a bf16 device shows its own error.
    let cpu = match args.compare_cpu {
        0 => None,
        _ => Some(to_device(&decoder, &candle_core::Device::Cpu).context("copying the heads to the CPU")?),
    };
    decoder.set_weight_dtype(args.weight_dtype.dtype())?;
    let build_s = started.elapsed().as_secs_f64();
    const WARM_UP: usize = 3;
    let betas = random_betas(WARM_UP + args.trials, args.voxels);
    let (ms, outputs) = decode_each(&decoder, &betas)?;
    let timed = &ms[WARM_UP..];
    let (mut cpu_per_trial_ms, mut comparison) = (None, Vec::new());
    if let Some(cpu) = cpu {
        let k = args.compare_cpu.min(args.trials);
        let compared = &betas[WARM_UP * args.voxels..(WARM_UP + k) * args.voxels];
        let (cpu_ms, cpu_out) = decode_each(&cpu, compared)?;
        cpu_per_trial_ms = Some(summarise(&cpu_ms));
        for (h, head) in decoder.heads.iter().enumerate() {
            let (mut diff, mut scale) = (0f64, 0f64);
            for (dev_trial, cpu_trial) in outputs[WARM_UP..].iter().zip(&cpu_out) {
                for (a, b) in dev_trial[h].iter().zip(&cpu_trial[h]) {
                    diff = diff.max((a - b).abs() as f64);
                    scale = scale.max(b.abs() as f64);
                }
            }
            comparison.push(HeadComparison {
                head: head.cfg.name.clone(),
                max_abs_diff: diff,
                max_abs_cpu: scale,
            });
        }
    }
    let report = DecodeBenchReport {
        device: if dev.is_cuda() { args.device.clone() } else { "cpu".into() },
        voxels: args.voxels,
        rank: args.rank,
        weight_dtype: args.weight_dtype,
        weights,
        build_s,
        per_trial_ms: summarise(timed),
        mean_ms: timed.iter().sum::<f64>() / timed.len() as f64,
        cpu_per_trial_ms,
        comparison,
        peak_host_mb: crate::commands::decode::peak_memory_mb().unwrap_or(f64::NAN),
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(tol) = args.tolerance {
        anyhow::ensure!(
            report.max_abs_diff() <= tol,
            "{}outputs differ from the CPU's by {:.3e} > {tol:e}",
            report.table(),
            report.max_abs_diff()
        );
    }
    Ok(report)
}
