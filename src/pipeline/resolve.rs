//! The configuration resolved, and the topology: every input the configuration names loaded
//! and checked once, with every error collected, before any thread, socket or session file of
//! the run exists, and the volume path's stages built in order, each by its own folder. This
//! file is the one place the runner's side knows which stages there are: [`Topology::standard`]
//! lists them, one line each, and everything else (latency keys, status, the console, the
//! bench) follows from the stages it builds.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::access::Token;
use crate::calibrate::live::CalibratingDecoder;
use crate::calibrate::protocol::Protocol;
use crate::clock;
use crate::config::Config;
use crate::curve::Curve;
use crate::decode::gallery::Gallery;
use crate::decode::stage::DecodeWorker;
use crate::decode::DecodeStage;
use crate::ingest::allow::Allowlist;
use crate::ingest::sim::SimSource;
use crate::ingest::uri::parse_publish_uri;
use crate::ingest::{open_source, Endpoint, IngestError, IngestUri, Source, SourceLimits};
use crate::publish::FeedbackOutlet;
use crate::reason::Reason;
use crate::sim::Simulator;
use crate::stage::{Identity, Stage};

/// What a stage's build may use besides the configuration: the inputs loaded once.
pub struct Inputs<'a> {
    /// The configuration, validated.
    pub cfg: &'a Config,
    /// The simulated run of `sim://` ingest (its anatomy's ROI is `"sim"` masks and ROIs).
    pub simulator: Option<&'a Simulator>,
    /// The gallery, loaded once.
    pub gallery: Option<&'a Arc<Gallery>>,
    /// The calibration protocol, when one is configured.
    pub protocol: Option<&'a Protocol>,
    /// The session folder, when recording.
    pub session_dir: Option<&'a std::path::Path>,
}

/// Builds one stage of the volume path; `None` when the run has no such step (one that is off
/// and costs the path nothing; a switched-off step that keeps its place is an [`Identity`]).
pub type StageBuild = Box<dyn Fn(&Inputs<'_>) -> Result<Option<Box<dyn Stage>>, String>>;

/// The volume path between ingest and publish: its stages' builds, in order.
pub struct Topology(pub Vec<StageBuild>);

impl Topology {
    /// The path mirage runs. Adding a stage is one line here (and its folder).
    pub fn standard() -> Topology {
        Topology(vec![
            Box::new(|i| crate::motion::stage::build(&i.cfg.motion).map(Some).map_err(|e| e.to_string())),
            Box::new(|i| Ok(crate::smooth::stage::build(&i.cfg.smooth))),
            Box::new(|i| crate::glm::stage::build(&i.cfg.glm, sim_roi(i.simulator)).map(Some)),
            Box::new(|i| crate::feedback::stage::build(&i.cfg.feedback, &i.cfg.glm, i.cfg.ingest.stop_after)),
            Box::new(|i| decode_stage(i).map(Some)),
        ])
    }
}

/// The simulated brain's grid and visual ROI, for `"sim"` masks and ROIs.
fn sim_roi(sim: Option<&Simulator>) -> Option<crate::glm::stage::SimRoi<'_>> {
    sim.map(|s| (s.dims(), s.anatomy().roi.as_slice()))
}

/// The decode stage: the model loaded, its decoder off the path (in calibration mode, the one
/// that fits the alignment as it goes); a pass-through without a model.
fn decode_stage(i: &Inputs<'_>) -> Result<Box<dyn Stage>, String> {
    let cfg = i.cfg;
    if cfg.decode.model.is_none() {
        return Ok(Box::new(Identity("decode")));
    }
    let stage = DecodeStage::new(&cfg.decode, i.gallery.cloned()).map_err(|e| e.to_string())?;
    let decoder = DecodeWorker::new(stage, &cfg.decode);
    let worker: Box<dyn Stage> = match cfg.decode.mode {
        crate::decode::Mode::Decode => Box::new(decoder),
        crate::decode::Mode::Calibrate => {
            let protocol = i.protocol.cloned().ok_or("calibration mode needs calibrate.protocol")?;
            let out = alignment_out(cfg, i.session_dir).ok_or("calibration mode needs decode.model")?;
            Box::new(CalibratingDecoder::new(decoder, protocol, cfg.calibrate.clone(), out)?)
        }
    };
    Ok(crate::decode::stage::dispatch(worker, cfg.decode.threads))
}

