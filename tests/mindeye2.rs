//! MindEye2 checkpoints: `tools/export_mindeye2.py` turns one into a model folder and `mirage
//! decode` runs it; every output (the CLIP tokens, the blurry latent and the SD VAE's picture)
//! equals PyTorch's (Debian's `python3-torch`, diffusers 0.23) on a checkpoint made from the
//! published layer list, batch 1 and batch 3; and live, in the daemon, with a picture per
//! trial following its decode.

use crate::common;

use std::time::Duration;

use common::{
    as_strs, close, decode_cmd, decode_daemon_args, npy, run, run_with_timeout, simulated_session,
    torch_python, Daemon,
};
use mirage_rt::io::session::{read_messages, read_payload, LoggedMessage};

#[test]
fn an_exported_mindeye2_checkpoint_decodes_as_pytorch_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(torch_python("tests/python/mindeye2_fixture.py").arg(d));
    let model = d.join("model");
    // Subject 1's ridge (subject 0's reads another number of voxels).
    let out = run(torch_python("tools/export_mindeye2.py")
        .arg(d.join("last.pth"))
        .arg(&model)
        .args(["--subject", "1", "--vae"])
        .arg(d.join("vae")));
    assert!(out.contains("\"clip_tokens\": 4") && out.contains("\"n_voxels\": 200"), "{out}");
    assert!(
        out.contains("\"block_out_channels\": [32, 64, 128]") && out.contains("\"vae\": \"vae\""),
        "{out}"
    );

    let (shape, betas) = npy(&d.join("betas.npy"));
    mirage_rt::io::npy::write_npy(d.join("betas_1.npy"), &[1, shape[1]], &betas[..shape[1]]).unwrap();
    for (input, suffix) in [("betas.npy", ""), ("betas_1.npy", "_1")] {
        let pred = d.join(format!("pred{suffix}"));
        run(&mut decode_cmd(&model, &d.join(input), &pred));
        for name in ["backbone", "clip_voxels", "blurry_latent", "blurry_image"] {
            let (ours_shape, ours) = npy(&pred.join(format!("{name}.npy")));
            let (want_shape, want) = npy(&d.join(format!("{name}{suffix}.npy")));
            assert_eq!(ours_shape, want_shape, "{name}{suffix}");
            close(&ours, &want, 1e-4, &format!("{name}{suffix}"));
        }
        // One PNG per trial: the picture mapped to [0, 1] as diffusers does (x / 2 + 0.5).
        let (want_shape, want) = npy(&d.join(format!("blurry_image{suffix}.npy")));
        for i in 0..want_shape[0] {
            let bytes = std::fs::read(pred.join(format!("blurry_{i:03}.png"))).unwrap();
            let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!((info.width as usize, info.height as usize), (want_shape[3], want_shape[2]));
            let plane = want_shape[2] * want_shape[3];
            let picture = &want[i * 3 * plane..(i + 1) * 3 * plane];
            for (p, px) in buf.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    let expect = ((picture[c * plane + p] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round();
                    assert!((px[c] as f32 - expect).abs() <= 1.0, "trial {i} pixel {p}");
                }
            }
        }
    }

    // The wrong subject's ridge, a missing one, betas of another size and a VAE of another
    // latent width are clear errors.
    let (status, out) = run_with_timeout(
        &mut decode_cmd(&model, &d.join("backbone.npy"), &d.join("x")),
        Duration::from_secs(60),
    );
    assert!(!status.success() && out.contains("betas must be 2-D"), "{out}");
    let (status, out) = run_with_timeout(
        torch_python("tools/export_mindeye2.py")
            .arg(d.join("last.pth"))
            .arg(d.join("m2"))
            .args(["--subject", "7"]),
        Duration::from_secs(120),
    );
    assert!(!status.success() && out.contains("no ridge.linears.7.weight"), "{out}");
    let (status, out) = run_with_timeout(
        torch_python("tools/export_mindeye2.py")
            .arg(d.join("last.pth"))
            .arg(d.join("m0"))
            .args(["--subject", "0"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{out}");
    let (status, out) = run_with_timeout(
        &mut decode_cmd(&d.join("m0"), &d.join("betas.npy"), &d.join("x")),
        Duration::from_secs(60),
    );
    assert!(!status.success() && out.contains("200 voxels, the model takes 237"), "{out}");
    let config = std::fs::read_to_string(model.join("vae/config.json")).unwrap();
    std::fs::write(
        model.join("vae/config.json"),
        config.replace("\"latent_channels\": 4", "\"latent_channels\": 8"),
    )
    .unwrap();
    let (status, out) = run_with_timeout(
        &mut decode_cmd(&model, &d.join("betas.npy"), &d.join("x")),
        Duration::from_secs(60),
    );
    assert!(!status.success() && out.contains("post_quant_conv"), "{out}");
}

/// The float32 payload `name` of a logged message.
fn payload(session: &std::path::Path, m: &LoggedMessage, name: &str) -> Vec<u8> {
    read_payload(session, m, name).unwrap().unwrap_or_else(|| panic!("{} has no {name}", m.topic))
}

/// An 8-bit RGB PNG's pixels and size.
fn rgb(png_bytes: &[u8]) -> (Vec<u8>, usize, usize) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png_bytes.to_vec())).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    (buf, info.width as usize, info.height as usize)
}

