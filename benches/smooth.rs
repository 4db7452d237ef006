//! Spatial smoothing of one volume (Gaussian, FWHM 5 mm, OpenNFT's default; and 8 mm) at
//! 64×64×36 @ 3 mm and 81×104×83 @ 1.8 mm (NSD's grid), beside a copy of the volume as the
//! in-process baseline.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mirage_rt::sim::{SimConfig, Simulator};
use mirage_rt::smooth::GaussianSmoother;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("smooth");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for (shape, voxel) in [("64,64,36", "3,3,3"), ("81,104,83", "1.8,1.8,1.8")] {
        let mut cfg = SimConfig::default();
        for (k, v) in
            [("shape", shape), ("voxel_mm", voxel), ("volumes", "1"), ("motion_mm", "0"), ("motion_deg", "0")]
        {
            cfg.set(k, v).unwrap();
        }
        let v = Simulator::new(&cfg).unwrap().next_volume().unwrap();
        let label = shape.replace(',', "x");
        g.bench_with_input(BenchmarkId::new("baseline_copy", &label), &v, |b, v| {
            b.iter(|| black_box(v.data.clone()))
        });
        for fwhm in [5.0, 8.0] {
            let mut s = GaussianSmoother::new(fwhm);
            g.bench_with_input(BenchmarkId::new(format!("fwhm_{fwhm}mm"), &label), &v, |b, v| {
                b.iter(|| black_box(s.process(v)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
