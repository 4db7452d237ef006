//! The simulator's own decoder (`decode.model = "sim"`, `decode.gallery = "sim"`): a model
//! trained on a simulated *seen* session of the same simulated brain as the `sim://` ingest, made
//! on first use and cached, so a first run needs no download and no training by hand.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::decode::{train, TrainArgs};
use super::glm::{glm, DesignSource, GlmOptions};
use crate::config::Config;
use crate::decode::train::TrainOptions;
use crate::glm::GlmConfig;
use crate::ingest::IngestUri;
use crate::sim::{RunCondition, SimConfig, Simulator};

/// The value of `decode.model` / `decode.gallery` that asks for the simulator's model.
pub const SIM: &str = "sim";

/// Volumes of the simulated seen session the model is trained on (about 74 trials).
const TRAINING_VOLUMES: usize = 600;

/// Ridge penalty of the simulator's model (the README's example).
const ALPHA: f64 = 1000.0;

/// Where cached models live: `$MIRAGE_CACHE_DIR`, else `$XDG_CACHE_HOME/mirage-rt`, else
/// `~/.cache/mirage-rt`.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("MIRAGE_CACHE_DIR") {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(d.join("mirage-rt"));
    }
    let home = var("HOME").context("no MIRAGE_CACHE_DIR, XDG_CACHE_HOME or HOME for the model cache")?;
    Ok(home.join(".cache/mirage-rt"))
}

/// The seen session the model for `live`'s simulated brain is trained on: the same participant
/// (`seed`, grid, stimuli, encoding), another run of seen trials.
pub fn training_session(live: &SimConfig) -> SimConfig {
    SimConfig {
        run_seed: Some(live.seed.wrapping_add(0x5EED)),
        volumes: TRAINING_VOLUMES,
        condition: RunCondition::Seen,
        protocol: None,
        run: "train".into(),
        ..live.clone()
    }
}

/// Replaces `decode.model = "sim"` and `decode.gallery = "sim"` by the cached model and gallery
/// of the ingest's simulated brain, training them first if the cache has none.
pub fn resolve(cfg: &mut Config, progress: bool) -> anyhow::Result<()> {
    let is_sim = |p: &Option<PathBuf>| p.as_deref() == Some(Path::new(SIM));
    let (model, gallery) = (is_sim(&cfg.decode.model), is_sim(&cfg.decode.gallery));
    if !model && !gallery {
        return Ok(());
    }
    let Ok(IngestUri::Sim { sim, .. }) = cfg.ingest_uri() else {
        anyhow::bail!("decode.model/decode.gallery = \"sim\" needs sim:// ingest; give a model folder");
    };
    let dir = ensure(&training_session(&sim), &cache_dir()?, progress)?;
    if model {
        cfg.decode.model = Some(dir.join("model"));
    }
    if gallery {
        cfg.decode.gallery = Some(dir.join("gallery"));
    }
    Ok(())
}

/// The cache folder of the model trained on `session` (`model/` and `gallery/`), made if
/// missing: simulate, fit the GLM, train — the README's steps, in a scratch folder that is
/// renamed into place only when complete.
pub fn ensure(session: &SimConfig, cache: &Path, progress: bool) -> anyhow::Result<PathBuf> {
    let key = serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "session": session, "alpha": ALPHA});
    let dir = cache.join(format!("sim-model-{:08x}", crc32fast::hash(key.to_string().as_bytes())));
    if dir.join("model/config.json").exists() && dir.join("gallery/gallery.json").exists() {
        eprintln!("mirage: using the cached simulator model {}", dir.display());
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).with_context(|| format!("model cache {}", cache.display()))?;
    let scratch = cache.join(format!(".building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let result = build(session, &scratch, progress);
    let result = result.and_then(|()| match std::fs::rename(scratch.join("out"), &dir) {
        // Another process finished the same model first: use theirs.
        Err(_) if dir.join("model/config.json").exists() => Ok(()),
        other => other.with_context(|| format!("moving the model into {}", dir.display())),
    });
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    eprintln!("mirage: cached the simulator model in {} (later runs reuse it)", dir.display());
    Ok(dir)
}

fn build(session: &SimConfig, scratch: &Path, progress: bool) -> anyhow::Result<()> {
    eprintln!(
        "mirage: no cached model for this simulated brain: training one on a simulated seen session \
         ({} volumes); once only",
        session.volumes
    );
    let pb = crate::decode::train::bar(progress, 3, "model");
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let run = scratch.join("session");
    pb.set_message("simulate");
    Simulator::new(session)?.write_run(&run)?;
    pb.inc(1);
    pb.set_message("glm");
    let mask = run.join("truth/roi_mask.nii.gz");
    let glm_dir = scratch.join("glm");
    let opts = GlmOptions {
        tr: Some(session.tr),
        design: DesignSource::Events(run.join("events.tsv")),
        out: glm_dir.clone(),
        mask: Some(mask.clone()),
        ar1: false,
        highpass: None,
        motion: None,
    };
    glm(&run.join("bold.nii.gz"), &opts, &GlmConfig::default(), session.max_voxels)?;
    pb.inc(1);
    pb.set_message("train");
    let out = scratch.join("out");
    let args = TrainArgs {
        betas: glm_dir.join("trial_betas.npy"),
        targets: run.join("truth/targets/trials"),
        out: out.join("model"),
        mask: Some(mask),
        opts: TrainOptions { alpha: ALPHA, ..TrainOptions::default() },
    };
    pb.suspend(|| train(&args))?;
    std::fs::rename(run.join("truth/gallery"), out.join("gallery")).context("moving the gallery")?;
    pb.inc(1);
    pb.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_training_session_is_the_same_brain_in_another_run_of_seen_trials() {
        let live = SimConfig {
            seed: 7,
            run_seed: Some(9),
            condition: RunCondition::Imagery,
            ..SimConfig::default()
        };
        let t = training_session(&live);
        assert_eq!((t.seed, t.shape, t.n_stimuli), (live.seed, live.shape, live.n_stimuli));
        assert_eq!(t.condition, RunCondition::Seen);
        assert_ne!(t.run_seed, live.run_seed);
    }
}
