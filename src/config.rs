//! The daemon's configuration: one TOML file, one section per part, every field defaulted.
//!
//! `Config` is plain data. [`Config::validate`] reports every mistake at once, each naming its
//! section and field, so `mirage check` can vet a file without starting anything.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::calibrate::CalibrateConfig;
use crate::decode::DecodeConfig;
use crate::glm::GlmConfig;
use crate::ingest::uri::{parse_publish_uri, IngestUri};
use crate::ingest::IngestConfig;
use crate::io::session::RecordConfig;
use crate::motion::MotionConfig;
use crate::publish::PublishConfig;
use crate::queue::WhenFull;
use crate::settings::InputFiles;
use crate::sim::SimConfig;

/// Everything `mirage run` needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where volumes come from.
    pub ingest: IngestConfig,
    /// Simulator defaults for `sim://` (the URI's query overrides them).
    pub sim: SimConfig,
    /// Queues between stages.
    pub pipeline: PipelineConfig,
    /// Online realignment.
    pub motion: MotionConfig,
    /// Spatial smoothing before the GLM.
    pub smooth: crate::smooth::SmoothConfig,
    /// Online GLM.
    pub glm: GlmConfig,
    /// The neurofeedback value's recipe.
    pub feedback: crate::feedback::FeedbackConfig,
    /// The MIRAGE decoder.
    pub decode: DecodeConfig,
    /// Calibration mode: the domain-alignment head and its fit.
    pub calibrate: CalibrateConfig,
    /// Sinks for processed data.
    pub publish: PublishConfig,
    /// The session folder.
    pub record: RecordConfig,
    /// The operator's web console and the end-of-run report.
    pub console: crate::console::ConsoleConfig,
    /// Access to the listeners exposed beyond loopback.
    pub security: SecurityConfig,
}

/// `[security]`
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// The token the console and the metrics endpoint require when they listen beyond
    /// loopback (`None`: `MIRAGE_TOKEN`, else one made at start and printed in the URL).
    pub token: Option<String>,
}

/// `[pipeline]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Messages each edge holds.
    pub queue_capacity: usize,
    /// Bytes each edge holds (a message larger than this passes alone).
    pub queue_bytes: usize,
    /// Policy of the edge into publish (`block` or `drop_newest`); edges before it always block.
    pub publish_when_full: WhenFull,
    /// Messages the recorder queue holds (it always blocks: nothing received is dropped).
    pub record_capacity: usize,
    /// SCHED_FIFO priority (1–99) of the volume path's threads (ingest, stages, publish), so
    /// that nothing else on the machine delays a volume; 0 leaves them under the normal
    /// scheduler. Needs CAP_SYS_NICE (or an rtprio limit); refused, they stay normal and it is
    /// counted (`realtime_refused`).
    pub realtime_priority: u8,
}

impl Default for PipelineConfig {
    fn default() -> PipelineConfig {
        PipelineConfig {
            queue_capacity: 16,
            queue_bytes: 64 << 20,
            publish_when_full: WhenFull::Block,
            record_capacity: 256,
            realtime_priority: 0,
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors that name the key.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        let mut cfg = Config::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        if let Some(base) = path.parent() {
            cfg.resolve_inputs_against(base);
        }
        Ok(cfg)
    }

    /// Makes the relative paths of input files (models, masks, events, protocols, a `file://`
    /// series, CURVE certificates) relative to `base`, the config file's folder, so a config
    /// runs from any folder; each section names its own ([`InputFiles`]). Outputs
    /// (`record.dir`, `calibrate.out`, `console.report`) stay relative to the working
    /// directory, like `--set` values.
    pub fn resolve_inputs_against(&mut self, base: &Path) {
        let sections: [&mut dyn InputFiles; 8] = [
            &mut self.ingest,
            &mut self.sim,
            &mut self.motion,
            &mut self.glm,
            &mut self.feedback,
            &mut self.decode,
            &mut self.calibrate,
            &mut self.publish,
        ];
        for s in sections {
            s.resolve_inputs(base);
        }
    }

    /// Parses TOML text; unknown keys are errors that name the key.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| e.message().trim().to_string())
    }

