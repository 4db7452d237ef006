//! `mirage bench-decode`: per-trial time of the live decode stage with random heads at
//! MIRAGE's output shapes on one device (optionally ranking a gallery, or stopping heads at
//! their latents), and that device's results against float32 outputs on the CPU.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::bench::summarise;
use crate::decode::gallery::Gallery;
use crate::decode::model::{device, Decoder};
use crate::decode::synthetic::{gallery_of_outputs, random_decoder, to_device, trial, MIRAGE_HEADS};
use crate::decode::{DecodeConfig, DecodeStage, WeightDtype};
use crate::metrics::LatencySummary;
use crate::rng::Rng;

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
    /// Heads decoded only to their latents (`decode.latent_heads`).
    pub latent_heads: Vec<String>,
    /// Gallery items ranked per trial (0: no gallery).
    pub gallery: usize,
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
    /// Heads decoded only to their latents.
    #[serde(default)]
    pub latent_heads: Vec<String>,
    /// Gallery items ranked per trial.
    #[serde(default)]
    pub gallery: usize,
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
    /// Outputs against the CPU's, per head (when compared); a latent head's output is its
    /// latent through the CPU's float32 up-projection.
    pub comparison: Vec<HeadComparison>,
    /// Compared trials whose best gallery match is the CPU's (float32 outputs, cosine over
    /// the full outputs), as a fraction.
    #[serde(default)]
    pub top1_agreement: Option<f64>,
    /// Largest |score − CPU score| of the CPU's top match.
    #[serde(default)]
    pub max_score_diff: Option<f64>,
    /// Timed trials whose best match is the gallery item they were made from, as a fraction.
    #[serde(default)]
    pub top1_correct: Option<f64>,
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
        if !self.latent_heads.is_empty() || self.gallery > 0 {
            s += &format!("latent heads {:?}, gallery of {} items\n", self.latent_heads, self.gallery);
        }
        if let (Some(a), Some(d)) = (self.top1_agreement, self.max_score_diff) {
            s += &format!(
                "top-1 equal to the CPU's float32 ranking in {:.1} % of trials, max |score diff| {d:.2e}\n",
                a * 100.0
            );
        }
        if let Some(c) = self.top1_correct {
            s += &format!("top-1 is the trial's own item in {:.1} % of trials\n", c * 100.0);
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
fn random_betas(trials: usize, voxels: usize, stream: u64) -> Vec<f32> {
    let mut rng = Rng::new(11, stream);
    (0..trials * voxels).map(|_| rng.normal() as f32).collect()
}

/// Runs the decode bench.
pub fn bench_decode(args: &DecodeBenchArgs) -> anyhow::Result<DecodeBenchReport> {
    anyhow::ensure!(args.voxels > 0 && args.trials > 0, "--voxels and --trials must be positive");
    let dev = device(&args.device)?;
    let started = Instant::now();
    let (decoder, weights) = random_decoder(&MIRAGE_HEADS, args.rank, args.voxels, &dev)?;
    // The CPU reference keeps float32 weights and full outputs, so that a bf16 or q8_0 decode
    // and a latent ranking show their own error.
    let cpu = match args.compare_cpu {
        0 => None,
        _ => Some(to_device(&decoder, &candle_core::Device::Cpu).context("copying the heads to the CPU")?),
    };
    let (gallery, item_betas) = match args.gallery {
        0 => (None, Vec::new()),
        n => {
            let b = random_betas(n, args.voxels, 7);
            (Some(std::sync::Arc::new(gallery_of_outputs(cpu.as_ref().unwrap_or(&decoder), &b, n)?)), b)
        }
    };
    let cfg = DecodeConfig {
        device: args.device.clone(),
        weight_dtype: args.weight_dtype,
        latent_heads: args.latent_heads.clone(),
        top_k: 5,
        ..DecodeConfig::default()
    };
    let mut stage = DecodeStage::with_model(decoder, gallery.clone(), &cfg)?;
    let build_s = started.elapsed().as_secs_f64();
    const WARM_UP: usize = 3;
    let total = WARM_UP + args.trials;
    // Each trial is a gallery item's betas plus as much noise (or, with no gallery, noise).
    let mut betas = random_betas(total, args.voxels, 5);
    if args.gallery > 0 {
        for (i, b) in betas.chunks_exact_mut(args.voxels).enumerate() {
            let item = &item_betas[(i % args.gallery) * args.voxels..][..args.voxels];
            b.iter_mut().zip(item).for_each(|(b, x)| *b += x);
        }
    }
    let (mut ms, mut decoded) = (Vec::new(), Vec::new());
    for (i, b) in betas.chunks_exact(args.voxels).enumerate() {
        let t = trial(i as u64, b);
        let start = Instant::now();
        let d = stage.decode(&t)?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        decoded.push(d);
    }
    let timed = &ms[WARM_UP..];
    let top1_correct = (args.gallery > 0).then(|| {
        let right = decoded[WARM_UP..]
            .iter()
            .filter(|d| d.top.first().map(|m| m.index) == Some(d.trial.trial as usize % args.gallery))
            .count();
        right as f64 / args.trials as f64
    });
    let mut report = DecodeBenchReport {
        device: if dev.is_cuda() { args.device.clone() } else { "cpu".into() },
        voxels: args.voxels,
        rank: args.rank,
        weight_dtype: args.weight_dtype,
        latent_heads: args.latent_heads.clone(),
        gallery: args.gallery,
        weights,
        build_s,
        per_trial_ms: summarise(timed),
        mean_ms: timed.iter().sum::<f64>() / timed.len() as f64,
        cpu_per_trial_ms: None,
        comparison: Vec::new(),
        top1_agreement: None,
        max_score_diff: None,
        top1_correct,
        peak_host_mb: 0.0,
    };
    if let Some(cpu) = cpu {
        compare_with_cpu(&mut report, &cpu, gallery.as_deref(), &betas, &decoded, args, WARM_UP)?;
    }
    report.peak_host_mb = crate::commands::decode::peak_memory_mb().unwrap_or(f64::NAN);
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

/// Decodes the first `args.compare_cpu` timed trials with the CPU's float32 heads (full outputs,
/// cosine over them) and fills the comparison of `report`.
fn compare_with_cpu(
    report: &mut DecodeBenchReport,
    cpu: &Decoder,
    gallery: Option<&Gallery>,
    betas: &[f32],
    decoded: &[crate::decode::Decoded],
    args: &DecodeBenchArgs,
    skip: usize,
) -> anyhow::Result<()> {
    let n = args.voxels;
    let k = args.compare_cpu.min(args.trials);
    let mut cpu_ms = Vec::new();
    let mut diffs: Vec<HeadComparison> = cpu
        .heads
        .iter()
        .map(|h| HeadComparison { head: h.cfg.name.clone(), max_abs_diff: 0.0, max_abs_cpu: 0.0 })
        .collect();
    let (mut agree, mut score_diff) = (0usize, 0f64);
    for (b, d) in betas.chunks_exact(n).zip(decoded).skip(skip).take(k) {
        let start = Instant::now();
        let reference = cpu.predict(b, 1)?;
        cpu_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let mut by_name = BTreeMap::new();
        for ((head, r), e) in cpu.heads.iter().zip(reference).zip(&mut diffs) {
            let name = &head.cfg.name;
            let got =
                match (d.heads.iter().find(|(h, _, _)| h == name), d.latents.iter().find(|(h, _)| h == name))
                {
                    (Some((_, _, o)), _) => o.clone(),
                    (None, Some((_, l))) => head.output_of_latent(l)?.context("a latent from a full head")?,
                    (None, None) => anyhow::bail!("head {name}: neither output nor latent"),
                };
            for (a, b) in got.iter().zip(&r) {
                e.max_abs_diff = e.max_abs_diff.max((a - b).abs() as f64);
                e.max_abs_cpu = e.max_abs_cpu.max(b.abs() as f64);
            }
            by_name.insert(name.clone(), r);
        }
        if let Some(g) = gallery {
            let best = g.rank(&by_name, &BTreeMap::new(), 1);
            if let (Some(want), Some(got)) = (best.first(), d.top.first()) {
                agree += usize::from(want.index == got.index);
                let same = d.top.iter().find(|m| m.index == want.index);
                score_diff = score_diff.max(same.map_or(f64::INFINITY, |m| (m.score - want.score).abs()));
            }
        }
    }
    report.cpu_per_trial_ms = Some(summarise(&cpu_ms));
    report.comparison = diffs;
    if gallery.is_some() {
        report.top1_agreement = Some(agree as f64 / k as f64);
        report.max_score_diff = Some(score_diff);
    }
    Ok(())
}

/// Named random tensors on a device, for a network built from them.
struct RandomWeights {
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    dev: candle_core::Device,
}

impl RandomWeights {
    fn put(&mut self, name: &str, shape: &[usize], scale: f64) -> anyhow::Result<()> {
        let t = candle_core::Tensor::randn(0f32, 1f32, shape, &self.dev)?.affine(scale, 0.0)?;
        self.tensors.insert(name.to_string(), t);
        Ok(())
    }

    /// A `Linear(i, o)`'s weight (scaled by 1/√i) and bias.
    fn linear(&mut self, name: &str, i: usize, o: usize) -> anyhow::Result<()> {
        self.put(&format!("{name}.weight"), &[o, i], 1.0 / (i as f64).sqrt())?;
        self.put(&format!("{name}.bias"), &[o], 0.01)
    }
}

/// `mirage bench-decode --mindeye2 H`: per-trial time of a MindEye2 network with random weights
/// at the published shapes (V voxels, width `hidden`, 4 mixer blocks, 256 × 1664 CLIP tokens,
/// the blurry branch): upload the betas, ridge, backbone, `clip_proj` and blurry latent, all
/// outputs back on the host; then `pictures` SD-VAE pictures (224 × 224) of blurry latents.
/// Returns the printed summary; writes the JSON report when asked.
pub fn bench_mindeye2(
    device_spec: &str,
    voxels: usize,
    hidden: usize,
    dtype: WeightDtype,
    trials: usize,
    pictures: usize,
    json: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    use crate::decode::diffusers::{DecoderConfig, VaeConfig, VaeDecoder};
    use crate::decode::mindeye2::{BlurryConfig, Config, MindEye2};
    anyhow::ensure!(
        voxels > 0 && hidden > 0 && trials > 0,
        "--voxels, --mindeye2 and --trials must be positive"
    );
    let dev = device(device_spec)?;
    let (tokens, dim, blocks) = (256, 1664, 4);
    let dt = match dtype {
        WeightDtype::F32 => candle_core::DType::F32,
        WeightDtype::Bf16 => candle_core::DType::BF16,
        WeightDtype::Q8_0 => anyhow::bail!("--mindeye2 runs in f32 or bf16"),
    };
    let started = Instant::now();
    let mut w = RandomWeights { tensors: std::collections::HashMap::new(), dev: dev.clone() };
    w.linear("ridge.linears.0", voxels, hidden)?;
    for b in 0..blocks {
        for (prefix, width) in [("mixer_blocks1", hidden), ("mixer_blocks2", 1)] {
            let p = format!("backbone.{prefix}.{b}");
            w.put(&format!("{p}.0.weight"), &[width], 0.1)?;
            w.put(&format!("{p}.0.bias"), &[width], 0.1)?;
            w.linear(&format!("{p}.1.0"), width, width)?;
            w.linear(&format!("{p}.1.3"), width, width)?;
        }
    }
    w.linear("backbone.backbone_linear", hidden, tokens * dim)?;
    for (ln, lin) in [(0, 2), (3, 5), (6, 8)] {
        w.put(&format!("backbone.clip_proj.{ln}.weight"), &[dim], 0.1)?;
        w.put(&format!("backbone.clip_proj.{ln}.bias"), &[dim], 0.1)?;
        w.linear(&format!("backbone.clip_proj.{lin}"), dim, dim)?;
    }
    // The blurry branch at MindEye2's shape; the upsampler's weights as candle initialises them.
    let blurry = BlurryConfig {
        channels: 64,
        side: 7,
        upsampler: DecoderConfig {
            in_channels: 64,
            out_channels: 4,
            block_out_channels: vec![32, 64, 128],
            layers_per_block: 1,
            norm_num_groups: 32,
        },
    };
    w.linear("backbone.blin1", hidden, 64 * 7 * 7)?;
    w.put("backbone.bnorm.weight", &[64], 0.1)?;
    w.put("backbone.bnorm.bias", &[64], 0.1)?;
    let init = candle_nn::VarMap::new();
    crate::decode::diffusers::Decoder::load(
        &blurry.upsampler,
        candle_nn::VarBuilder::from_varmap(&init, candle_core::DType::F32, &dev).pp("backbone.bupsampler"),
    )?;
    for (name, var) in init.data().lock().map_err(|_| anyhow::anyhow!("varmap poisoned"))?.iter() {
        w.tensors.insert(name.clone(), var.as_tensor().clone());
    }
    let tensors = w.tensors;
    let weights: usize = tensors.values().map(|t| t.elem_count()).sum();
    let cfg = Config {
        architecture: crate::decode::mindeye2::ARCHITECTURE.into(),
        n_voxels: voxels,
        hidden,
        seq_len: 1,
        n_blocks: blocks,
        clip_tokens: tokens,
        clip_dim: dim,
        subject: 0,
        blurry: Some(blurry),
        vae: None,
        provenance: serde_json::Value::Null,
    };
    let vb = candle_nn::VarBuilder::from_tensors(tensors, dt, &dev);
    let vae_init = candle_nn::VarMap::new();
    let vae = VaeDecoder::load(
        VaeConfig::stable_diffusion(),
        candle_nn::VarBuilder::from_varmap(&vae_init, dt, &dev),
    )?;
    let net = MindEye2::load(cfg, vb)?.with_vae(vae)?;
    let build_s = started.elapsed().as_secs_f64();
    const WARM_UP: usize = 2;
    let betas = random_betas(WARM_UP + trials, voxels, 5);
    let host = |t: &candle_core::Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (mut ms, mut latents) = (Vec::new(), Vec::new());
    for (i, b) in betas.chunks_exact(voxels).enumerate() {
        let start = Instant::now();
        let out = net.forward(&net.input(b, 1)?)?;
        let (backbone, clip) = (host(&out.backbone)?, host(&out.clip_voxels)?);
        let latent = out.blurry_latent.context("the blurry branch gave no latent")?;
        let latent_values = host(&latent)?;
        anyhow::ensure!(backbone.len() == tokens * dim && clip.len() == tokens * dim, "output size");
        anyhow::ensure!(latent_values.len() == 4 * 28 * 28, "latent size");
        if i >= WARM_UP {
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        latents.push(latent);
    }
    let summary = summarise(&ms);
    // One untimed picture first (kernels, allocations), then `pictures` timed ones.
    let mut picture_ms = Vec::new();
    for (i, latent) in latents.iter().take(pictures + 1).enumerate() {
        let start = Instant::now();
        let picture = net.picture(latent)?.context("no vae")?;
        anyhow::ensure!(picture.dims() == [1, 3, 224, 224], "picture shape {:?}", picture.dims());
        crate::decode::image::png_of_signed(&picture.get(0)?)?;
        if i > 0 {
            picture_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let pictures_summary = (!picture_ms.is_empty()).then(|| summarise(&picture_ms));
    let report = serde_json::json!({
        "model": "mindeye2", "device": device_spec, "voxels": voxels, "hidden": hidden, "blocks": blocks,
        "clip_tokens": tokens, "clip_dim": dim, "weight_dtype": dtype, "weights": weights,
        "build_s": build_s, "trials": trials, "per_trial_ms": summary,
        "pictures": picture_ms.len(), "per_picture_ms": pictures_summary,
    });
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| path.display().to_string())?;
    }
    let pictures_line = match pictures_summary {
        Some(p) => format!(
            "SD-VAE picture 224x224: p50 {:.0} ms, max {:.0} ms over {} pictures\n",
            p.p50,
            p.max,
            picture_ms.len()
        ),
        None => String::new(),
    };
    Ok(format!(
        "mindeye2 h={hidden} V={voxels} {tokens}x{dim} + blurry latent on {device_spec} ({dtype:?}, {:.2} G weights, built in {build_s:.1} s): \
         per trial p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {trials} trials\n{pictures_line}",
        weights as f64 / 1e9,
        summary.p50,
        summary.p99,
        summary.max
    ))
}
