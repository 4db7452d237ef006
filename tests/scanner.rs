//! The scanner side: every vendor's real export files read like the outside references
//! (dcm2niix for DICOM, nibabel for Philips PAR/REC), Siemens XA enhanced DICOM made from the
//! mosaic's geometry, and `mirage scanner` following a folder that files arrive in — out of
//! order, half-written, corrupt — into a real daemon.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, mirage, pyneal_daemon_args, python, run, run_with_timeout, shared_data, Daemon};
use mirage_rt::io::nifti::read_nifti;
use mirage_rt::io::session::SessionReader;
use serde_json::Value;

fn formats(rel: &str) -> PathBuf {
    shared_data(&format!("pyneal-scanner-formats/{rel}"))
}

fn convert(dir: &Path, vendor: &str, out: &Path) -> String {
    run(mirage().arg("convert").arg(dir).args(["--vendor", vendor, "--out"]).arg(out))
}

/// `scanner_reference.py compare`: value and world-coordinate differences after both are
/// reoriented to canonical.
fn compare(ours: &Path, reference: &Path, volume: Option<usize>) -> Value {
    let mut cmd = python("scanner_reference.py");
    cmd.arg("compare").arg(ours).arg(reference);
    if let Some(v) = volume {
        cmd.args(["--volume", &v.to_string()]);
    }
    let out = run(&mut cmd);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// dcm2niix's conversion of `dir` (one series) into `out/ref.nii`.
fn dcm2niix(dir: &Path, out: &Path) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    let (status, log) = run_with_timeout(
        Command::new("dcm2niix").args(["-z", "n", "-f", "ref", "-o"]).arg(out).arg(dir),
        Duration::from_secs(60),
    );
    assert!(status.success(), "dcm2niix (Debian package dcm2niix) failed:\n{log}");
    out.join("ref.nii")
}

fn assert_same(c: &Value, value_tol: f64, what: &str) {
    assert_eq!(c["ours_shape"], c["ref_shape"], "{what}: {c}");
    assert!(c["max_value_diff"].as_f64().unwrap() <= value_tol, "{what}: {c}");
    assert!(c["max_mm"].as_f64().unwrap() < 0.01, "{what}: voxel centres differ: {c}");
}

#[test]
fn every_vendor_reads_like_the_outside_references() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (vendor, rel, mask, voxel) in [
        ("siemens", "Siemens_env/funcData", "Siemens_env/dummyMask.nii.gz", [3.0, 3.0, 3.8]),
        ("ge", "GE_env/funcData/s1925", "GE_env/dummyMask.nii.gz", [3.0, 3.0, 3.8]),
        ("philips", "Philips_env/funcData/0001", "Philips_env/dummyMask.nii.gz", [3.0, 3.0, 4.0]),
    ] {
        let ours = d.join(format!("{vendor}.nii.gz"));
        convert(&formats(rel), vendor, &ours);
        let img = read_nifti(&ours, 1 << 26).unwrap();
        assert_eq!(img.dims, read_nifti(formats(mask), 1 << 26).unwrap().dims, "{vendor}: the mask's grid");
        assert_eq!(img.volumes.len(), if vendor == "philips" { 4 } else { 3 }, "{vendor}");
        let size = mirage_rt::volume::voxel_size(&img.affine);
        assert!(size.iter().zip(voxel).all(|(a, b)| (a - b).abs() < 1e-3), "{vendor}: {size:?}");
        if vendor == "philips" {
            // dcm2niix (1.0.20220720) refuses these real-time PAR files (image type 17 beside the
            // magnitude); nibabel's PARRECImage reads them. Display values, float32 rounding.
            for k in 0..3 {
                let par = formats(&format!("{rel}/Dump-000{k}.par"));
                let c = compare(&ours, &par, Some(k));
                assert_same(&c, 1e-6 * c["max_value"].as_f64().unwrap(), &format!("philips volume {k}"));
            }
        } else {
            let reference = dcm2niix(&formats(rel), &d.join(format!("{vendor}-dcm2niix")));
            assert_same(&compare(&ours, &reference, None), 0.0, vendor);
        }
    }

    // Siemens XA enhanced DICOM (one multi-frame file per volume), placed by dcm2niix's
    // reading of the mosaic: the enhanced reader gives the mosaic's volumes, and dcm2niix
    // reads the enhanced files the same.
    let mosaic_ref = dcm2niix(&formats("Siemens_env/funcData"), &d.join("mosaic-ref"));
    let xa = d.join("xa");
    run(python("scanner_reference.py").arg("enhanced").arg(&mosaic_ref).arg(&xa));
    let ours_xa = d.join("xa.nii.gz");
    convert(&xa, "siemens", &ours_xa);
    assert_same(&compare(&ours_xa, &d.join("siemens.nii.gz"), None), 0.0, "XA against the mosaic");
    for k in 0..3 {
        let one = d.join(format!("xa-{k}"));
        std::fs::create_dir_all(&one).unwrap();
        let name = format!("xa_{:05}.dcm", k + 1);
        std::fs::copy(xa.join(&name), one.join(&name)).unwrap();
        let reference = dcm2niix(&one, &d.join(format!("xa-{k}-dcm2niix")));
        assert_same(&compare(&ours_xa, &reference, Some(k)), 0.0, &format!("XA volume {k} against dcm2niix"));
    }

    // A foreign file and a corrupt DICOM are skipped with a reason; the rest converts.
    let mixed = d.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["001_000013_000001.dcm", "001_000013_000002.dcm"] {
        std::fs::copy(formats(&format!("Siemens_env/funcData/{f}")), mixed.join(f)).unwrap();
    }
    std::fs::write(mixed.join("notes.dcm"), "not an image\n".repeat(20)).unwrap();
    let mut corrupt = std::fs::read(formats("Siemens_env/funcData/001_000013_000003.dcm")).unwrap();
    corrupt.truncate(4000);
    corrupt.extend([0xFFu8; 64]);
    std::fs::write(mixed.join("corrupt.dcm"), corrupt).unwrap();
    let out = convert(&mixed, "siemens", &d.join("mixed.nii.gz"));
    assert!(
        out.contains("skipped") && out.contains("notes.dcm") && out.contains("not a DICOM file"),
        "{out}"
    );
    assert!(out.contains("corrupt.dcm"), "{out}");
    assert_eq!(read_nifti(d.join("mixed.nii.gz"), 1 << 26).unwrap().volumes.len(), 2);
}