/// Where calibration mode saves the fitted alignment: `calibrate.out`, else the session
/// folder, else beside the model.
fn alignment_out(cfg: &Config, session_dir: Option<&std::path::Path>) -> Option<PathBuf> {
    match (&cfg.calibrate.out, session_dir, &cfg.decode.model) {
        (Some(out), _, _) => Some(out.clone()),
        (None, Some(dir), _) => Some(dir.join("alignment.safetensors")),
        (None, None, Some(model)) => {
            Some(model.join(format!("alignment-{}.safetensors", clock::utc_label(clock::unix_now()))))
        }
        (None, None, None) => None,
    }
}

/// The warning for a token that is configured (in `security.token` or `$MIRAGE_TOKEN`) and
/// that no listener will ask for, since the console and metrics listen on loopback only.
fn unenforced_token_warning(cfg: &Config) -> Option<String> {
    let from = match (&cfg.security.token, std::env::var_os(crate::access::TOKEN_ENV)) {
        (Some(_), _) => "security.token",
        (None, Some(_)) => crate::access::TOKEN_ENV,
        (None, None) => return None,
    };
    Some(format!(
        "{from} is set but not enforced: the console and the metrics endpoint listen on loopback \
         only, where any local user may connect; they ask for the token only beyond loopback"
    ))
}

/// Every reason a run can count, registered up front: the runner's, the sources' and sinks',
/// and the stages' typed errors and tallies.
pub fn counted_reasons() -> Vec<Reason> {
    [
        super::REASONS,
        crate::ingest::markers::REASONS,
        crate::console::REASONS,
        crate::listen::REASONS,
        crate::ingest::wire::REASONS,
        crate::ingest::REASONS,
        &[crate::event::EVENTS_DROPPED],
        crate::publish::REASONS,
        crate::publish::results::REASONS,
        crate::motion::REASONS,
        crate::glm::REASONS,
        crate::feedback::REASONS,
        crate::decode::REASONS,
        &[crate::calibrate::live::CALIBRATION_FAILED],
    ]
    .concat()
}

/// Opens the run's source on the ingest thread (LSL handles are not `Send`).
pub type OpenSource = Box<dyn FnOnce() -> Result<Box<dyn Source>, IngestError> + Send>;

/// A run's configuration with its inputs loaded: what the runner builds from.
pub struct Resolved {
    /// The configuration, validated.
    pub cfg: Config,
    /// Where volumes come from.
    pub uri: IngestUri,
    /// The PUB address, when publishing.
    pub publish: Option<Endpoint>,
    /// The senders (and results clients) let in (`ingest.allow`).
    pub allow: Allowlist,
    /// The token the web endpoints require, when one of them listens beyond loopback.
    pub web_token: Option<Token>,
    /// The ingest's CURVE (`ingest.curve`), loaded.
    pub ingest_curve: Option<Curve>,
    /// The PUB socket's CURVE (`publish.curve`), loaded.
    pub publish_curve: Option<Curve>,
    /// The session folder, `{time}` filled in (made only once every input has loaded).
    pub session_dir: Option<PathBuf>,
    /// The simulated run of `sim://` ingest, made once: the source plays it, and `"sim"` masks
    /// and ROIs are its anatomy's.
    pub simulator: Option<Simulator>,
    /// The volume path between ingest and publish, in order, each stage built by its own
    /// folder (a stage switched off is a pass-through that keeps its place).
    pub stages: Vec<Box<dyn Stage>>,
    /// The gallery, loaded once: the decode stage ranks against it, the console scores on it.
    pub gallery: Option<Arc<Gallery>>,
}

impl Resolved {
    /// Validates `cfg`, then loads every input it names and builds the standard topology;
    /// returns every error found, not just the first (validation errors alone when there are
    /// any: loading would repeat them).
    pub fn new(cfg: &Config) -> Result<Resolved, Vec<String>> {
        Resolved::with_topology(cfg, &Topology::standard())
    }

