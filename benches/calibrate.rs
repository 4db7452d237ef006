//! The closed-form calibration fit at MIRAGE's sizes: 12 imagery trials of 12 stimuli over
//! 15,724 voxels through low-rank (r = 512) heads of MIRAGE's full output shapes — cold, as
//! `mirage calibrate` runs it (each head's `AᵀA` computed in the fit)
//! — beside the `AᵀA` of the largest head alone (the fit's biggest product) in the same
//! process.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mirage_rt::calibrate::{transfer, CalibrateConfig, CalibrationSet};
use mirage_rt::decode::model::Decoder;
use mirage_rt::decode::synthetic::{self, MIRAGE_HEADS};
use mirage_rt::rng::Rng;

const VOXELS: usize = 15_724;
const STIMULI: usize = 12;

fn decoder() -> Decoder {
    synthetic::random_decoder(&MIRAGE_HEADS, Some(512), VOXELS, &Device::Cpu).unwrap().0
}

/// Twelve trials (each stimulus once, with noise) whose targets are the decoder's outputs for
/// the stimuli's noiseless betas.
fn calibration_set(decoder: &Decoder) -> CalibrationSet {
    let mut rng = Rng::new(7, 3);
    let mut normal = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let clean = normal(STIMULI * VOXELS);
    let noise = normal(STIMULI * VOXELS);
    let trials: Vec<usize> = (0..STIMULI).collect();
    let betas = trials
        .iter()
        .enumerate()
        .flat_map(|(t, &s)| (0..VOXELS).map(move |v| (t, s, v)))
        .map(|(t, s, v)| clean[s * VOXELS + v] + noise[t * VOXELS + v])
        .collect();
    let outputs = decoder.predict(&clean, STIMULI).unwrap();
    let mut targets = BTreeMap::new();
    for (h, out) in decoder.heads.iter().zip(outputs) {
        let n = h.cfg.n_outputs();
        targets.insert(
            h.cfg.name.clone(),
            trials.iter().flat_map(|&s| out[s * n..(s + 1) * n].to_vec()).collect(),
        );
    }
    CalibrationSet {
        betas,
        stimuli: trials.iter().map(|s| s.to_string()).collect(),
        targets,
        others: Vec::new(),
        condition: None,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("calibrate");
    g.measurement_time(Duration::from_secs(60)).warm_up_time(Duration::from_secs(1)).sample_size(10);
    let d = decoder();
    let set = calibration_set(&d);
    let retrieval = d.heads.iter().find(|h| h.cfg.name == "retrieval").unwrap();
    let (a, _) = retrieval.output_map().unwrap().unwrap();
    g.bench_function("baseline_output_gram_retrieval_head", |b| {
        b.iter(|| black_box(a.t().unwrap().contiguous().unwrap().matmul(&a).unwrap()))
    });
    drop(a);
    let cfg = CalibrateConfig::default();
    g.bench_function("closed_form_fit_12_trials_mirage_shapes_r512_cold", |b| {
        b.iter_batched(
            decoder,
            |fresh| black_box(transfer::fit(&fresh, &set, &cfg, &mut |_| {}).unwrap().1.seconds),
            BatchSize::PerIteration,
        )
    });
    let (_, report) = transfer::fit(&d, &set, &cfg, &mut |_| {}).unwrap();
    eprintln!("a fit's report: {}", serde_json::to_string(&report).unwrap_or_default());
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
