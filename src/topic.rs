//! One typed header per publish topic: the schema publish sends and the console, the results
//! server, the bench and the tests read back (the README's topic table is checked against it).
//! The headers are wire types of their own, built from no stage's internals: a stage can
//! change its structs without changing what subscribers read.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::frame::IngestFlags;
use crate::message::{Message, Payload};
use crate::volume::Affine;

/// A topic's header type and its name on the wire (frame 0).
pub trait Topic: Serialize {
    /// The topic.
    const NAME: &'static str;

    /// The message with this header and `payloads`.
    fn message(&self, payloads: Vec<Payload>) -> Message {
        let header = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        Message { topic: Self::NAME, header, payloads }
    }
}

/// Reads a published header of topic `T` back (`topic` is the name it came with).
pub fn read<T: Topic + DeserializeOwned>(topic: &str, header: &serde_json::Value) -> Result<T, String> {
    if topic != T::NAME {
        return Err(format!("a {topic:?} message is not {:?}", T::NAME));
    }
    T::deserialize(header).map_err(|e| format!("{}: {e}", T::NAME))
}

/// `volume`: each processed volume; payload `data`, float32 `[x, y, z]`, order F.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeHeader {
    /// Arrival number in the session.
    pub seq: u64,
    /// The sender's volume index.
    pub index: u64,
    /// Run id.
    pub run: String,
    /// Grid size.
    pub shape: [usize; 3],
    /// Voxel-to-world matrix (mm).
    pub affine: Affine,
    /// Voxel size (mm).
    pub voxel_size: [f64; 3],
    /// Repetition time (s), when known.
    pub tr: Option<f64>,
    /// Acquisition time (LSL clock), when the sender gave one.
    pub acq_time: Option<f64>,
    /// Receipt time (the daemon's monotonic clock).
    pub recv_time: f64,
    /// Index bookkeeping from ingest.
    pub flags: IngestFlags,
    /// Errors stages reported for this volume.
    pub stage_errors: Vec<String>,
    /// Milliseconds per stage, queue wait included.
    pub latency_ms: BTreeMap<String, f64>,
}

impl Topic for VolumeHeader {
    const NAME: &'static str = "volume";
}

/// `motion`: a realigned volume's six parameters (fMRIPrep's names), matrix and displacement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MotionHeader {
    /// Arrival number in the session.
    pub seq: u64,
    /// The sender's volume index.
    pub index: u64,
    /// Run id.
    pub run: String,
    /// Acquisition time (LSL clock), when known.
    pub acq_time: Option<f64>,
    /// Translation along x (mm).
    pub trans_x: f64,
    /// Translation along y (mm).
    pub trans_y: f64,
    /// Translation along z (mm).
    pub trans_z: f64,
    /// Rotation about x (rad).
    pub rot_x: f64,
    /// Rotation about y (rad).
    pub rot_y: f64,
    /// Rotation about z (rad).
    pub rot_z: f64,
    /// The rigid transform as a world matrix.
    pub matrix: Affine,
    /// Framewise displacement (mm, Power et al. 2012).
    pub framewise_displacement: f64,
    /// Whether it exceeded `motion.fd_threshold_mm`.
    pub fd_exceeded: bool,
    /// Optimiser iterations.
    pub iterations: u32,
    /// Final cost (null when not finite).
    pub cost: Option<f64>,
    /// Whether the optimiser converged.
    pub converged: bool,
    /// The reference volume's index.
    pub reference_index: Option<u64>,
}

impl MotionHeader {
    /// The six parameters in `PARAM_NAMES` order.
    pub fn params(&self) -> [f64; 6] {
        [self.trans_x, self.trans_y, self.trans_z, self.rot_x, self.rot_y, self.rot_z]
    }
}

impl Topic for MotionHeader {
    const NAME: &'static str = "motion";
}

