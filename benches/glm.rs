//! GLM update cost × 30 regressors at every voxel of the two benchmark grids, 64×64×36
//! (147,456) and 81×104×83 (NSD's 1.8 mm grid, 699,192): one row into the statistics (dense
//! design row, the worst case), the whole stage per volume (masking, design, ROI-free), and
//! one trial's betas (what a closing window costs), beside copying the volume as the
//! in-process baseline.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use mirage_rt::glm::estimator::{Factor, OlsStats};
use mirage_rt::glm::events::{Event, Onset};
use mirage_rt::glm::{GlmConfig, GlmEstimator};
use mirage_rt::volume::{Volume, IDENTITY_AFFINE};

const GRIDS: [[usize; 3]; 2] = [[64, 64, 36], [81, 104, 83]];
const REGRESSORS: usize = 30;

fn row(t: usize) -> Vec<f64> {
    (0..REGRESSORS).map(|j| ((t * 31 + j * 7) % 97) as f64 / 97.0 + if j == 0 { 1.0 } else { 0.0 }).collect()
}

fn data(t: usize, voxels: usize) -> Vec<f32> {
    (0..voxels).map(|v| 1000.0 + ((v * 13 + t * 7) % 101) as f32 * 0.1).collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("glm");
    g.measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(2)).sample_size(40);

    for dims in GRIDS {
        let voxels: usize = dims.iter().product();
        let tag = format!("{}x{}x{}", dims[0], dims[1], dims[2]);
        let y = data(0, voxels);
        g.bench_function(format!("baseline_copy_{tag}"), |b| b.iter(|| black_box(y.clone())));

        let mut stats = OlsStats::new(voxels, 16);
        for j in 0..REGRESSORS {
            stats.set_column(j, &[]).unwrap();
        }
        for t in 0..64 {
            stats.push_row(row(t), data(t, voxels));
        }
        let mut t = 64;
        let pool: Vec<Vec<f32>> = (0..8).map(|t| data(t, voxels)).collect();
        g.bench_function(format!("push_row_{tag}_x30_dense"), |b| {
            b.iter(|| {
                stats.push_row(row(t), pool[t % 8].clone());
                t += 1;
            })
        });
        let factor = Factor::new(stats.xtx());
        let mut e = vec![0.0; REGRESSORS];
        e[REGRESSORS - 1] = 1.0;
        let w = factor.solve(&e);
        g.bench_function(format!("trial_betas_{tag}_x30"), |b| b.iter(|| black_box(stats.combine(&w))));

        // The stage: every voxel in the mask, intercept, 2 drift, 6 motion (absent here) and 27
        // trials over 300 volumes.
        let n = voxels;
        let cfg = GlmConfig { mask_threshold: 0.01, ..GlmConfig::default() };
        let mut glm = GlmEstimator::new(&cfg).unwrap();
        for k in 0..27 {
            glm.add_event(Event {
                trial: Some(k),
                stim: Some(k % 12),
                condition: "seen".into(),
                onset: Onset::Relative(4.0 + 10.0 * k as f64),
                duration: Some(4.0),
            });
        }
        let volume = |i: u64| Volume {
            data: (0..n).map(|v| 1000.0 + ((v * 13 + i as usize * 7) % 101) as f32 * 0.1).collect(),
            dims,
            affine: IDENTITY_AFFINE,
            index: i,
            run: "bench".into(),
            tr: Some(1.0),
            acq_time: None,
            recv_time: 0.0,
            dtype: mirage_rt::volume::Dtype::F32,
        };
        for i in 0..100 {
            glm.process(&volume(i), None, i == 0).unwrap();
        }
        let mut i = 100;
        let vols: Vec<Volume> = (0..8).map(|k| volume(100 + k)).collect();
        g.bench_function(format!("stage_per_volume_{tag}_x30"), |b| {
            b.iter(|| {
                let mut v = vols[(i % 8) as usize].clone();
                v.index = i;
                black_box(glm.process(&v, None, false).unwrap());
                i += 1;
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