/// Copies `src` into `dst` the way a scanner's export does, in two writes `pause` apart.
fn write_in_two_halves(src: &Path, dst: &Path, pause: Duration) {
    let bytes = std::fs::read(src).unwrap();
    let mut f = std::fs::File::create(dst).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    f.flush().unwrap();
    drop(f);
    std::thread::sleep(pause);
    let mut f = std::fs::OpenOptions::new().append(true).open(dst).unwrap();
    f.write_all(&bytes[bytes.len() / 2..]).unwrap();
}

#[test]
fn the_watcher_sends_every_volume_once_in_order_as_files_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (watched, session) = (d.join("export"), d.join("session"));
    std::fs::create_dir_all(&watched).unwrap();
    let port = free_port();
    let daemon_args = pyneal_daemon_args(port, "none", &session, &["--set", "motion.enabled=false"]);
    let daemon = Daemon::start(&common::as_strs(&daemon_args), d);
    let files: Vec<PathBuf> =
        (1..=3).map(|i| formats(&format!("Siemens_env/funcData/001_000013_00000{i}.dcm"))).collect();
    let name = |i: usize| files[i].file_name().unwrap().to_owned();

    // The run has begun before the watcher starts: volume 0 is already there.
    std::fs::copy(&files[0], watched.join(name(0))).unwrap();
    let log = d.join("scanner.log");
    let mut scanner = mirage()
        .arg("scanner")
        .arg("--watch")
        .arg(&watched)
        .args(["--vendor", "siemens", "--to", &format!("pyneal://127.0.0.1:{port}"), "--stop-after", "3"])
        .args(["--give-up", "1", "--reorder", "5", "--tr", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let tr = Duration::from_millis(700);
    std::thread::sleep(tr);
    // A foreign file and a DICOM that is cut short for good, then volume 2 before volume 1,
    // and volume 1 written in two halves.
    std::fs::write(watched.join("readme.dcm"), "exported by hand\n".repeat(20)).unwrap();
    let cut = std::fs::read(&files[1]).unwrap();
    std::fs::write(watched.join("cut_short.dcm"), &cut[..cut.len() / 3]).unwrap();
    std::thread::sleep(tr);
    // Volume 0 again under another name (a re-export): dropped, not sent twice.
    std::fs::copy(&files[0], watched.join("again.dcm")).unwrap();
    std::fs::copy(&files[2], watched.join(name(2))).unwrap();
    std::thread::sleep(tr);
    write_in_two_halves(&files[1], &watched.join(name(1)), Duration::from_millis(400));

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = scanner.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "scanner did not finish:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let scanner_log = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{scanner_log}");
    assert!(scanner_log.contains("sent 3 volumes"), "{scanner_log}");
    assert!(scanner_log.contains("readme.dcm") && scanner_log.contains("not a DICOM file"), "{scanner_log}");
    assert!(scanner_log.contains("cut_short.dcm"), "{scanner_log}");
    assert!(scanner_log.contains("1 volume(s) already sent came again"), "{scanner_log}");
    daemon.terminate();
    let (status, daemon_log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{daemon_log}");

    // Every volume once, in order, equal to the offline reading of the same files.
    let rec = SessionReader::open(&session).unwrap();
    let indices: Vec<u64> = rec.entries.iter().map(|e| e.index).collect();
    assert_eq!(indices, [0, 1, 2], "{daemon_log}");
    let offline = d.join("offline.nii.gz");
    convert(&formats("Siemens_env/funcData"), "siemens", &offline);
    let offline = read_nifti(&offline, 1 << 26).unwrap();
    for (i, expected) in offline.volumes.iter().enumerate() {
        let v = rec.volume(i).unwrap();
        assert_eq!(v.dims, offline.dims);
        assert_eq!(&v.data, expected, "volume {i}");
        let worst =
            v.affine.iter().flatten().zip(offline.affine.iter().flatten()).map(|(a, b)| (a - b).abs());
        assert!(worst.fold(0.0, f64::max) < 1e-4, "{:?} vs {:?}", v.affine, offline.affine);
        assert_eq!(v.tr, Some(1.0));
    }
}

#[test]
fn every_mr_dicom_the_python_wheels_ship_reads_like_dcm2niix_or_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = run(python("scanner_reference.py").arg("wheel-series").arg(d.join("series")));
    let series: Vec<Value> =
        serde_json::from_str(out.lines().find(|l| l.starts_with('[')).expect(&out)).unwrap();
    let mut converted = Vec::new();
    for s in &series {
        let name = s["name"].as_str().unwrap();
        let folder = d.join("series").join(name);
        let ours = d.join(format!("{name}.nii.gz"));
        let (status, log) = run_with_timeout(
            mirage().arg("convert").arg(&folder).args(["--vendor", "auto", "--out"]).arg(&ours),
            Duration::from_secs(60),
        );
        assert!(!log.contains("panicked"), "{name}: {log}");
        if !status.success() {
            // Refused: one line naming the file and why (compressed, a lone 2-D slice, no pixels).
            assert_eq!(status.code(), Some(2), "{name}: {log}");
            assert!(log.contains("skipped") && log.contains(name), "{name}: {log}");
            continue;
        }
        let reference = dcm2niix(&folder, &d.join(format!("{name}-dcm2niix")));
        match s["padded_grid"].as_u64() {
            None => assert_same(&compare(&ours, &reference, Some(0)), 0.0, name),
            Some(m) => {
                // A padded mosaic (256×256 in 7×7 tiles): tiles of floor(256/7) = 36. dcm2niix
                // steps between tile rows by floor(256·256/7) bytes instead of 256·36, so only
                // its first tile row equals ours; and it moves the corner by half of 256 − 256/7
                // instead of 256 − 36: 2/7 of a pixel.
                let mut cmd = python("scanner_reference.py");
                cmd.arg("compare").arg(&ours).arg(&reference).args([
                    "--volume",
                    "0",
                    "--slices",
                    &format!("0:{m}"),
                ]);
                let c: Value = serde_json::from_str(run(&mut cmd).lines().last().unwrap()).unwrap();
                assert_eq!(c["ours_shape"], c["ref_shape"], "{name}: {c}");
                assert_eq!(c["max_value_diff"], 0.0, "{name}: {c}");
                let pixel = c["voxel_mm"][0].as_f64().unwrap();
                assert!(c["max_mm"].as_f64().unwrap() <= 0.3 * pixel, "{name}: {c}");
            }
        }
        converted.push(name.to_string());
    }
    for expected in ["0.dcm", "1.dcm", "siemens_dwi_0.dcm", "siemens_dwi_1000.dcm", "philips_mprage.dcm"] {
        assert!(converted.iter().any(|c| c == expected), "{expected} not converted: {converted:?}");
    }
}
