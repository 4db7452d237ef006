//! The decoder against outside references (sklearn's Ridge, skimage/NumPy metrics), on the
//! simulator (train on seen, decode held-out seen and imagery), live in the daemon, and with
//! broken inputs.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{
    as_strs, close, decode_cmd, decode_daemon_args, mirage, npy, published, python, run, run_with_timeout,
    simulated_session, train_model, train_model_with, Daemon,
};

#[test]
fn exported_sklearn_models_and_our_training_match_sklearn() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alpha = "50";
    run(python("sklearn_ref.py").arg(d).arg(alpha));
    // The exported sklearn models predict what sklearn predicts.
    run(decode_cmd(&d.join("exported"), &d.join("X_test.npy"), &d.join("pred_exported"))
        .args(["--renorm", "none"]));
    for head in ["a", "b"] {
        let (_, ours) = npy(&d.join(format!("pred_exported/{head}.npy")));
        let (_, theirs) = npy(&d.join(format!("sklearn/pred_{head}.npy")));
        close(&ours, &theirs, 1e-4, &format!("exported {head}"));
    }
    // mirage train on the same data: the same coefficients and intercepts, the same predictions.
    run(mirage()
        .args(["train", "--alpha", alpha, "--betas"])
        .arg(d.join("X.npy"))
        .arg("--targets")
        .arg(d.join("targets"))
        .arg("--out")
        .arg(d.join("ours")));
    let bytes = std::fs::read(d.join("ours/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensor = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    for head in ["a", "b"] {
        close(
            &tensor(&format!("heads.{head}.weight")),
            &npy(&d.join(format!("sklearn/coef_{head}.npy"))).1,
            1e-4,
            &format!("coef {head}"),
        );
        close(
            &tensor(&format!("heads.{head}.bias")),
            &npy(&d.join(format!("sklearn/intercept_{head}.npy"))).1,
            1e-4,
            &format!("intercept {head}"),
        );
    }
    run(decode_cmd(&d.join("ours"), &d.join("X_test.npy"), &d.join("pred_ours")).args(["--renorm", "none"]));
    for head in ["a", "b"] {
        let (shape, ours) = npy(&d.join(format!("pred_ours/{head}.npy")));
        assert_eq!(shape[0], 20);
        close(&ours, &npy(&d.join(format!("sklearn/pred_{head}.npy"))).1, 1e-4, &format!("trained {head}"));
    }
    // Per-head inputs (MIRAGE's retrieval head reads L2-normalised betas): scikit-learn's Ridge
    // on the unit-norm z-scored rows (a) and on the betas as given (b), exported with
    // --head-input and trained by `mirage train --head-input`, predict as scikit-learn does.
    for (model, train_args) in [("exported_inputs", None), ("ours_inputs", Some(["--head-input", "a=l2"]))] {
        if let Some(extra) = train_args {
            run(mirage()
                .args(["train", "--alpha", alpha, "--head-input", "b=none"])
                .args(extra)
                .arg("--betas")
                .arg(d.join("X.npy"))
                .arg("--targets")
                .arg(d.join("targets"))
                .arg("--out")
                .arg(d.join(model)));
        }
        let pred = d.join(format!("pred_{model}"));
        run(decode_cmd(&d.join(model), &d.join("X_test.npy"), &pred).args(["--renorm", "none"]));
        for (head, reference) in [("a", "pred_l2_a"), ("b", "pred_none_b")] {
            let (_, ours) = npy(&pred.join(format!("{head}.npy")));
            close(
                &ours,
                &npy(&d.join(format!("sklearn/{reference}.npy"))).1,
                1e-4,
                &format!("{model} {head}"),
            );
        }
        let cfg = std::fs::read_to_string(d.join(model).join("config.json")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        assert_eq!(
            (cfg["heads"][0]["input"].as_str(), cfg["heads"][1]["input"].as_str()),
            (Some("l2"), Some("none"))
        );
    }
    let (status, out) = run_with_timeout(
        mirage()
            .args(["train", "--head-input", "a=l3", "--betas"])
            .arg(d.join("X.npy"))
            .arg("--targets")
            .arg(d.join("targets"))
            .arg("--out")
            .arg(d.join("x")),
        Duration::from_secs(60),
    );
    assert!(!status.success() && out.contains("one of zscore, l2, none"), "{out}");

    // Cross-validation picks the penalty scikit-learn's 5-fold search picks, per head.
    run(mirage()
        .args(["train", "--cv", "1,100,10000,1000000", "--betas"])
        .arg(d.join("X.npy"))
        .arg("--targets")
        .arg(d.join("targets"))
        .arg("--out")
        .arg(d.join("cv")));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("cv/config.json")).unwrap()).unwrap();
    for head in ["a", "b"] {
        let want: f64 = std::fs::read_to_string(d.join(format!("sklearn/cv_alpha_{head}.txt")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(cfg["provenance"]["alpha"][head].as_f64(), Some(want), "CV alpha of {head}");
    }
    // Reduced rank: the fitted map projected onto the top singular directions, as NumPy does.
    run(mirage()
        .args(["train", "--alpha", alpha, "--rank", "3", "--betas"])
        .arg(d.join("X.npy"))
        .arg("--targets")
        .arg(d.join("targets"))
        .arg("--out")
        .arg(d.join("rank3")));
    run(decode_cmd(&d.join("rank3"), &d.join("X_test.npy"), &d.join("pred_rank3")).args(["--renorm", "none"]));
    for head in ["a", "b"] {
        let (_, ours) = npy(&d.join(format!("pred_rank3/{head}.npy")));
        close(
            &ours,
            &npy(&d.join(format!("sklearn/pred_rank3_{head}.npy"))).1,
            1e-4,
            &format!("rank 3 {head}"),
        );
    }
}

#[test]
fn eval_metrics_equal_skimage_and_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(python("metrics_ref.py").arg(d));
    let out = d.join("report.json");
    run(mirage()
        .args(["eval", "--pred"])
        .arg(d.join("pred"))
        .arg("--truth")
        .arg(d.join("truth"))
        .arg("--conditions")
        .arg(d.join("conditions.tsv"))
        .arg("--out")
        .arg(&out));
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    for cond in ["seen", "imagery"] {
        for (head, metrics) in reference[cond].as_object().unwrap() {
            for (metric, want) in metrics.as_object().unwrap() {
                let got = ours[cond]["heads"][head][metric].as_f64().unwrap();
                assert!(
                    (got - want.as_f64().unwrap()).abs() < 1e-6,
                    "{cond} {head} {metric}: {got} vs {want}"
                );
            }
        }
    }
    assert!(ours["seen_minus_imagery"]["pixels"]["ssim"].is_number());
}

