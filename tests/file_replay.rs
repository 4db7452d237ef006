//! NIfTI reading and file:// replay checked against nibabel on real data (LAS int16, RAS
//! uint16, anisotropic voxels).

use crate::common;

use std::time::Duration;

use common::{free_port, python, run_with_timeout, shared_data, Daemon, Subscriber};
use mirage_rt::io::nifti::read_nifti;
use mirage_rt::topic::{self, VolumeHeader};

/// What nibabel reads from `file`: (shape [x,y,z,t], affine, orientation, data x-fastest).
fn nibabel(file: &std::path::Path) -> (Vec<usize>, [[f64; 4]; 4], String, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("nib");
    let (status, out) =
        run_with_timeout(python("nibabel_dump.py").arg(file).arg(&prefix), Duration::from_secs(60));
    assert!(status.success(), "{out}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap()).unwrap();
    let bytes = std::fs::read(prefix.with_extension("f32")).unwrap();
    let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let shape = meta["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let affine: [[f64; 4]; 4] = serde_json::from_value(meta["affine"].clone()).unwrap();
    (shape, affine, meta["orientation"].as_str().unwrap().to_string(), data)
}

fn close(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> bool {
    a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[test]
fn reader_equals_nibabel_on_every_shared_file() {
    for (rel, orientation) in [
        ("nibabel-example4d/example4d.nii.gz", "LAS"),
        ("fslpy-example-func/example_func.nii.gz", "LAS"),
        ("pyneal-testseries/testSeries.nii.gz", "RAS"),
        ("pyneal-testseries/testSeries_mask.nii.gz", "RAS"),
    ] {
        let path = shared_data(rel);
        let (shape, affine, orient, data) = nibabel(&path);
        assert_eq!(orient, orientation, "{rel}");
        let img = read_nifti(&path, 1 << 24).unwrap();
        assert_eq!(img.dims.to_vec(), shape[..3].to_vec(), "{rel}");
        assert_eq!(img.volumes.len(), shape[3], "{rel}");
        assert!(close(&img.affine, &affine), "{rel}: {:?} vs {affine:?}", img.affine);
        assert_eq!(img.volumes.concat(), data, "{rel}");
    }
}

#[test]
fn replay_of_las_int16_series_publishes_nibabel_values_and_affine() {
    let dir = tempfile::tempdir().unwrap();
    let path = shared_data("nibabel-example4d/example4d.nii.gz");
    let (shape, affine, _, data) = nibabel(&path);
    let sp = free_port();
    let sub = Subscriber::connect(sp, "volume");
    let daemon = Daemon::start(
        &[
            "--ingest",
            &format!("file://{}?speed=max&delay=1", path.display()),
            "--publish",
            &format!("tcp://127.0.0.1:{sp}"),
            "--record",
            "none",
            "--no-lsl",
            "--quiet",
            // Transport checks: volumes must come out exactly as sent.
            "--set",
            "motion.enabled=false",
            "--set",
            "glm.enabled=false",
        ],
        dir.path(),
    );
    let msgs = sub.collect(2, Duration::from_secs(30));
    assert_eq!(msgs.len(), 2, "{}", daemon.log());
    let n = shape[0] * shape[1] * shape[2];
    for (t, m) in msgs.iter().enumerate() {
        let h: VolumeHeader = topic::read(&m.topic, &m.header).unwrap();
        assert_eq!(h.index, t as u64);
        assert_eq!(h.shape[..], shape[..3]);
        assert!(close(&h.affine, &affine));
        assert_eq!(m.f32_payload("data").unwrap(), data[t * n..(t + 1) * n].to_vec(), "volume {t}");
        // The header's TR of 2000 "s" is implausible and read as 2 s.
        assert_eq!(h.tr, Some(2.0));
    }
    let (status, log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(log.contains("implausible"), "{log}");
}

#[test]
fn files_we_write_read_identically_in_nibabel() {
    use mirage_rt::io::nifti::NiftiWriter;
    use mirage_rt::volume::Dtype;
    let dir = tempfile::tempdir().unwrap();
    // LAS, anisotropic, rotated 10 degrees about z.
    let (s, c) = 10f64.to_radians().sin_cos();
    let affine = [
        [-2.0 * c, -2.5 * s, 0.0, 40.0],
        [-2.0 * s, 2.5 * c, 0.0, -50.0],
        [0.0, 0.0, 3.0, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let dims = [5, 4, 3];
    let vols: Vec<Vec<f32>> = (0..2).map(|t| (0..60).map(|i| (i * 7 + t * 100) as f32).collect()).collect();
    for dtype in [Dtype::F32, Dtype::I16, Dtype::U16, Dtype::F64] {
        let p = dir.path().join(format!("w-{dtype}.nii.gz"));
        let mut w = NiftiWriter::create_as(&p, dims, 2, &affine, Some(1.5), dtype).unwrap();
        for v in &vols {
            w.write_volume(v).unwrap();
        }
        w.finish().unwrap();
        let (shape, nib_affine, orientation, data) = nibabel(&p);
        assert_eq!(shape, vec![5, 4, 3, 2], "{dtype}");
        assert_eq!(orientation, "LAS", "{dtype}");
        assert!(close(&nib_affine, &affine), "{dtype}: {nib_affine:?}");
        assert_eq!(data, vols.concat(), "{dtype}");
    }
}
