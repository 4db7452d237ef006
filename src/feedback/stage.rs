//! The feedback stage, after the GLM: turns each volume's ROI means (and motion) into the
//! recipe's `feedback` value, which publish adds to the `roi` message, the LSL outlet and the
//! results server.

use super::opennft::{Combine, Display, Mode, OpenNftFeedback, Protocol};
use super::steps::{Steps, StepsFeedback};
use super::{CombineRois, Feedback, FeedbackConfig, Recipe};
use crate::event::{Event, LiveEvents, Onset};
use crate::frame::{Frame, FrameKind, Tally};
use crate::glm::GlmOutput;
use crate::motion::MotionEstimate;
use crate::stage::{Stage, StageError};

/// Blocks in seconds from the run's first volume: `(onset, duration)`.
type Blocks = Vec<(f64, f64)>;

/// A recipe, made at the first volume (it needs the TR).
enum Made {
    OpenNft(OpenNftFeedback),
    Steps(StepsFeedback),
}

impl Made {
    fn volumes(&self) -> usize {
        match self {
            Made::OpenNft(r) => r.volumes(),
            Made::Steps(r) => r.volumes(),
        }
    }

    /// The value shown and each ROI's.
    fn step(&mut self, means: &[f64], motion: Option<[f64; 6]>, nuisance: Option<f64>) -> (f64, Vec<f64>) {
        match self {
            Made::OpenNft(r) => {
                let s = r.step(means, motion);
                (s.display, s.rois.iter().map(|r| r.shown).collect())
            }
            Made::Steps(r) => {
                let s = r.step(means, motion, nuisance);
                (s.display, s.rois.iter().map(|r| r.shown).collect())
            }
        }
    }
}

/// The feedback stage: the configured recipe over the ROI means, after the GLM.
pub struct FeedbackStage {
    cfg: FeedbackConfig,
    blocks: Blocks,
    display: Blocks,
    /// The named baseline blocks (none: every volume in no other block).
    baseline: Option<Blocks>,
    /// The ROIs' indices in the GLM's ROI list, and their names.
    rois: Vec<usize>,
    names: Vec<String>,
    /// The nuisance ROI's index in the GLM's ROI list.
    nuisance: Option<usize>,
    volumes: usize,
    /// An event's duration when it gives none (`glm.default_duration_s`).
    default_duration: f64,
    /// With `markers`: the run's start on the daemon's clock, and events not yet placed.
    t0: Option<f64>,
    pending: Vec<Event>,
    made: Option<Made>,
}

impl FeedbackStage {
    /// Places the pending block markers at `tr`; returns how many were refused. Each is tried
    /// alone: one that does not fit the protocol is dropped and the blocks are as before it.
    fn place_markers(&mut self, tr: f64) -> u64 {
        let (Some(t0), Some(Made::Steps(_))) = (self.t0, &self.made) else { return 0 };
        let mut refused = 0;
        let mut placed = None;
        for e in std::mem::take(&mut self.pending) {
            let regulation = e.condition == self.cfg.regulation;
            if !regulation && Some(&e.condition) != self.cfg.baseline.as_ref() {
                continue;
            }
            let onset = match e.onset {
                Onset::Relative(s) => s,
                Onset::Absolute(t) => t - t0,
            };
            let block = (onset, e.duration.unwrap_or(self.default_duration));
            let before = (self.blocks.len(), self.baseline.clone());
            match regulation {
                true => self.blocks.push(block),
                false => self.baseline.get_or_insert_with(Vec::new).push(block),
            }
            match self.protocol(tr) {
                Ok(protocol) => placed = Some(protocol),
                Err(why) => {
                    tracing::warn!("feedback: {} marker at {onset:.2} s refused: {why}", e.condition);
                    refused += 1;
                    self.blocks.truncate(before.0);
                    self.baseline = before.1;
                }
            }
        }
        if let (Some(protocol), Some(Made::Steps(recipe))) = (placed, self.made.as_mut()) {
            recipe.set_protocol(protocol);
        }
        refused
    }

    /// The protocol in volumes at `tr` seconds.
    fn protocol(&self, tr: f64) -> Result<Protocol, String> {
        let volumes = |blocks: &Blocks| {
            blocks
                .iter()
                .map(|&(onset, duration)| {
                    let first = (onset / tr).round() as usize + 1;
                    (first, first + ((duration / tr).round() as usize).max(1) - 1)
                })
                .collect()
        };
        let baseline = self.baseline.as_ref().map(volumes);
        Protocol::with_baseline(
            self.volumes,
            tr * 1000.0,
            volumes(&self.blocks),
            volumes(&self.display),
            baseline,
        )
        .map_err(|e| format!("feedback protocol: {e}"))
    }
}

