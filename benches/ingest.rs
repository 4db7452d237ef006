//! Per-volume costs of the spine at two grid sizes (64×64×36 and the NSD 81×104×83 grid):
//! wire decode (pyneal C-order float32 and int16), publish encoding, a queue hop, and a
//! recorder append — each next to a plain `memcpy` of the same bytes as the in-process baseline.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mirage_rt::frame::{latency_keys, Frame, IngestFlags, Stamps};
use mirage_rt::ingest::wire::{decode_volume, encode_volume, parse_header, Dialect};
use mirage_rt::io::session::SessionWriter;
use mirage_rt::publish::volume_message;
use mirage_rt::queue::{edge, Recv, WhenFull};
use mirage_rt::volume::Volume;

const GRIDS: [[usize; 3]; 2] = [[64, 64, 36], [81, 104, 83]];

fn volume(dims: [usize; 3]) -> Volume {
    let n = dims.iter().product::<usize>();
    Volume {
        data: (0..n).map(|i| (i % 1000) as f32 + 0.5).collect(),
        dims,
        affine: [
            [3.0, 0.0, 0.0, -90.0],
            [0.0, 3.0, 0.0, -100.0],
            [0.0, 0.0, 3.0, -50.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        index: 1,
        run: "bench".into(),
        tr: Some(1.0),
        acq_time: None,
        recv_time: 0.0,
        dtype: mirage_rt::volume::Dtype::F32,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("spine");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for dims in GRIDS {
        let label = format!("{}x{}x{}", dims[0], dims[1], dims[2]);
        let v = volume(dims);
        let (header, payload) = encode_volume(&v, Dialect::Pyneal);
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_with_input(BenchmarkId::new("baseline_memcpy", &label), &payload, |b, p| {
            b.iter(|| black_box(p.clone()))
        });
        g.bench_with_input(BenchmarkId::new("decode_pyneal_f32_c_order", &label), &payload, |b, p| {
            b.iter(|| {
                let h = parse_header(header.as_bytes(), 1 << 24).unwrap();
                black_box(decode_volume(&h, p, 0.0, "run").unwrap())
            })
        });
        let int16_header = header.replace("\"float32\"", "\"int16\"");
        let int16: Vec<u8> = v.data.iter().flat_map(|x| (*x as i16).to_le_bytes()).collect();
        g.bench_with_input(BenchmarkId::new("decode_pyneal_i16_c_order", &label), &int16, |b, p| {
            b.iter(|| {
                let h = parse_header(int16_header.as_bytes(), 1 << 24).unwrap();
                black_box(decode_volume(&h, p, 0.0, "run").unwrap())
            })
        });
        // The standard path's latency keys: three stages between ingest and publish.
        let keys = latency_keys(["motion", "glm", "decode"]);
        let frame = Frame::new(0, std::sync::Arc::new(v.clone()), IngestFlags::default(), Stamps::new(3));
        g.bench_with_input(BenchmarkId::new("encode_volume_message", &label), &frame, |b, f| {
            b.iter(|| black_box(volume_message(f, &keys).into_frames()))
        });
        let (mut tx, mut rx) = edge::<Frame>("bench", 4, usize::MAX, WhenFull::Block);
        g.bench_with_input(BenchmarkId::new("queue_hop", &label), &frame, |b, f| {
            b.iter(|| {
                tx.push(f.clone()).unwrap();
                match rx.recv_timeout(Duration::ZERO) {
                    Recv::Msg(m) => black_box(m),
                    _ => unreachable!(),
                }
            })
        });
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SessionWriter::create(&dir.path().join("s"), &serde_json::json!({})).unwrap();
        let mut seq = 0;
        g.bench_with_input(BenchmarkId::new("record_append_os_sync", &label), &v, |b, v| {
            b.iter(|| {
                writer.append(seq, v, serde_json::Value::Null, &[]).unwrap();
                seq += 1;
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