    /// As [`Resolved::new`], with the volume path `topology` builds.
    pub fn with_topology(cfg: &Config, topology: &Topology) -> Result<Resolved, Vec<String>> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        // Before any thread of ours starts and before a model loads: candle sizes its pool from
        // the environment once.
        crate::decode::limit_candle_threads(cfg.decode.threads);
        let mut errors = Vec::new();
        let uri = keep(&mut errors, cfg.ingest_uri().map_err(|e| e.to_string()));
        let allow = keep(&mut errors, Allowlist::parse(&cfg.ingest.allow)).unwrap_or_default();
        let exposed = |a: &Option<String>| a.as_deref().is_some_and(crate::config::beyond_loopback);
        let web_token = match exposed(&cfg.console.listen) || exposed(&cfg.publish.metrics) {
            true => keep(&mut errors, Token::resolve(cfg.security.token.as_deref())),
            false => {
                if let Some(warning) = unenforced_token_warning(cfg) {
                    tracing::warn!("{warning}");
                }
                None
            }
        };
        let ingest_curve = keep(&mut errors, Curve::load(&cfg.ingest.curve, "ingest.curve")).flatten();
        let publish_curve = keep(&mut errors, Curve::load(&cfg.publish.curve, "publish.curve")).flatten();
        let publish = keep(
            &mut errors,
            cfg.publish.uri.as_deref().map(parse_publish_uri).transpose().map_err(|e| e.to_string()),
        )
        .flatten();
        let simulator = match &uri {
            Some(IngestUri::Sim { sim, .. }) => {
                keep(&mut errors, Simulator::new(sim).map_err(|e| e.to_string()))
            }
            _ => None,
        };
        let gallery = match &cfg.decode.gallery {
            Some(dir) if cfg.decode.model.is_some() => {
                keep(&mut errors, Gallery::load(dir).map(Arc::new).map_err(|e| e.to_string()))
            }
            _ => None,
        };
        let protocol = match &cfg.calibrate.protocol {
            Some(path) => {
                keep(&mut errors, Protocol::load(path).map_err(|e| format!("calibrate.protocol: {e}")))
            }
            None => None,
        };
        let session_dir = cfg
            .record
            .dir
            .as_ref()
            .map(|d| PathBuf::from(d.replace("{time}", &clock::utc_label(clock::unix_now()))));
        let inputs = Inputs {
            cfg,
            simulator: simulator.as_ref(),
            gallery: gallery.as_ref(),
            protocol: protocol.as_ref(),
            session_dir: session_dir.as_deref(),
        };
        let built: Vec<Option<Option<Box<dyn Stage>>>> =
            topology.0.iter().map(|build| keep(&mut errors, build(&inputs))).collect();
        let (Some(uri), Some(built)) = (uri, built.into_iter().collect::<Option<Vec<_>>>()) else {
            return Err(errors);
        };
        let stages: Vec<Box<dyn Stage>> = built.into_iter().flatten().collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Resolved {
            cfg: cfg.clone(),
            uri,
            publish,
            allow,
            web_token,
            ingest_curve,
            publish_curve,
            session_dir,
            simulator,
            stages,
            gallery,
        })
    }

    /// The TR the configuration sets over the sender's headers: the URI's `?tr=`, else
    /// `ingest.tr`.
    pub fn configured_tr(&self) -> Option<f64> {
        self.uri.tr().or(self.cfg.ingest.tr)
    }

    /// The repetition time known before any volume: the configured one, else the simulator's.
    pub fn known_tr(&self) -> Option<f64> {
        let sim = match &self.uri {
            IngestUri::Sim { sim, .. } => Some(sim.tr),
            _ => None,
        };
        self.configured_tr().or(sim)
    }

    /// What opens the source on the ingest thread: the simulated run resolved once (taken out),
    /// or the transport the URI names, letting in only the senders `ingest.allow` and
    /// `ingest.curve` name.
    pub fn source_opener(&mut self) -> OpenSource {
        let cfg = &self.cfg;
        let limits = SourceLimits { max_voxels: cfg.ingest.max_voxels };
        let run = crate::volume::sanitize_run_id(&cfg.ingest.run);
        let policy =
            crate::ingest::zap::Policy { allow: self.allow.clone(), curve: self.ingest_curve.clone() };
        let (uri, simulator) = (self.uri.clone(), self.simulator.take());
        Box::new(move || match (simulator, &uri) {
            (Some(sim), IngestUri::Sim { playback, .. }) => {
                Ok(Box::new(SimSource::with_simulator(sim, *playback)) as Box<dyn Source>)
            }
            _ => open_source(&uri, limits, &run, &policy),
        })
    }

    /// The LSL stream of trial markers to read beside the source (`glm.markers`).
    pub fn marker_stream(&self) -> Option<String> {
        self.cfg.glm.markers.as_deref().and_then(|m| m.strip_prefix("lsl://")).map(str::to_string)
    }

    /// The LSL feedback outlet `publish.lsl_feedback` names: a channel per ROI (`glm.rois`;
    /// none with the GLM off).
    pub fn feedback_outlet(&self) -> Option<FeedbackOutlet> {
        let cfg = &self.cfg;
        let rois: Vec<String> = match cfg.glm.enabled {
            true => cfg.glm.rois.iter().map(|r| r.name.clone()).collect(),
            false => Vec::new(),
        };
        // With a recipe: its ROIs' channels (all of glm.rois unless it names some), then its value.
        let feedback = (cfg.feedback.recipe != crate::feedback::Recipe::None).then(|| {
            match cfg.feedback.rois.is_empty() {
                true => rois.clone(),
                false => cfg.feedback.rois.clone(),
            }
        });
        cfg.publish.lsl_feedback.clone().map(|name| FeedbackOutlet {
            name,
            rois,
            tr: self.known_tr(),
            feedback,
        })
    }

    /// The fields of the console's first event that describe the run (its stages are the
    /// runner's to add): source, mode, whether it decodes, thresholds and ROIs.
    pub fn console_hello(&self) -> Map<String, Value> {
        let cfg = &self.cfg;
        let mode = match cfg.decode.mode {
            crate::decode::Mode::Calibrate => "calibrate",
            crate::decode::Mode::Decode => "decode",
        };
        let mut hello = Map::new();
        hello.insert("version".into(), env!("CARGO_PKG_VERSION").into());
        hello.insert("source".into(), cfg.ingest.uri.clone().into());
        hello.insert("mode".into(), mode.into());
        hello.insert("decoding".into(), cfg.decode.model.is_some().into());
        hello.insert("fd_threshold_mm".into(), cfg.motion.fd_threshold_mm.into());
        hello.insert("latency_budget_ms".into(), cfg.decode.latency_budget_ms.into());
        let rois: Vec<Value> = cfg.glm.rois.iter().map(|r| r.name.clone().into()).collect();
        hello.insert("rois".into(), rois.into());
        hello.insert("report".into(), false.into());
        hello
    }
}