/// One ROI's reading in a `roi` message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoiReading {
    /// ROI name.
    pub name: String,
    /// Mean signal (null when not finite).
    pub mean: Option<f64>,
    /// Drift- and motion-detrended percent signal change, null until estimable.
    pub psc: Option<f64>,
    /// This ROI's own feedback value, shown as the recipe's `feedback` is (null without a recipe
    /// or where undefined).
    #[serde(default)]
    pub feedback: Option<f64>,
}

/// `roi`: each configured ROI's feedback for one volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoiHeader {
    /// Arrival number in the session.
    pub seq: u64,
    /// The sender's volume index.
    pub index: u64,
    /// Run id.
    pub run: String,
    /// Acquisition time (LSL clock), when known.
    pub acq_time: Option<f64>,
    /// One reading per ROI.
    pub rois: Vec<RoiReading>,
    /// The feedback recipe's value shown (`feedback.recipe`): 0 outside regulation blocks, null
    /// where undefined or with no recipe.
    #[serde(default)]
    pub feedback: Option<f64>,
}

impl Topic for RoiHeader {
    const NAME: &'static str = "roi";
}

/// The fields that describe a trial, shared by `betas` and `decode`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialHeader {
    /// Run id.
    pub run: String,
    /// Trial number in the run.
    pub trial: u64,
    /// Stimulus number, when the event gave one.
    pub stim: Option<u64>,
    /// Condition (`seen`, `imagery`, …).
    pub condition: String,
    /// Onset (s from the run's first volume).
    pub onset: f64,
    /// Duration (s).
    pub duration: f64,
    /// Volumes the estimate used.
    pub n_volumes: usize,
    /// Whether the design could estimate it.
    pub estimable: bool,
    /// An end-of-run estimate (from all volumes) rather than a live one.
    pub at_run_end: bool,
}

/// `betas`: a trial's betas when its window closes; payloads `betas` (float32, one per mask
/// voxel) and `voxels` (uint32 grid indices, x fastest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BetasHeader {
    /// The trial.
    #[serde(flatten)]
    pub trial: TrialHeader,
    /// Index of the volume that closed it.
    pub index: u64,
    /// Repetition time (s), when known.
    pub tr: Option<f64>,
    /// Grid size.
    pub shape: [usize; 3],
}

impl Topic for BetasHeader {
    const NAME: &'static str = "betas";
}

/// A ranked gallery candidate in a `decode` message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Match {
    /// Position in the gallery.
    pub index: usize,
    /// Its id.
    pub id: String,
    /// Its label.
    pub label: String,
    /// Weighted mean cosine similarity.
    pub score: f64,
}

/// One head's output in a `decode` message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadShape {
    /// Head name (its payload's name).
    pub name: String,
    /// Output shape.
    pub shape: Vec<usize>,
}

/// `decode`: a decoded trial; payloads one float32 array per head, `NAME.latent` per latent
/// head, `c_img`/`c_txt` (the fusion mix) and `pixels_png`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecodeHeader {
    /// The trial.
    #[serde(flatten)]
    pub trial: TrialHeader,
    /// Best gallery matches, best first.
    pub top: Vec<Match>,
    /// Each head's output.
    pub heads: Vec<HeadShape>,
    /// Heads decoded only to their latent.
    pub latents: Vec<String>,
    /// Where it ran (`cpu`, `cuda:0`).
    pub device: String,
    /// The alignment applied (`none`, `zscore-run`, `head`, …).
    pub alignment: String,
    /// Decode time (ms).
    pub latency_ms: f64,
    /// A live decode that took longer than `decode.latency_budget_ms`.
    pub over_budget: bool,
    /// When the trial closed (the daemon's monotonic clock).
    pub closed_time: Option<f64>,
}

impl Topic for DecodeHeader {
    const NAME: &'static str = "decode";
}