    /// Applies one `section.key=value` override ([`crate::settings`]: the value read as TOML,
    /// else as a list or a string), e.g. `motion.enabled=false` or `calibrate.modes=0,1`.
    pub fn set(&mut self, assignment: &str) -> anyhow::Result<()> {
        let (path, raw) = assignment
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {assignment:?}: write SECTION.KEY=VALUE"))?;
        crate::settings::set(self, path, raw).map_err(|e| anyhow::anyhow!("--set {e}"))
    }

    /// The parsed ingest URI.
    pub fn ingest_uri(&self) -> Result<IngestUri, String> {
        IngestUri::parse(&self.ingest.uri, &self.sim)
    }

    /// `ingest.allow` that does not parse, and listeners beyond loopback that it does not guard:
    /// a sender there would push volumes into the closed loop.
    fn exposure_errors(&self) -> Vec<String> {
        if let Err(e) = crate::ingest::allow::Allowlist::parse(&self.ingest.allow) {
            return vec![e];
        }
        if !self.ingest.allow.is_empty() {
            return Vec::new();
        }
        let mut exposed = Vec::new();
        if let Some(ep) = self
            .ingest_uri()
            .ok()
            .as_ref()
            .and_then(IngestUri::bound_endpoint)
            .filter(|e| e.is_exposed() && !self.ingest.curve.enabled())
        {
            exposed.push(format!("ingest.uri ({})", ep.zmq_address()));
        }
        if let Some(addr) = self.publish.results.as_deref().filter(|a| beyond_loopback(a)) {
            exposed.push(format!("publish.results ({addr})"));
        }
        exposed
            .into_iter()
            .map(|what| {
                format!(
                    "{what} listens beyond loopback: set ingest.allow to the senders' addresses or \
                     ranges (e.g. [\"10.0.0.5\", \"192.168.1.0/24\"]), or [\"*\"] to let anyone in on purpose \
                     (or, for the ingest, ingest.curve)"
                )
            })
            .collect()
    }

    /// The volumes' grid when ingest replays a file (a NIfTI series or a session folder), known
    /// before the run; `None` for live senders (their first volume names it).
    fn replay_grid(&self) -> Option<([usize; 3], crate::volume::Affine)> {
        let Ok(IngestUri::File { path, .. }) = self.ingest_uri() else { return None };
        if path.is_dir() {
            let s = crate::io::session::SessionReader::open(&path).ok()?;
            return s.entries.first().map(|e| (e.dims, e.affine));
        }
        let r = crate::io::nifti::NiftiReader::open(&path, self.ingest.max_voxels).ok()?;
        Some((r.header().volume_dims(), r.header().affine()))
    }