#[test]
fn a_mindeye2_model_decodes_live_and_each_picture_follows_its_decode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The simulator's mask (seed 7) sets the model's voxels.
    let (train_run, train_glm) = simulated_session(d, 7, "train", "seen", 1, 120);
    let (shape, _) = npy(&train_glm.join("trial_betas.npy"));
    let voxels = shape[1].to_string();
    run(torch_python("tests/python/mindeye2_fixture.py").arg(d).args(["--voxels", &voxels]));
    let model = d.join("model");
    run(torch_python("tools/export_mindeye2.py")
        .arg(d.join("last.pth"))
        .arg(&model)
        .args(["--subject", "1", "--vae"])
        .arg(d.join("vae")));
    // The simulator's gallery with CLIP-token embeddings ([N, T·D], random) to rank against.
    let mut gallery = mirage_rt::decode::gallery::Gallery::load(&train_run.join("truth/gallery")).unwrap();
    let n = gallery.items.len();
    let mut rng = mirage_rt::rng::Rng::new(5, 0);
    let embeddings: Vec<f32> = (0..n * 4 * 24).map(|_| rng.normal() as f32).collect();
    gallery.embeddings = [("clip_voxels".to_string(), (4 * 24, embeddings.clone()))].into_iter().collect();
    gallery.write(&d.join("gallery")).unwrap();

    let session = d.join("s");
    let extra = ["--set", "decode.alignment=\"none\"", "--set", "decode.top_k=3"];
    let args = decode_daemon_args(
        "seed=7&run_seed=9&volumes=80&shape=32,32,20&condition=seen&motion_mm=0&motion_deg=0&speed=max",
        &session,
        "sim",
        &model,
        Some(&d.join("gallery")),
        &extra,
    );
    let (status, log) = Daemon::start(&as_strs(&args), d).wait(Duration::from_secs(180));
    assert!(status.success(), "{log}");

    // A gallery without CLIP-token embeddings cannot rank a MindEye2 decode: a setup error.
    let args = decode_daemon_args(
        "seed=7&volumes=20&shape=32,32,20&speed=max",
        &d.join("s2"),
        "sim",
        &model,
        Some(&train_run.join("truth/gallery")),
        &extra,
    );
    let (status, out) = Daemon::start(&as_strs(&args), d).wait(Duration::from_secs(60));
    assert!(!status.success() && out.contains("no clip_voxels embeddings"), "{out}");

    let messages = read_messages(&session).unwrap();
    let live = |topic: &str| -> Vec<(usize, &LoggedMessage)> {
        messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.topic == topic && m.header["at_run_end"] == false)
            .collect()
    };
    let (decodes, pictures) = (live("decode"), live("picture"));
    assert!(decodes.len() >= 5, "{} live decodes\n{log}", decodes.len());
    let dropped: usize = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("picture_dropped="))
        .map_or(0, |n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().unwrap());
    assert_eq!(pictures.len() + dropped, decodes.len(), "a picture per decoded trial or a count\n{log}");
    assert!(!pictures.is_empty(), "{log}");
    eprintln!("{} live decodes, {} pictures, {dropped} dropped", decodes.len(), pictures.len());

    // The end-of-run report, in headless Chromium: the pictures joined their trials' cards.
    let report = format!("file://{}", session.join("report.html").display());
    let (status, out) = run_with_timeout(
        common::python("console_check.py").arg(&report).arg("--report"),
        Duration::from_secs(200),
    );
    assert!(status.success(), "console check (scripts/setup.sh --tests installs chromium):\n{out}");
    let seen: serde_json::Value =
        serde_json::from_str(out.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert!(seen["after"]["recons_loaded"].as_u64() >= Some(1), "{seen}");

    // Each live trial's betas as published, through PyTorch.
    let trial_of = |m: &LoggedMessage| (m.header["run"].clone(), m.header["trial"].clone());
    let mut betas = Vec::new();
    for (_, dm) in &decodes {
        let (_, b) = live("betas").into_iter().find(|(_, b)| trial_of(b) == trial_of(dm)).expect("its betas");
        betas.extend(mirage_rt::volume::f32_from_le_bytes(&payload(&session, b, "betas")));
    }
    let k = decodes.len();
    mirage_rt::io::npy::write_npy(d.join("live_betas.npy"), &[k, betas.len() / k], &betas).unwrap();
    run(torch_python("tests/python/mindeye2_fixture.py")
        .arg(d)
        .arg("--reference")
        .arg(d.join("live_betas.npy"))
        .arg(d.join("ref")));
    for name in ["backbone", "clip_voxels", "blurry_latent"] {
        let (_, want) = npy(&d.join(format!("ref/{name}.npy")));
        let ours: Vec<f32> = decodes
            .iter()
            .flat_map(|(_, m)| mirage_rt::volume::f32_from_le_bytes(&payload(&session, m, name)))
            .collect();
        close(&ours, &want, 1e-4, name);
    }
    let (_, clip) = npy(&d.join("ref/clip_voxels.npy"));
    let (image_shape, image) = npy(&d.join("ref/blurry_image.npy"));
    let plane = image_shape[2] * image_shape[3];
    for (i, (at, dm)) in decodes.iter().enumerate() {
        // Top 3 as the cosine over flattened tokens ranks the gallery.
        let c = &clip[i * 96..(i + 1) * 96];
        let cosine = |e: &[f32]| {
            let dot: f32 = c.iter().zip(e).map(|(a, b)| a * b).sum();
            dot / (c.iter().map(|a| a * a).sum::<f32>().sqrt() * e.iter().map(|b| b * b).sum::<f32>().sqrt())
        };
        let mut order: Vec<(f32, usize)> = embeddings.chunks_exact(96).map(cosine).zip(0..).collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        let want: Vec<&str> = order[..3].iter().map(|(_, j)| gallery.items[*j].id.as_str()).collect();
        let got: Vec<&str> =
            dm.header["top"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
        assert_eq!(got, want, "trial {}", dm.header["trial"]);
        // Its picture, if made, comes after its decode and is PyTorch's picture.
        let Some((pt, pm)) = pictures.iter().find(|(_, p)| trial_of(p) == trial_of(dm)) else { continue };
        assert!(pt > at, "the picture of trial {} came before its decode", dm.header["trial"]);
        assert!(pm.header["latency_ms"].as_f64().unwrap() > 0.0);
        let (pixels, w, h) = rgb(&payload(&session, pm, "picture_png"));
        assert_eq!((w, h), (image_shape[3], image_shape[2]));
        let picture = &image[i * 3 * plane..(i + 1) * 3 * plane];
        for (p, px) in pixels.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                let expect = ((picture[ch * plane + p] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round();
                assert!((f32::from(px[ch]) - expect).abs() <= 1.0, "trial {i} pixel {p}");
            }
        }
    }
}