/// `picture`: a MindEye2 trial's picture (the SD VAE's decode of its blurry latent), after its
/// `decode` message; payload `picture_png` (PNG bytes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PictureHeader {
    /// The trial.
    #[serde(flatten)]
    pub trial: TrialHeader,
    /// Where it ran (`cpu`, `cuda:0`).
    pub device: String,
    /// Time to make the picture (ms).
    pub latency_ms: f64,
    /// Trial close → picture at publish later than `decode.latency_budget_ms`.
    pub over_budget: bool,
    /// When the trial closed (the daemon's monotonic clock).
    pub closed_time: Option<f64>,
}

impl Topic for PictureHeader {
    const NAME: &'static str = "picture";
}

/// `calibration`: where calibration mode stands (collecting, fitting, done, failed or
/// incomplete), with the fit's progress and, once done, what it kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CalibrationHeader {
    /// `collecting`, `fitting`, `done`, `failed` or `incomplete` (the run ended first).
    pub phase: String,
    /// Calibration trials collected so far.
    pub collected: usize,
    /// Trials the protocol cues.
    pub needed: usize,
    /// The trial just collected.
    pub trial: Option<u64>,
    /// Its stimulus number (as in `betas` and `decode`; the gallery id is its decimal).
    pub stim: Option<u64>,
    /// Fit progress: step and most steps of the current phase.
    pub step: Option<(usize, usize)>,
    /// What the fit is doing (`prepare`, `inputs`, `fold k/n`, `refit`).
    pub fit_stage: Option<String>,
    /// Current training loss.
    pub loss: Option<f64>,
    /// Current held-out loss.
    pub heldout_loss: Option<f64>,
    /// The finished fit: what was kept and its held-out estimates (the README's calibration
    /// section describes its fields).
    pub report: Option<serde_json::Value>,
    /// Where the alignment was saved.
    pub path: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}

impl Topic for CalibrationHeader {
    const NAME: &'static str = "calibration";
}

/// Percentiles of one latency, in milliseconds; with no samples they are sent as null, not 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    #[serde(deserialize_with = "null_as_zero")]
    pub p50: f64,
    /// 90th percentile.
    #[serde(deserialize_with = "null_as_zero")]
    pub p90: f64,
    /// 99th percentile.
    #[serde(deserialize_with = "null_as_zero")]
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(deserialize_with = "null_as_zero")]
    pub p999: f64,
    /// Largest.
    #[serde(deserialize_with = "null_as_zero")]
    pub max: f64,
}

impl Serialize for LatencySummary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let value = |v: f64| Some(v).filter(|_| self.count > 0);
        let mut st = s.serialize_struct("LatencySummary", 6)?;
        st.serialize_field("count", &self.count)?;
        st.serialize_field("p50", &value(self.p50))?;
        st.serialize_field("p90", &value(self.p90))?;
        st.serialize_field("p99", &value(self.p99))?;
        st.serialize_field("p999", &value(self.p999))?;
        st.serialize_field("max", &value(self.max))?;
        st.end()
    }
}

/// A percentile sent as null (no samples) reads as 0 beside its count of 0.
fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(0.0))
}

/// Nearest-rank percentiles of the latencies of the last volumes (see `rolling_ms`), ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RollingSummary {
    /// Volumes covered.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// One edge's state in a `status` message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Edge name.
    pub name: String,
    /// Messages queued now.
    pub depth: usize,
    /// Message capacity.
    pub capacity: usize,
    /// What a producer does when it is full.
    pub policy: crate::queue::WhenFull,
    /// Highest depth seen.
    pub max_depth: usize,
    /// Messages passed.
    pub pushed: u64,
    /// Messages dropped by a full edge.
    pub dropped: u64,
    /// Pushes that waited for room.
    pub blocked: u64,
    /// Total time producers waited, ms.
    pub blocked_ms: f64,
}

