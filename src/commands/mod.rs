//! The commands behind the `mirage` binary; `main.rs` only parses arguments into these.

pub mod bench;
pub mod bench_decode;
pub mod calibrate;
pub mod decode;
pub mod glm;
pub mod realign;
pub mod run;
pub mod scanner;
pub mod sim_model;
pub mod simulate;
pub mod smooth;

use std::path::{Path, PathBuf};

use crate::config::Config;

/// Loads `path`, or the built-in defaults when no file is given.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

/// Median and 99th percentile (nearest rank) of a stage's per-volume times, as `mirage realign`
/// and `mirage glm` print them so that other tools can be compared on the same series.
pub fn per_volume_times(seconds: &[f64]) -> String {
    let ms = crate::metrics::RollingSummary::of(seconds.iter().map(|s| s * 1e3).collect());
    match ms.count {
        0 => "no volume timed".to_string(),
        n => format!("per volume p50 {:.3} ms, p99 {:.3} ms, over {n} volumes", ms.p50, ms.p99),
    }
}

/// `mirage export SESSION --bids DIR`: the session as a BIDS dataset.
pub fn export(session: &Path, bids: &Path, opts: &crate::bids::ExportOptions) -> anyhow::Result<()> {
    let runs = crate::bids::export(session, bids, opts)?;
    for r in &runs {
        let missing = match r.missing.len() {
            0 => String::new(),
            n => format!(" ({n} never received: {:?})", r.missing),
        };
        println!(
            "run {:?} -> run-{}: {} volumes{missing}, {} trials, {}",
            r.run,
            r.number,
            r.volumes,
            r.trials,
            r.bold.display()
        );
        let t = &r.trial_files;
        println!(
            "  derivatives: {} trial betas over {} mask voxels, {} decoded trials{}",
            t.betas,
            t.mask_voxels,
            t.decodes,
            if t.heads.is_empty() { String::new() } else { format!(" (heads {})", t.heads.join(", ")) }
        );
    }
    Ok(())
}

/// `mirage keygen PREFIX`: a CURVE key pair as `PREFIX.key` and `PREFIX.key_secret`.
pub fn keygen(prefix: &Path) -> anyhow::Result<()> {
    crate::curve::require().map_err(anyhow::Error::msg)?;
    if let Some(parent) = prefix.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let cert = crate::curve::Certificate::generate().map_err(anyhow::Error::msg)?;
    let (public, secret) = cert.write(prefix).map_err(anyhow::Error::msg)?;
    println!("public key {} in {} (give it to peers)", cert.public, public.display());
    println!("secret key in {} (keep it here)", secret.display());
    Ok(())
}

/// `mirage check`: validates a configuration and loads every input it names (model, gallery,
/// masks, protocol, simulator) without starting anything.
pub fn check(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = load_config(config)?;
    let errors = cfg.validate();
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("\n"));
    }
    // The simulator's own model is made when a run starts (`sim_model`), not here.
    let sim = Some(PathBuf::from(sim_model::SIM));
    let mut inputs = cfg.clone();
    if inputs.decode.model == sim || inputs.decode.gallery == sim {
        inputs.decode.model = None;
        inputs.decode.gallery = None;
        inputs.decode.mode = crate::decode::Mode::Decode;
    }
    match crate::pipeline::resolve::Resolved::new(&inputs) {
        Ok(_) => {
            println!("configuration is valid; ingest {}", cfg.ingest.uri);
            Ok(())
        }
        Err(errors) => anyhow::bail!("{}", errors.join("\n")),
    }
}