impl Stage for FeedbackStage {
    fn name(&self) -> &'static str {
        "feedback"
    }

    fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
        if frame.kind != FrameKind::Volume {
            return Ok(());
        }
        let err = |message: String| StageError { stage: "feedback", reason: super::FEEDBACK.name, message };
        let Some(glm) = frame.outputs.get::<GlmOutput>() else { return Ok(()) };
        let means: Vec<f64> =
            self.rois.iter().map(|&i| glm.roi.get(i).map_or(f64::NAN, |r| r.mean)).collect();
        let motion = frame.outputs.get::<MotionEstimate>().map(|m| {
            let p = &m.params;
            [p.trans[0], p.trans[1], p.trans[2], p.rot[0], p.rot[1], p.rot[2]]
        });
        let nuisance = self.nuisance.map(|i| glm.roi.get(i).map_or(f64::NAN, |r| r.mean));
        if self.cfg.markers {
            if let Some(events) = frame.outputs.get::<LiveEvents>() {
                self.pending.extend(events.0.iter().cloned());
            }
        }
        if self.made.is_none() {
            let tr = frame.volume.tr.ok_or_else(|| err("the recipe needs the TR: set ingest.tr".into()))?;
            let v = &frame.volume;
            self.t0 = Some(v.acq_time.unwrap_or(v.recv_time) - v.index as f64 * tr);
            let combine = match self.cfg.combine {
                CombineRois::Mean => Combine::Mean,
                CombineRois::Median => Combine::Median,
                CombineRois::Difference => Combine::Difference(0, 1),
                CombineRois::Weighted => Combine::Weighted(self.cfg.weights.clone()),
            };
            let display = Display {
                max: self.cfg.max,
                min: self.cfg.min,
                decimals: self.cfg.decimals,
                negative: self.cfg.negative,
            };
            let protocol = self.protocol(tr).map_err(err)?;
            let n = self.rois.len();
            let c = &self.cfg;
            self.made = Some(match c.recipe {
                Recipe::Steps => Made::Steps(StepsFeedback::new(
                    steps_of(c, self.nuisance.is_some()),
                    protocol,
                    n,
                    combine,
                    display,
                )),
                recipe => Made::OpenNft(OpenNftFeedback::new(
                    protocol,
                    match recipe {
                        Recipe::OpennftIntermittent => Mode::Intermittent,
                        _ => Mode::Continuous,
                    },
                    n,
                    combine,
                    display,
                    c.motion_regressors,
                )),
            });
        }
        if !self.pending.is_empty() {
            let refused = frame.volume.tr.map_or(0, |tr| self.place_markers(tr));
            if refused > 0 {
                frame.outputs.update::<Tally>(|t| t.0.push((super::FEEDBACK_MARKER.name, refused)));
            }
        }
        let Some(made) = self.made.as_mut() else { return Ok(()) };
        if made.volumes() >= self.volumes {
            frame.outputs.insert(Feedback { value: None, rois: Vec::new() });
            return Err(err(format!("volume past the planned {} (feedback.volumes)", self.volumes)));
        }
        let (value, each) = made.step(&means, motion, nuisance);
        let finite = |v: f64| Some(v).filter(|v| v.is_finite());
        let rois = self.names.iter().zip(each).map(|(name, v)| (name.clone(), finite(v))).collect();
        frame.outputs.insert(Feedback { value: finite(value), rois });
        Ok(())
    }
}