    /// Every problem with the configuration, each naming its field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        match self.ingest_uri() {
            Ok(IngestUri::Sim { sim, .. }) => errors.extend(sim.validate()),
            Ok(IngestUri::File { path, .. }) if !path.exists() => {
                errors.push(format!("ingest.uri: {} does not exist", path.display()))
            }
            Ok(_) => {}
            Err(e) => errors.push(format!("ingest.uri: {e}")),
        }
        if !(self.publish.lsl_wait_s.is_finite() && (0.0..=600.0).contains(&self.publish.lsl_wait_s)) {
            errors.push("publish.lsl_wait_s must be between 0 and 600 seconds".into());
        }
        if self.ingest.tr.is_some_and(|t| !(t.is_finite() && t > 0.0 && t <= crate::ingest::IMPLAUSIBLE_TR_S))
        {
            errors.push("ingest.tr must be a repetition time in seconds, above 0 and at most 60".into());
        }
        if let (true, Some((dims, affine))) = (self.glm.enabled, self.replay_grid()) {
            errors.extend(crate::glm::grid_errors(&self.glm, dims, &affine));
        }
        if self.ingest.idle_exit_s.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
            errors.push("ingest.idle_exit_s must be a number of seconds above 0".into());
        }
        errors.extend(self.exposure_errors());
        errors.extend(self.motion.validate());
        errors.extend(self.smooth.validate());
        errors.extend(self.glm.validate());
        errors.extend(self.feedback.validate());
        errors.extend(self.decode.validate());
        errors.extend(self.calibrate.validate());
        errors.extend(self.console.validate());
        let sim_ingest = matches!(self.ingest_uri(), Ok(IngestUri::Sim { .. }));
        let sim = |p: &Option<std::path::PathBuf>| p.as_deref() == Some(std::path::Path::new("sim"));
        if (sim(&self.decode.model) || sim(&self.decode.gallery)) && !sim_ingest {
            errors.push(
                "decode.model/decode.gallery = \"sim\" needs sim:// ingest; give a model folder".into(),
            );
        }
        if self.glm.rois.iter().any(|r| r.path == std::path::Path::new("sim")) && !sim_ingest {
            errors.push("glm.rois: path = \"sim\" needs sim:// ingest; give a mask file".into());
        }
        if self.decode.mode == crate::decode::Mode::Calibrate {
            if self.decode.model.is_none() || self.decode.gallery.is_none() {
                errors.push(
                    "decode.mode = calibrate needs decode.model and decode.gallery (the targets)".into(),
                );
            }
            if self.calibrate.protocol.is_none() {
                errors.push("decode.mode = calibrate needs calibrate.protocol (--protocol FILE)".into());
            }
        }
        if self.ingest.max_voxels == 0 {
            errors.push("ingest.max_voxels must be positive".into());
        }
        if self.pipeline.queue_capacity == 0 || self.pipeline.record_capacity == 0 {
            errors.push("pipeline.queue_capacity and pipeline.record_capacity must be at least 1".into());
        }
        if self.pipeline.realtime_priority > 99 {
            errors.push(
                "pipeline.realtime_priority must be 0 (off) or a SCHED_FIFO priority from 1 to 99".into(),
            );
        }
        if let Some(uri) = &self.publish.uri {
            if let Err(e) = parse_publish_uri(uri) {
                errors.push(format!("publish.uri: {e}"));
            }
        }
        if let Some(name) = &self.publish.lsl_feedback {
            if name.is_empty() || name.contains('\0') {
                errors.push("publish.lsl_feedback must be a non-empty name".into());
            }
        }
        if !(self.publish.status_interval_s.is_finite() && self.publish.status_interval_s > 0.0) {
            errors.push("publish.status_interval_s must be a positive number".into());
        }
        if let Some(m) = &self.publish.metrics {
            if m.parse::<std::net::SocketAddr>().is_err() {
                errors.push(format!("publish.metrics {m:?}: want IP:PORT, e.g. 127.0.0.1:9464"));
            }
        }
        if self.publish.send_hwm < 1 {
            errors.push("publish.send_hwm must be at least 1".into());
        }
        errors
    }
}

