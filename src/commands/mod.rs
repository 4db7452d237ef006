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

use std::path::Path;

use crate::config::Config;

/// Loads `path`, or the built-in defaults when no file is given.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

/// `mirage check`: validates a configuration without starting anything.
pub fn check(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = load_config(config)?;
    let errors = cfg.validate();
    if errors.is_empty() {
        println!("configuration is valid; ingest {}", cfg.ingest.uri);
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("\n"))
    }
}