#[test]
fn trained_on_seen_decodes_held_out_seen_well_and_imagery_worse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (train_run, train_glm) = simulated_session(d, 7, "train", "seen", 1, 900);
    let (seen_run, seen_glm) = simulated_session(d, 7, "seen", "seen", 2, 300);
    let (imag_run, imag_glm) = simulated_session(d, 7, "imag", "imagery", 3, 300);
    let model = train_model(d, &train_run, &train_glm);
    let mut scores = Vec::new();
    for (label, run_dir, glm) in [("seen", &seen_run, &seen_glm), ("imagery", &imag_run, &imag_glm)] {
        let pred = d.join(format!("pred-{label}"));
        run(&mut decode_cmd(&model, &glm.join("trial_betas.npy"), &pred));
        let report = d.join(format!("{label}.json"));
        let out = run(mirage()
            .args(["eval", "--pred"])
            .arg(&pred)
            .arg("--truth")
            .arg(run_dir.join("truth/targets/trials"))
            .arg("--out")
            .arg(&report));
        eprintln!("{label}:\n{out}");
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let m = |head: &str, metric: &str| r["all"]["heads"][head][metric].as_f64().unwrap();
        scores.push([
            m("image", "two_way"),
            m("pixels", "pixcorr"),
            m("pixels", "ssim"),
            m("lowlevel", "top1"),
        ]);
    }
    let ([seen_2way, seen_pix, seen_ssim, seen_low], [imag_2way, imag_pix, imag_ssim, imag_low]) =
        (scores[0], scores[1]);
    // Both conditions are decoded well above chance; imagery loses most at the low level (the
    // simulator, like MIRAGE's participants, imagines pictures with weaker low-level detail).
    assert!(seen_2way > 0.8, "seen 2-way {seen_2way}");
    assert!(imag_2way > 0.6, "imagery 2-way {imag_2way}");
    assert!(seen_pix > 0.5 && imag_pix < seen_pix, "PixCorr seen {seen_pix} imagery {imag_pix}");
    assert!(imag_ssim < seen_ssim, "SSIM seen {seen_ssim} imagery {imag_ssim}");
    assert!(imag_low < seen_low, "low-level top-1 seen {seen_low} imagery {imag_low}");
}