/// Whether a listener at `addr` (`IP:PORT`) is reachable beyond this machine.
pub fn beyond_loopback(addr: &str) -> bool {
    !addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_are_valid() {
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
            let path = entry.unwrap().path();
            let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(cfg.validate(), Vec::<String>::new(), "{}", path.display());
        }
    }

    #[test]
    fn dotted_overrides() {
        let mut cfg = Config::default();
        cfg.record.dir = None;
        cfg.set("publish.lsl_feedback=none").unwrap();
        assert_eq!((cfg.record.dir.as_deref(), cfg.publish.lsl_feedback.as_deref()), (None, None));
        cfg.set("motion.enabled=false").unwrap();
        cfg.set("publish.uri=tcp://127.0.0.1:7000").unwrap();
        cfg.set("pipeline.queue_capacity=4").unwrap();
        assert!(!cfg.motion.enabled);
        assert_eq!(cfg.publish.uri.as_deref(), Some("tcp://127.0.0.1:7000"));
        assert_eq!(cfg.pipeline.queue_capacity, 4);
        assert!(cfg.set("motion.enabledd=false").unwrap_err().to_string().contains("enabledd"));
        assert!(cfg.set("pipeline.queue_capacity=lots").is_err());
        assert!(cfg.set("nonsense").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = toml::from_str::<Config>("[ingest]\nurl = \"x\"").unwrap_err().to_string();
        assert!(err.contains("url"), "{err}");
        let cfg: Config = toml::from_str(
            "[ingest]\nuri = \"tcp://x\"\n[publish]\nuri = \"udp://1\"\nstatus_interval_s = 0",
        )
        .unwrap();
        let errors = cfg.validate();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("ingest.uri"));
        let cfg: Config = toml::from_str("[pipeline]\nrealtime_priority = 100").unwrap();
        assert_eq!(
            cfg.validate(),
            ["pipeline.realtime_priority must be 0 (off) or a SCHED_FIFO priority from 1 to 99"]
        );
    }

    #[test]
    fn every_input_path_is_made_relative_to_the_config_folder_and_outputs_are_not() {
        let text = r#"
            [ingest]
            uri = "file://run.nii.gz?tr=2"
            curve = { secret = "keys/d.key_secret", clients = ["keys/s.key"] }
            [publish]
            curve = { secret = "keys/p.key_secret" }
            [motion]
            reference_file = "ref.nii.gz"
            [glm]
            events = "events.tsv"
            mask = "mask.nii.gz"
            rois = [{ name = "v1", path = "v1.nii.gz" }, { name = "sim", path = "sim" }]
            [decode]
            model = "model"
            gallery = "gallery"
            alignment = "align.safetensors"
            [calibrate]
            protocol = "protocol.toml"
            out = "fitted.safetensors"
            [sim]
            anatomy = "t1.nii.gz"
            protocol = "sim.toml"
            [record]
            dir = "sessions/x"
        "#;
        let mut cfg = Config::parse(text).unwrap();
        cfg.resolve_inputs_against(Path::new("/cfg"));
        let p = |s: &str| Some(std::path::PathBuf::from(s));
        assert_eq!(cfg.ingest.uri, "file:///cfg/run.nii.gz?tr=2");
        assert_eq!(
            (cfg.ingest.curve.secret.clone(), cfg.ingest.curve.clients[0].clone()),
            (p("/cfg/keys/d.key_secret"), "/cfg/keys/s.key".into())
        );
        assert_eq!(cfg.publish.curve.secret, p("/cfg/keys/p.key_secret"));
        assert_eq!(cfg.motion.reference_file, p("/cfg/ref.nii.gz"));
        assert_eq!(
            (cfg.glm.events.clone(), cfg.glm.mask.as_str()),
            (p("/cfg/events.tsv"), "/cfg/mask.nii.gz")
        );
        assert_eq!(
            (cfg.glm.rois[0].path.clone(), cfg.glm.rois[1].path.clone()),
            ("/cfg/v1.nii.gz".into(), "sim".into())
        );
        assert_eq!(
            (cfg.decode.model.clone(), cfg.decode.gallery.clone()),
            (p("/cfg/model"), p("/cfg/gallery"))
        );
        assert_eq!(cfg.decode.alignment, "/cfg/align.safetensors");
        assert_eq!(
            (cfg.calibrate.protocol.clone(), cfg.calibrate.out.clone()),
            (p("/cfg/protocol.toml"), p("fitted.safetensors"))
        );
        assert_eq!(
            (cfg.sim.anatomy.clone(), cfg.sim.protocol.clone()),
            (p("/cfg/t1.nii.gz"), p("/cfg/sim.toml"))
        );
        assert_eq!(cfg.record.dir.as_deref(), Some("sessions/x"));
    }
}