/// `status`: every counter, queue and latency of the run, once per `publish.status_interval_s`
/// (and last at the end of the run).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusHeader {
    /// Seconds since the pipeline started.
    pub uptime_s: f64,
    /// Volumes accepted by ingest.
    pub received: u64,
    /// Messages refused by ingest.
    pub rejected: u64,
    /// Volumes written to the session folder.
    pub recorded: u64,
    /// Volume messages published.
    pub published: u64,
    /// Volumes whose index repeated.
    pub duplicates: u64,
    /// Indices missing between received volumes.
    pub missing: u64,
    /// Volumes that arrived after a higher index.
    pub out_of_order: u64,
    /// Trials decoded and published.
    pub decoded: u64,
    /// Calibration mode's progress (`collecting 5/12`, `fitting 40/200`, `done`, …).
    pub calibration: Option<String>,
    /// Errors by counter name.
    pub errors: BTreeMap<String, u64>,
    /// The latency keys in path order: ingest, each stage of the topology, publish.
    pub stages: Vec<String>,
    /// Queue states, in path order.
    pub queues: Vec<QueueSnapshot>,
    /// Latency per stage, ms (queue wait included).
    pub stage_latency_ms: BTreeMap<String, LatencySummary>,
    /// Receipt to publish, ms.
    pub end_to_end_ms: LatencySummary,
    /// Acquisition (sender clock) to publish, ms, where the sender gave acquisition times.
    pub acquisition_to_publish_ms: LatencySummary,
    /// Trial closed by the GLM to its decode published, ms (off the volume path).
    pub trial_decode_ms: LatencySummary,
    /// Per stage and `end_to_end`, over the last volumes (`metrics::ROLLING`), ms.
    pub rolling_ms: BTreeMap<String, RollingSummary>,
}

impl Topic for StatusHeader {
    const NAME: &'static str = "status";
}

#[cfg(test)]
impl TrialHeader {
    /// A live trial of run `r` showing `stim` under `condition`, for tests.
    pub(crate) fn sample(trial: u64, stim: u64, condition: &str) -> TrialHeader {
        TrialHeader {
            run: "r".into(),
            trial,
            stim: Some(stim),
            condition: condition.into(),
            onset: 12.0,
            duration: 4.0,
            n_volumes: 9,
            estimable: true,
            at_run_end: false,
        }
    }
}

#[cfg(test)]
impl MotionHeader {
    /// Volume 0 of run `r`, not moved, for tests.
    pub(crate) fn sample() -> MotionHeader {
        MotionHeader {
            seq: 0,
            index: 0,
            run: "r".into(),
            acq_time: None,
            trans_x: 0.0,
            trans_y: 0.0,
            trans_z: 0.0,
            rot_x: 0.0,
            rot_y: 0.0,
            rot_z: 0.0,
            matrix: crate::volume::IDENTITY_AFFINE,
            framewise_displacement: 0.0,
            fd_exceeded: false,
            iterations: 0,
            cost: None,
            converged: true,
            reference_index: Some(0),
        }
    }
}

