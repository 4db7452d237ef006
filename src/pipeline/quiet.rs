//! The configuration the runner's unit tests start from.

use crate::config::Config;

/// A simulated run of `volumes` small volumes with no socket, outlet, console, recording or
/// model: a pipeline the runner's tests can build on any machine.
pub fn sim_config(volumes: usize) -> Config {
    let mut cfg = Config::default();
    cfg.ingest.uri = format!("sim://?volumes={volumes}&shape=12,12,6&speed=max");
    cfg.publish.uri = None;
    cfg.publish.lsl_feedback = None;
    cfg.record.dir = None;
    cfg.console.listen = None;
    cfg.decode.model = None;
    cfg
}
