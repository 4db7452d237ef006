//! Decode cost per trial at MIRAGE's sizes: 15,724 voxels (NSD subj01 nsdgeneral) through
//! low-rank (r = 512) heads of the full MIRAGE output shapes, beside streaming the same
//! number of weight bytes (the memory-bandwidth floor of a batch-1 decode). With
//! `MIRAGE_BENCH_FULL=1` also full-size heads one at a time (random weights), which need
//! up to 7 GB of memory each; the retrieval head (16.5 GB) is timed on 64 of its 257 tokens.

use std::hint::black_box;
use std::time::Duration;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use mirage_rt::decode::model::Decoder;
use mirage_rt::decode::synthetic::{self, MIRAGE_HEADS};
use mirage_rt::decode::{DecodeConfig, DecodeStage, WeightDtype};
use mirage_rt::rng::Rng;

const VOXELS: usize = 15_724;
/// nsdgeneral's size on a 3 mm grid (64×64×36).
const SMALL_VOXELS: usize = 3_400;

/// A decoder on the CPU with random weights for `heads`, each low-rank with `rank` or full.
fn random_decoder(heads: &[(&str, &[usize])], rank: Option<usize>, voxels: usize) -> (Decoder, usize) {
    synthetic::random_decoder(heads, rank, voxels, &Device::Cpu).unwrap()
}

fn betas(voxels: usize) -> Vec<f32> {
    (0..voxels).map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0).collect()
}

/// Reads every value once with independent lanes (vectorised): the memory-bandwidth floor of
/// a batch-1 product with that many weights.
fn stream(values: &[f32]) -> f32 {
    let lanes = values.chunks_exact(16).fold([0f32; 16], |mut acc, c| {
        acc.iter_mut().zip(c).for_each(|(a, v)| *a += v);
        acc
    });
    lanes.iter().sum()
}

/// Peak resident memory of this process in MB.
fn peak_mb() -> f64 {
    mirage_rt::commands::decode::peak_memory_mb().unwrap_or(f64::NAN)
}

fn bench(c: &mut Criterion) {
    let x = betas(VOXELS);
    let mut g = c.benchmark_group("decode");
    g.measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(2)).sample_size(20);

    let (decoder, weights) = random_decoder(&MIRAGE_HEADS, Some(512), VOXELS);
    eprintln!("low-rank r=512 MIRAGE heads: {weights} weights ({:.0} MB f32)", weights as f64 * 4e-6);
    let floor: Vec<f32> = vec![1.0; weights];
    g.bench_function("baseline_stream_lowrank_weight_bytes", |b| b.iter(|| black_box(stream(&floor))));
    drop(floor);
    g.bench_function("lowrank_r512_mirage_shapes_per_trial", |b| {
        b.iter(|| black_box(decoder.predict(&x, 1).unwrap()))
    });
    drop(decoder);
    // The live stage with every head stopped at its latent and 100 gallery items ranked from
    // the latents (exact), with float32 and with 8-bit (Q8_0) input-side weights.
    for (dtype, name) in [(WeightDtype::F32, "f32"), (WeightDtype::Q8_0, "q8_0")] {
        let (d, _) = random_decoder(&MIRAGE_HEADS, Some(512), VOXELS);
        let mut rng = Rng::new(3, 1);
        let items: Vec<f32> = (0..100 * VOXELS).map(|_| rng.normal() as f32).collect();
        let gallery = synthetic::gallery_of_outputs(&d, &items, 100).unwrap();
        let cfg = DecodeConfig {
            device: "cpu".into(),
            weight_dtype: dtype,
            latent_heads: MIRAGE_HEADS.iter().map(|(n, _)| n.to_string()).collect(),
            ..DecodeConfig::default()
        };
        let mut stage = DecodeStage::with_model(d, Some(std::sync::Arc::new(gallery)), &cfg).unwrap();
        let t = synthetic::trial(0, &x);
        g.bench_function(format!("lowrank_r512_mirage_shapes_latent_{name}_gallery100_per_trial"), |b| {
            b.iter(|| black_box(stage.decode(&t).unwrap()))
        });
    }
    // The same heads from the 64×64×36 (3 mm) equivalent of nsdgeneral: 15,724 × (1.8/3)³.
    let (decoder, _) = random_decoder(&MIRAGE_HEADS, Some(512), SMALL_VOXELS);
    let xs = betas(SMALL_VOXELS);
    g.bench_function("lowrank_r512_mirage_shapes_per_trial_3400_voxels", |b| {
        b.iter(|| black_box(decoder.predict(&xs, 1).unwrap()))
    });
    drop(decoder);

    // What the low-rank path costs without the big up-projections: the image head alone.
    let (small, _) = random_decoder(&MIRAGE_HEADS[..1], Some(512), VOXELS);
    g.bench_function("lowrank_r512_image_head_per_trial", |b| {
        b.iter(|| black_box(small.predict(&x, 1).unwrap()))
    });
    let (small, _) = random_decoder(&MIRAGE_HEADS[..1], None, VOXELS);
    g.bench_function("full_image_head_per_trial", |b| b.iter(|| black_box(small.predict(&x, 1).unwrap())));
    drop(small);

    if std::env::var("MIRAGE_BENCH_FULL").is_ok_and(|v| v == "1") {
        g.sample_size(10).measurement_time(Duration::from_secs(20));
        let full: [(&str, &[usize]); 3] =
            [("text", &[77, 1280]), ("lowlevel", &[91_168]), ("retrieval", &[64, 1024])];
        for (name, shape) in full {
            let (d, weights) = random_decoder(&[(name, shape)], None, VOXELS);
            eprintln!(
                "full {name} {shape:?}: {:.2} GB f32 weights, process peak {:.0} MB",
                weights as f64 * 4e-9,
                peak_mb()
            );
            g.bench_function(format!("full_{name}_{}_per_trial", shape.iter().product::<usize>()), |b| {
                b.iter(|| black_box(d.predict(&x, 1).unwrap()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
