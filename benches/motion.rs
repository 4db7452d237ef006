//! One realignment (registration from the identity + reslice) of a real EPI anatomy (FSL's
//! example_func) moved by ~3 mm / 3°, at 64×64×36 @ 3 mm, 81×104×83 @ 1.8 mm (NSD's grid) and
//! 96×114×96 @ 2 mm, beside the reslice alone as the in-process baseline. Needs `../shared/data` (or `$MIRAGE_SHARED_DATA`).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mirage_rt::motion::register::{Optimiser, Reference};
use mirage_rt::motion::reslice;
use mirage_rt::motion::rigid::RigidParams;
use mirage_rt::sim::{SimConfig, Simulator};
use mirage_rt::volume::IDENTITY_AFFINE;

fn anatomy() -> PathBuf {
    std::env::var_os("MIRAGE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")))
        .join("fslpy-example-func/example_func.nii.gz")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("motion");
    g.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for (shape, voxel) in [("64,64,36", "3,3,3"), ("81,104,83", "1.8,1.8,1.8"), ("96,114,96", "2,2,2")] {
        let mut cfg = SimConfig::default();
        let anat = anatomy();
        for (k, v) in [
            ("anatomy", anat.to_str().unwrap()),
            ("shape", shape),
            ("voxel_mm", voxel),
            ("volumes", "2"),
            ("signal_pct", "0"),
            ("noise_pct", "2"),
            ("ar1", "0"),
            ("drift_pct", "0"),
            ("motion_mm", "0"),
            ("motion_deg", "0"),
        ] {
            cfg.set(k, v).unwrap();
        }
        let mut sim = Simulator::new(&cfg).unwrap();
        let reference = sim.next_volume().unwrap();
        let opt = Optimiser::default();
        let prepared = Reference::prepare(&reference.data, reference.dims, &reference.affine, &opt).unwrap();
        // A moved copy: the head turned 3° / 2° / 1.5° and shifted (2, -1.5, 3) mm.
        let mut moved_cfg = cfg.clone();
        moved_cfg.set("motion_kind", "random").unwrap();
        moved_cfg.set("motion_mm", "3").unwrap();
        moved_cfg.set("motion_deg", "3").unwrap();
        let mut moved_sim = Simulator::new(&moved_cfg).unwrap();
        moved_sim.next_volume();
        let moved = moved_sim.next_volume().unwrap();
        let label = shape.replace(',', "x");
        g.bench_with_input(BenchmarkId::new("reslice_only_baseline", &label), &moved, |b, v| {
            let m = RigidParams { trans: [2.0, -1.5, 3.0], rot: [0.05, 0.035, 0.026] }.matrix();
            b.iter(|| black_box(reslice(v, &prepared, &m).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("register_and_reslice", &label), &moved, |b, v| {
            b.iter(|| {
                let fit = prepared.register(&v.data, v.dims, &v.affine, &IDENTITY_AFFINE, &opt).unwrap();
                black_box(reslice(v, &prepared, &fit.matrix).unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