#[test]
fn broken_models_and_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(python("sklearn_ref.py").arg(d).arg("10"));
    let decode = |model: &Path, betas: &Path| {
        run_with_timeout(&mut decode_cmd(model, betas, &d.join("p")), Duration::from_secs(60))
    };
    // Wrong input size.
    let (status, out) = decode(&d.join("exported"), &d.join("targets/a.npy"));
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("300"), "{out}");
    // A missing tensor.
    let broken = d.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(d.join("exported/model.safetensors"), broken.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(d.join("exported/config.json"))
        .unwrap()
        .replace("\"name\": \"b\"", "\"name\": \"c\"");
    std::fs::write(broken.join("config.json"), cfg).unwrap();
    let (status, out) = decode(&broken, &d.join("X_test.npy"));
    assert_eq!(status.code(), Some(2));
    assert!(out.contains("head c"), "{out}");
    // A corrupt safetensors file.
    let mut bytes = std::fs::read(d.join("exported/model.safetensors")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(broken.join("model.safetensors"), bytes).unwrap();
    std::fs::copy(d.join("exported/config.json"), broken.join("config.json")).unwrap();
    let (status, out) = decode(&broken, &d.join("X_test.npy"));
    assert_eq!(status.code(), Some(2));
    assert!(out.contains("model.safetensors"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    // NaN betas: decoding and training refuse them.
    let (_, mut xt) = npy(&d.join("X_test.npy"));
    xt[300 + 5] = f32::NAN;
    mirage_rt::io::npy::write_npy(d.join("nan_test.npy"), &[20, 300], &xt).unwrap();
    let (status, out) = decode(&d.join("exported"), &d.join("nan_test.npy"));
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("trial 1, voxel 5: beta is not finite"), "{out}");
    let (_, mut x) = npy(&d.join("X.npy"));
    x[7] = f32::NAN;
    mirage_rt::io::npy::write_npy(d.join("nan.npy"), &[80, 300], &x).unwrap();
    let (status, out) = run_with_timeout(
        mirage()
            .args(["train", "--betas"])
            .arg(d.join("nan.npy"))
            .arg("--targets")
            .arg(d.join("targets"))
            .arg("--out")
            .arg(d.join("m")),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(2));
    assert!(out.contains("not finite"), "{out}");
}

#[test]
fn the_daemon_decodes_trials_live_and_survives_a_model_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (train_run, train_glm) = simulated_session(d, 7, "train", "seen", 1, 600);
    let model = train_model(d, &train_run, &train_glm);
    let session = d.join("s");
    let gallery = train_run.join("truth/gallery");
    let args = decode_daemon_args(
        "seed=7&run_seed=9&volumes=80&shape=32,32,20&condition=seen&motion_mm=0&motion_deg=0&speed=max",
        &session,
        "sim",
        &model,
        Some(&gallery),
        &[],
    );
    let daemon = Daemon::start(&as_strs(&args), d);
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    let decoded = published(&session, "decode");
    let live: Vec<&serde_json::Value> = decoded.iter().filter(|h| h["at_run_end"] == false).collect();
    assert!(live.len() >= 5, "{} live decodes\n{log}", live.len());
    let hits = live
        .iter()
        .filter(|h| h["top"][0]["id"].as_str().unwrap() == h["stim"].as_u64().unwrap().to_string())
        .count();
    eprintln!("live top-1 gallery hits: {hits}/{}", live.len());
    assert!(hits * 3 > live.len(), "top-1 hits {hits} of {}", live.len());
    for h in &live {
        assert!(h["latency_ms"].as_f64().unwrap() > 0.0);
        let payloads: Vec<&str> =
            h["payloads"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        for want in ["image", "text", "lowlevel", "retrieval", "pixels", "c_img", "c_txt", "pixels_png"] {
            assert!(payloads.contains(&want), "{want} missing from {payloads:?}");
        }
    }

    // The same daemon with a model for another mask: every trial is refused and counted, the
    // run goes on.
    let session = d.join("s2");
    let args = decode_daemon_args(
        "seed=7&run_seed=9&volumes=40&shape=32,32,20&speed=max",
        &session,
        "auto",
        &model,
        None,
        &[],
    );
    let daemon = Daemon::start(&as_strs(&args), d);
    let (status, log) = daemon.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");
    assert!(log.contains("received 40 recorded 40 published 40"), "{log}");
    assert!(log.contains("decode_input="), "{log}");
}

#[test]
fn the_daemon_decodes_heads_to_latents_with_8_bit_weights_and_ranks_as_float32_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (train_run, train_glm) = simulated_session(d, 7, "train", "seen", 1, 600);
    let model = train_model_with(d, &train_run, &train_glm, "model-r8", &["--rank", "8"]);
    let gallery = train_run.join("truth/gallery");
    let query =
        "seed=7&run_seed=9&volumes=80&shape=32,32,20&condition=seen&motion_mm=0&motion_deg=0&speed=max";
    let latent = ["image", "text", "lowlevel", "retrieval"];
    let latent_set = format!("decode.latent_heads={latent:?}");
    let runs = [("f32", vec![]), ("q8", vec!["--set", "decode.weight_dtype=\"q8_0\"", "--set", &latent_set])];
    let mut decoded = Vec::new();
    for (name, extra) in &runs {
        let session = d.join(name);
        let args = decode_daemon_args(query, &session, "sim", &model, Some(&gallery), extra);
        let (status, log) = Daemon::start(&as_strs(&args), d).wait(Duration::from_secs(120));
        assert!(status.success(), "{log}");
        let live: Vec<serde_json::Value> =
            published(&session, "decode").into_iter().filter(|h| h["at_run_end"] == false).collect();
        decoded.push(live);
    }
    let (full, part) = (&decoded[0], &decoded[1]);
    assert!(full.len() >= 5 && full.len() == part.len(), "{} and {} decodes", full.len(), part.len());
    let top1 = |h: &serde_json::Value| h["top"][0]["id"].as_str().unwrap().to_string();
    let hits = part.iter().filter(|h| top1(h) == h["stim"].as_u64().unwrap().to_string()).count();
    eprintln!("latent + q8_0 top-1 gallery hits: {hits}/{}", part.len());
    assert!(hits * 3 > part.len(), "top-1 hits {hits} of {}", part.len());
    let score = |h: &serde_json::Value| h["top"][0]["score"].as_f64().unwrap();
    assert!(full.iter().zip(part).any(|(a, b)| score(a) != score(b)), "the 8-bit path changed nothing");
    for (a, b) in full.iter().zip(part) {
        assert_eq!(a["trial"], b["trial"]);
        assert_eq!(top1(a), top1(b), "trial {}: top-1 differs", a["trial"]);
        let (sa, sb) = (score(a), score(b));
        assert!((sa - sb).abs() < 0.01, "trial {}: score {sa} vs {sb}", a["trial"]);
        let mut published_latents: Vec<&str> =
            b["latents"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        published_latents.sort();
        assert_eq!(published_latents, ["image", "lowlevel", "retrieval", "text"]);
        let names: Vec<&str> =
            b["payloads"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        for h in latent {
            assert!(names.contains(&format!("{h}.latent").as_str()) && !names.contains(&h), "{names:?}");
        }
        assert!(names.contains(&"pixels_png") && !names.contains(&"c_img"), "{names:?}");
    }
}

#[test]
fn a_decode_setup_error_exits_at_once_and_leaves_no_session_folder() {
    // The decode stage is made before any thread starts or the session folder exists: a model
    // without the head named in decode.latent_heads ends the daemon with the reason.
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("s");
    let (status, out) = run_with_timeout(
        mirage()
            .arg("run")
            .args(["--ingest", "sim://?seed=1&volumes=20&shape=32,32,20&speed=max", "--publish", "none"])
            .args(["--no-lsl", "--quiet", "--record"])
            .arg(&session)
            .args(["--set", "decode.model=sim", "--set", "decode.gallery=sim", "--set", "glm.mask=sim"])
            .args(["--set", "decode.latent_heads=[\"nope\"]"])
            .env("MIRAGE_CACHE_DIR", dir.path().join("cache")),
        Duration::from_secs(120),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("the model has no head \"nope\""), "{out}");
    assert!(!session.exists(), "a failed start left {}", session.display());
}
