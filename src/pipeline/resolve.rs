//! The configuration resolved: every input it names loaded and checked once, with every error
//! collected, before any thread, socket or session file of the run exists. The runner builds
//! every stage and sink from a [`Resolved`], never from the raw [`Config`] paths.

use std::path::PathBuf;
use std::sync::Arc;

use crate::access::Token;
use crate::calibrate::protocol::Protocol;
use crate::clock;
use crate::config::Config;
use crate::curve::Curve;
use crate::decode::gallery::Gallery;
use crate::decode::DecodeStage;
use crate::ingest::allow::Allowlist;
use crate::ingest::uri::parse_publish_uri;
use crate::ingest::{Endpoint, IngestUri};
use crate::sim::Simulator;
use crate::stage::Stage;

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
    /// The volume path between ingest and the decode hand-off, in order, each stage built by
    /// its own folder (a stage switched off is a pass-through that keeps its place).
    pub stages: Vec<Box<dyn Stage>>,
    /// The gallery, loaded once: the decode stage ranks against it, the console scores on it.
    pub gallery: Option<Arc<Gallery>>,
    /// The decode stage (model, alignment and gallery loaded), when a model is configured.
    pub decode: Option<DecodeStage>,
    /// The calibration protocol, when one is configured.
    pub protocol: Option<Protocol>,
}

impl Resolved {
    /// Validates `cfg`, then loads every input it names; returns every error found, not just
    /// the first (validation errors alone when there are any: loading would repeat them).
    pub fn new(cfg: &Config) -> Result<Resolved, Vec<String>> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut errors = Vec::new();
        let uri = keep(&mut errors, cfg.ingest_uri().map_err(|e| e.to_string()));
        let allow = keep(&mut errors, Allowlist::parse(&cfg.ingest.allow)).unwrap_or_default();
        let exposed = |a: &Option<String>| a.as_deref().is_some_and(crate::config::beyond_loopback);
        let web_token = match exposed(&cfg.console.listen) || exposed(&cfg.publish.metrics) {
            true => keep(&mut errors, Token::resolve(cfg.security.token.as_deref())),
            false => None,
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
        let sim_roi = simulator.as_ref().map(|s| (s.dims(), s.anatomy().roi.as_slice()));
        // The topology: adding a stage to the volume path is one line here.
        let stages: Vec<Option<Box<dyn Stage>>> = vec![
            keep(&mut errors, crate::motion::stage::build(&cfg.motion).map_err(|e| e.to_string())),
            keep(&mut errors, crate::glm::stage::build(&cfg.glm, sim_roi)),
        ];
        let gallery = match &cfg.decode.gallery {
            Some(dir) if cfg.decode.model.is_some() => {
                keep(&mut errors, Gallery::load(dir).map(Arc::new).map_err(|e| e.to_string()))
            }
            _ => None,
        };
        let decode = match &cfg.decode.model {
            Some(_) => {
                keep(&mut errors, DecodeStage::new(&cfg.decode, gallery.clone()).map_err(|e| e.to_string()))
            }
            None => None,
        };
        let protocol = match &cfg.calibrate.protocol {
            Some(path) => {
                keep(&mut errors, Protocol::load(path).map_err(|e| format!("calibrate.protocol: {e}")))
            }
            None => None,
        };
        let (Some(uri), Some(stages)) = (uri, stages.into_iter().collect::<Option<Vec<_>>>()) else {
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let session_dir = cfg
            .record
            .dir
            .as_ref()
            .map(|d| PathBuf::from(d.replace("{time}", &clock::utc_label(clock::unix_now()))));
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
            decode,
            protocol,
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

    /// Where calibration mode saves the fitted alignment: `calibrate.out`, else the session
    /// folder, else beside the model.
    pub fn alignment_out(&self) -> Option<PathBuf> {
        let cfg = &self.cfg;
        match (&cfg.calibrate.out, &self.session_dir, &cfg.decode.model) {
            (Some(out), _, _) => Some(out.clone()),
            (None, Some(dir), _) => Some(dir.join("alignment.safetensors")),
            (None, None, Some(model)) => {
                Some(model.join(format!("alignment-{}.safetensors", clock::utc_label(clock::unix_now()))))
            }
            (None, None, None) => None,
        }
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
        let names: Vec<&str> = r.stages.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["motion", "glm"]);
        assert!(r.decode.is_none());
        assert_eq!(r.known_tr(), Some(sim.config().tr));
        assert!(r.session_dir.is_none());
    }
}