/// The stage `cfg` asks for, or none (`recipe = "none"`); an error names what is missing.
pub fn build(
    cfg: &FeedbackConfig,
    glm: &crate::glm::GlmConfig,
    stop_after: Option<u64>,
) -> Result<Option<Box<dyn Stage>>, String> {
    if cfg.recipe == Recipe::None {
        return Ok(None);
    }
    if !glm.enabled || glm.rois.is_empty() {
        return Err("feedback.recipe needs the GLM on and glm.rois".into());
    }
    let find = |key: &str, name: &String| {
        glm.rois.iter().position(|r| &r.name == name).ok_or_else(|| {
            let known: Vec<&str> = glm.rois.iter().map(|r| r.name.as_str()).collect();
            format!("feedback.{key}: no ROI {name:?} in glm.rois ({})", known.join(", "))
        })
    };
    let nuisance = cfg.nuisance.as_ref().map(|name| find("nuisance", name)).transpose()?;
    if nuisance.is_some() && cfg.recipe != Recipe::Steps {
        return Err("feedback.nuisance: only recipe = \"steps\" regresses a nuisance ROI out".into());
    }
    let rois: Vec<usize> = match cfg.rois.is_empty() {
        true => (0..glm.rois.len()).filter(|&i| Some(i) != nuisance).collect(),
        false => cfg.rois.iter().map(|name| find("rois", name)).collect::<Result<Vec<_>, _>>()?,
    };
    if let Some(i) = nuisance.filter(|i| rois.contains(i)) {
        return Err(format!("feedback.nuisance: {:?} is also a feedback ROI", glm.rois[i].name));
    }
    if rois.is_empty() {
        return Err("feedback.rois: no ROI left besides the nuisance ROI".into());
    }
    if cfg.combine == CombineRois::Difference && rois.len() != 2 {
        return Err("feedback.combine = \"difference\" needs exactly two ROIs".into());
    }
    if cfg.combine == CombineRois::Weighted && cfg.weights.len() != rois.len() {
        return Err(format!("feedback.weights: {} weights for {} ROIs", cfg.weights.len(), rois.len()));
    }
    let volumes = cfg.volumes.or(stop_after.map(|n| n as usize)).ok_or(
        "feedback.volumes: OpenNFT's linear trend spans the planned run; give its length in volumes",
    )?;
    if cfg.markers && cfg.recipe != Recipe::Steps {
        return Err(
            "feedback.markers: only recipe = \"steps\" takes its blocks from live markers (OpenNFT's \
                    recipes read the whole protocol before the run)"
                .into(),
        );
    }
    let path = cfg.protocol.as_ref().or(glm.events.as_ref());
    let events = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("feedback.protocol {}: {e}", path.display()))?;
            crate::glm::events::parse_events_tsv(&text, &path.display().to_string())
                .map_err(|e| e.to_string())?
        }
        None if cfg.markers => Vec::new(),
        None => return Err("feedback.protocol: give the events file of the regulation blocks".into()),
    };
    let file = path.map_or_else(String::new, |p| p.display().to_string());
    let blocks = blocks_of(&events, &cfg.regulation, glm.default_duration_s);
    if blocks.is_empty() && !cfg.markers {
        return Err(format!("feedback.regulation: no {:?} rows in {file}", cfg.regulation));
    }
    let baseline = match &cfg.baseline {
        Some(name) => match blocks_of(&events, name, glm.default_duration_s) {
            b if b.is_empty() && !cfg.markers => {
                return Err(format!("feedback.baseline: no {name:?} rows in {file}"));
            }
            b if b.is_empty() => None,
            b => Some(b),
        },
        None => None,
    };
    let display = match cfg.recipe {
        Recipe::OpennftIntermittent => blocks_of(&events, &cfg.display, glm.default_duration_s),
        _ => Vec::new(),
    };
    let names = rois.iter().map(|&i: &usize| glm.rois[i].name.clone()).collect();
    Ok(Some(Box::new(FeedbackStage {
        cfg: cfg.clone(),
        blocks,
        display,
        baseline,
        rois,
        names,
        nuisance,
        volumes,
        default_duration: glm.default_duration_s,
        t0: None,
        pending: Vec::new(),
        made: None,
    })))
}

/// The steps `cfg` turns on; `nuisance` when a nuisance ROI is given.
pub fn steps_of(cfg: &FeedbackConfig, nuisance: bool) -> Steps {
    Steps {
        trend: cfg.trend,
        task: cfg.task_regressors,
        motion: cfg.motion_regressors,
        nuisance,
        despike: cfg.despike,
        smooth_s: cfg.smooth_s,
        normalise: cfg.normalise,
        full_scale: cfg.full_scale,
    }
}

/// The `(onset, duration)` of the events whose condition is `condition`.
fn blocks_of(events: &[Event], condition: &str, default_duration: f64) -> Blocks {
    events
        .iter()
        .filter(|e| e.condition == condition)
        .filter_map(|e| match e.onset {
            Onset::Relative(s) => Some((s, e.duration.unwrap_or(default_duration))),
            Onset::Absolute(_) => None,
        })
        .collect()
}