/// The value of `r`, or `None` with its error kept.
fn keep<T>(errors: &mut Vec<String>, r: Result<T, String>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_error_is_reported_at_once_and_nothing_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = super::super::quiet::sim_config(4);
        cfg.record.dir = Some(dir.path().join("session").display().to_string());
        // Both pass validation (the files exist) and fail to load.
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join(crate::decode::model::CONFIG_FILE), "not json").unwrap();
        let mask = dir.path().join("mask.nii.gz");
        std::fs::write(&mask, "not a nifti").unwrap();
        cfg.decode.model = Some(model);
        cfg.glm.mask = mask.display().to_string();
        let errors = Resolved::new(&cfg).err().expect("two inputs do not load");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("mask")), "{errors:?}");
        assert!(!dir.path().join("session").exists(), "no session folder for a run that cannot start");
    }

    #[test]
    fn a_simulated_run_is_made_once_and_the_volume_path_built_from_the_stage_folders() {
        let mut cfg = super::super::quiet::sim_config(4);
        cfg.glm.mask = crate::glm::SIM_ROI.into();
        let r = Resolved::new(&cfg).unwrap_or_else(|e| panic!("{e:?}"));
        let sim = r.simulator.as_ref().expect("sim:// ingest makes its simulator once");
        assert_eq!(r.known_tr(), Some(sim.config().tr));
        assert!(r.session_dir.is_none());
        let names: Vec<&str> = r.stages.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["motion", "glm", "decode"]);
        // No model: decoding is a pass-through that keeps its place, with nothing off the path.
        let mut stages = r.stages;
        assert!(stages[2].off_path().is_none());
    }
}