#[cfg(test)]
impl DecodeHeader {
    /// A CPU decode of `trial` with no alignment whose best match is gallery item `best`,
    /// for tests.
    pub(crate) fn sample(trial: TrialHeader, best: usize, score: f64) -> DecodeHeader {
        DecodeHeader {
            trial,
            top: vec![Match { index: best, id: best.to_string(), label: format!("stimulus {best}"), score }],
            heads: vec![HeadShape { name: "image".into(), shape: vec![4] }],
            latents: Vec::new(),
            device: "cpu".into(),
            alignment: "none".into(),
            latency_ms: 3.0,
            over_budget: false,
            closed_time: Some(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_without_samples_reads_null_and_one_with_samples_its_numbers() {
        let none = serde_json::to_value(LatencySummary::default()).unwrap();
        assert_eq!(none["count"], 0);
        assert!(["p50", "p90", "p99", "p999", "max"].iter().all(|k| none[*k].is_null()), "{none}");
        assert_eq!(serde_json::from_value::<LatencySummary>(none).unwrap(), LatencySummary::default());
        let some = LatencySummary { count: 3, p50: 1.5, p90: 2.0, p99: 2.5, p999: 2.5, max: 3.0 };
        let v = serde_json::to_value(some).unwrap();
        assert_eq!(v["p50"], 1.5);
        assert_eq!(serde_json::from_value::<LatencySummary>(v).unwrap(), some);
    }

    fn trial() -> TrialHeader {
        TrialHeader::sample(3, 7, "imagery")
    }

    /// A header as its topic and JSON.
    fn s<T: Topic>(h: T) -> (&'static str, serde_json::Value) {
        (T::NAME, serde_json::to_value(&h).unwrap())
    }

    fn samples() -> Vec<(&'static str, serde_json::Value)> {
        let eye = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
        vec![
            s(VolumeHeader {
                seq: 1,
                index: 1,
                run: "r".into(),
                shape: [2, 2, 2],
                affine: eye,
                voxel_size: [1.0; 3],
                tr: Some(2.0),
                acq_time: None,
                recv_time: 0.5,
                flags: IngestFlags::default(),
                stage_errors: Vec::new(),
                latency_ms: BTreeMap::new(),
            }),
            s(MotionHeader {
                seq: 1,
                index: 1,
                run: "r".into(),
                acq_time: None,
                trans_x: 0.1,
                trans_y: 0.2,
                trans_z: 0.3,
                rot_x: 0.01,
                rot_y: 0.02,
                rot_z: 0.03,
                matrix: eye,
                framewise_displacement: 0.4,
                fd_exceeded: false,
                iterations: 4,
                cost: None,
                converged: true,
                reference_index: Some(0),
            }),
            s(RoiHeader {
                seq: 1,
                index: 1,
                run: "r".into(),
                acq_time: None,
                rois: vec![RoiReading {
                    name: "v1".into(),
                    mean: Some(1.0),
                    psc: None,
                    feedback: Some(40.0),
                }],
                feedback: Some(40.0),
            }),
            s(BetasHeader { trial: trial(), index: 9, tr: Some(2.0), shape: [2, 2, 2] }),
            s(DecodeHeader::sample(trial(), 7, 0.5)),
            s(PictureHeader {
                trial: trial(),
                device: "cpu".into(),
                latency_ms: 900.0,
                over_budget: true,
                closed_time: Some(1.0),
            }),
            s(CalibrationHeader { phase: "collecting".into(), ..Default::default() }),
            s(crate::metrics::Metrics::new(0.0).snapshot()),
        ]
    }

    #[test]
    fn headers_read_back_equal_and_the_wrong_topic_is_refused() {
        let b = BetasHeader { trial: trial(), index: 9, tr: Some(2.0), shape: [2, 2, 2] };
        let (header, frames) = b.message(Vec::new()).into_frames();
        assert_eq!(frames[0], b"betas");
        assert_eq!(read::<BetasHeader>("betas", &header).unwrap(), b);
        assert!(read::<DecodeHeader>("betas", &header).is_err());
        assert!(read::<BetasHeader>("betas", &serde_json::json!({"run": "r"})).is_err());
    }

    #[test]
    fn the_motion_fields_are_the_confound_names() {
        let (_, json) = &samples()[1];
        for name in crate::motion::rigid::PARAM_NAMES {
            assert!(json.get(name).is_some_and(serde_json::Value::is_f64), "{name}");
        }
    }

    /// The README's topic table names every field each header has, in its topic's row.
    #[test]
    fn the_readme_topic_table_lists_every_header_field() {
        let readme = include_str!("../README.md");
        let mut missing = Vec::new();
        for (topic, json) in samples() {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{topic}` |")))
                .unwrap_or_else(|| panic!("README has no row for topic {topic}"));
            let fields = json.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
            assert!(!fields.is_empty(), "{topic}");
            missing.extend(
                fields
                    .into_iter()
                    .filter(|f| !row.contains(&format!("`{f}`")))
                    .map(|f| format!("{topic}.{f}")),
            );
        }
        assert!(missing.is_empty(), "README's topic table does not name {missing:?}");
    }
}
