//! Publish: processed frames and status out to subscribers, and into the session log.
//!
//! Sinks are a ZeroMQ PUB socket (`--publish tcp://HOST:PORT`, bound) and an LSL outlet
//! `mirage-feedback`. PUB never blocks: a subscriber that does not read loses messages at its
//! own high-water mark and slows nobody. Topics: `volume` (each processed volume), `motion`
//! (each realigned volume's parameters), `roi` (ROI feedback), `betas` (a trial's betas when
//! its window closes, and again from all volumes at the end of the run) and `status`
//! (counters, queues and latency percentiles, once per interval).
//!
//! The feedback outlet has float32 channels — volume index, the daemon's receipt-to-publish
//! latency in ms, then each configured ROI's detrended percent signal change (NaN until
//! estimable) — and stamps each sample with the volume's acquisition time (LSL clock) when the
//! sender gave one, so a consumer can compute trigger-to-feedback latency.

pub mod prometheus;
pub mod results;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::settings::none_string;

use std::sync::atomic::Ordering;

use crate::clock;
use crate::console::{ConsoleFeed, ConsoleInput};
use crate::decode::{Decoded, Picture};
use crate::feedback::Feedback;
use crate::frame::Frame;
use crate::glm::{GlmOutput, RoiValue, TrialBetas};
use crate::ingest::Endpoint;
use crate::io::session::MessageLog;
use crate::message::{Message, Payload};
use crate::metrics::Metrics;
use crate::motion::MotionEstimate;
use crate::reason::Reason;
use crate::topic::{
    BetasHeader, CalibrationHeader, DecodeHeader, HeadShape, MotionHeader, RoiHeader, RoiReading, Topic,
    TrialHeader, VolumeHeader,
};

/// A message the publish socket could not send.
pub const PUBLISH: Reason = Reason::new("publish", "messages the publish socket could not send");
/// Counted when: a subscriber whose CURVE key is not in `publish.curve.clients` tried to connect.
pub const SUBSCRIBER_REFUSED: Reason =
    Reason::new("subscriber_refused", "PUB connections refused: CURVE key not in publish.curve.clients");
/// What publishing counts (the results server's are [`results::REASONS`]).
pub const REASONS: &[Reason] = &[PUBLISH, SUBSCRIBER_REFUSED];

/// `[publish]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// ZMQ PUB address `tcp://HOST:PORT` (bound), or `"none"`. Use 127.0.0.1 unless
    /// subscribers are on other machines; `tcp://*:PORT` exposes it on every interface.
    #[serde(with = "none_string")]
    pub uri: Option<String>,
    /// Name of the LSL feedback outlet, or `"none"`.
    #[serde(with = "none_string")]
    pub lsl_feedback: Option<String>,
    /// Seconds to wait at start for a consumer of the feedback outlet, so a client started
    /// with the daemon misses no sample (0: do not wait).
    pub lsl_wait_s: f64,
    /// Seconds between `status` messages.
    pub status_interval_s: f64,
    /// Messages queued per subscriber before PUB drops for that subscriber.
    pub send_hwm: i32,
    /// Prometheus endpoint `IP:PORT` serving `GET /metrics`, or `"none"`.
    #[serde(with = "none_string")]
    pub metrics: Option<String>,
    /// pyneal-style results server `IP:PORT` (a volume's 4-digit index in, one JSON line
    /// out), or `"none"`.
    #[serde(with = "none_string")]
    pub results: Option<String>,
    /// ZeroMQ CURVE on the PUB socket: encrypted, only the listed subscribers' keys let in.
    pub curve: crate::curve::CurveConfig,
}

impl Default for PublishConfig {
    fn default() -> PublishConfig {
        PublishConfig {
            uri: Some("tcp://127.0.0.1:5560".into()),
            lsl_feedback: Some("mirage-feedback".into()),
            lsl_wait_s: 0.0,
            status_interval_s: 1.0,
            send_hwm: 1000,
            metrics: None,
            results: None,
            curve: Default::default(),
        }
    }
}

impl crate::settings::InputFiles for PublishConfig {
    /// The CURVE certificates.
    fn resolve_inputs(&mut self, base: &std::path::Path) {
        self.curve.resolve_inputs(base);
    }
}

/// Why publishing could not start or a message could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The PUB socket could not be set up.
    #[error("publish: {endpoint}: {reason}")]
    Socket {
        /// The address.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The LSL outlet could not be created.
    #[error("publish: lsl outlet {name:?}: {reason}")]
    Lsl {
        /// Outlet name.
        name: String,
        /// What failed.
        reason: String,
    },
}

/// Builds the `volume` message of a frame whose path's stages (ingest … publish) are `stages`.
pub fn volume_message(frame: &Frame, stages: &[&str]) -> Message {
    let v = &frame.volume;
    let latency_ms = stages
        .iter()
        .zip(frame.stamps.stage_ms())
        .filter_map(|(name, ms)| Some(((*name).to_string(), ms?)))
        .collect();
    let header = VolumeHeader {
        seq: frame.seq,
        index: v.index,
        run: v.run.clone(),
        shape: v.dims,
        affine: v.affine,
        voxel_size: v.voxel_size(),
        tr: v.tr,
        acq_time: v.acq_time,
        recv_time: v.recv_time,
        flags: frame.flags,
        stage_errors: frame.stage_errors.clone(),
        latency_ms,
    };
    header.message(vec![Payload::f32("data", v.dims.to_vec(), "F", &v.data)])
}

/// A value JSON can carry: NaN and infinities become null.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Builds the `motion` message of a realigned frame: the six parameters (fMRIPrep names),
/// the world matrix, framewise displacement and the optimiser's report.
pub fn motion_message(frame: &Frame, m: &MotionEstimate) -> Message {
    let [trans_x, trans_y, trans_z, rot_x, rot_y, rot_z] = m.params.to_array();
    let header = MotionHeader {
        seq: frame.seq,
        index: frame.volume.index,
        run: frame.volume.run.clone(),
        acq_time: frame.volume.acq_time,
        trans_x,
        trans_y,
        trans_z,
        rot_x,
        rot_y,
        rot_z,
        matrix: m.matrix,
        framewise_displacement: m.framewise_displacement,
        fd_exceeded: m.fd_exceeded,
        iterations: m.iterations,
        cost: finite(m.cost),
        converged: m.converged,
        reference_index: m.reference_index,
    };
    header.message(Vec::new())
}

/// Builds the `roi` message: each ROI's mean and detrended percent signal change.
pub fn roi_message(frame: &Frame, rois: &[RoiValue]) -> Message {
    let feedback = frame.outputs.get::<Feedback>();
    let header = RoiHeader {
        seq: frame.seq,
        index: frame.volume.index,
        run: frame.volume.run.clone(),
        acq_time: frame.volume.acq_time,
        rois: rois
            .iter()
            .map(|r| RoiReading {
                name: r.name.clone(),
                mean: finite(r.mean),
                psc: r.psc,
                feedback: feedback.and_then(|f| f.of(&r.name)),
            })
            .collect(),
        feedback: feedback.and_then(|f| f.value),
    };
    header.message(Vec::new())
}

/// The fields that describe a trial, shared by the `betas` and `decode` topics.
fn trial_header(t: &TrialBetas) -> TrialHeader {
    TrialHeader {
        run: t.run.clone(),
        trial: t.trial,
        stim: t.stim,
        condition: t.condition.clone(),
        onset: t.onset,
        duration: t.duration,
        n_volumes: t.n_volumes,
        estimable: t.estimable,
        at_run_end: t.at_run_end,
    }
}

/// Builds the `betas` message of one trial: its description and, as payloads, one beta per
/// mask voxel (`betas`, float32) and the voxels' grid indices (`voxels`, uint32, x fastest).
pub fn betas_message(frame: &Frame, t: &TrialBetas) -> Message {
    let header = BetasHeader {
        trial: trial_header(t),
        index: frame.volume.index,
        tr: frame.volume.tr,
        shape: frame.volume.dims,
    };
    header.message(vec![
        Payload::f32("betas", vec![t.betas.len()], "C", &t.betas),
        Payload::u32("voxels", &t.voxels),
    ])
}

/// Builds the `decode` message of a decoded trial: top gallery matches and timing in the
/// header; each head's output (or `NAME.latent` for a head decoded to its latent), the fusion
/// mix and the pixel picture (float32 and PNG) as payloads.
pub fn decode_message(d: &Decoded) -> Message {
    let header = DecodeHeader {
        trial: trial_header(&d.trial),
        top: d.top.clone(),
        heads: d.heads.iter().map(|(n, s, _)| HeadShape { name: n.clone(), shape: s.clone() }).collect(),
        // Always present (empty unless `decode.latent_heads` names heads): one schema per topic.
        latents: d.latents.iter().map(|(n, _)| n.clone()).collect(),
        device: d.device.clone(),
        alignment: d.alignment.to_string(),
        latency_ms: d.latency_ms,
        over_budget: d.over_budget,
        closed_time: d.closed_time,
    };
    let mut payloads: Vec<Payload> =
        d.heads.iter().map(|(n, s, v)| Payload::f32(n, s.clone(), "C", v)).collect();
    payloads
        .extend(d.latents.iter().map(|(n, l)| Payload::f32(&format!("{n}.latent"), vec![l.len()], "C", l)));
    if let Some((c_img, c_txt)) = &d.fused {
        payloads.push(Payload::f32("c_img", vec![c_img.len()], "C", c_img));
        payloads.push(Payload::f32("c_txt", vec![c_txt.len()], "C", c_txt));
    }
    if let Some(png) = &d.png {
        payloads.push(Payload {
            name: "pixels_png".into(),
            dtype: "uint8",
            shape: vec![png.len()],
            order: "C",
            bytes: png.clone(),
        });
    }
    header.message(payloads)
}

/// Builds the `picture` message of a MindEye2 trial's picture: payload `picture_png`.
pub fn picture_message(p: &crate::decode::Picture) -> Message {
    let header = crate::topic::PictureHeader {
        trial: trial_header(&p.trial),
        device: p.device.clone(),
        latency_ms: p.latency_ms,
        over_budget: p.over_budget,
        closed_time: p.closed_time,
    };
    header.message(vec![Payload {
        name: "picture_png".into(),
        dtype: "uint8",
        shape: vec![p.png.len()],
        order: "C",
        bytes: p.png.clone(),
    }])
}

/// The LSL feedback outlet: one float32 sample per volume, `volume_index`, `latency_ms`, then
/// each ROI's percent signal change (`NAME_psc`, NaN until estimable), then with a feedback
/// recipe its value (`feedback`, NaN where undefined).
#[derive(Clone, Debug, PartialEq)]
pub struct FeedbackOutlet {
    /// Stream name (and source id `mirage-NAME`).
    pub name: String,
    /// ROI names, one channel each after the first two.
    pub rois: Vec<String>,
    /// Repetition time when known before the run (declared as the nominal rate 1/TR).
    pub tr: Option<f64>,
    /// With a feedback recipe, its ROIs: a `NAME_feedback` channel each, then `feedback`.
    pub feedback: Option<Vec<String>>,
}

impl FeedbackOutlet {
    /// The channels: label, unit and type (XDF / LabRecorder conventions).
    pub fn channels(&self) -> Vec<(String, &'static str, &'static str)> {
        let mut c = vec![
            ("volume_index".to_string(), "index", "Index"),
            ("latency_ms".to_string(), "milliseconds", "Latency"),
        ];
        c.extend(self.rois.iter().map(|r| (format!("{r}_psc"), "percent", "fMRI")));
        if let Some(rois) = &self.feedback {
            c.extend(rois.iter().map(|r| (format!("{r}_feedback"), "display", "Feedback")));
            c.push(("feedback".to_string(), "display", "Feedback"));
        }
        c
    }

    /// Creates the outlet with its description.
    fn create(&self) -> Result<lsl::StreamOutlet, PublishError> {
        let err = |reason: String| PublishError::Lsl { name: self.name.clone(), reason };
        let channels = self.channels();
        let rate = self.tr.filter(|t| *t > 0.0).map_or(lsl::IRREGULAR_RATE, |t| 1.0 / t);
        let mut info = lsl::StreamInfo::new(
            &self.name,
            "Feedback",
            channels.len() as u32,
            rate,
            lsl::ChannelFormat::Float32,
            &format!("mirage-{}", self.name),
        )
        .map_err(|e| err(format!("{e:?}")))?;
        let mut desc = info.desc();
        let mut list = desc.append_child("channels");
        for (label, unit, kind) in &channels {
            let mut ch = list.append_child("channel");
            ch.append_child_value("label", label);
            ch.append_child_value("unit", unit);
            ch.append_child_value("type", kind);
        }
        let mut acq = desc.append_child("acquisition");
        acq.append_child_value("manufacturer", "mirage-rt");
        acq.append_child_value("version", env!("CARGO_PKG_VERSION"));
        lsl::StreamOutlet::new(&info, 0, 60).map_err(|e| err(format!("{e:?}")))
    }
}

/// The sinks of one pipeline; lives on the publish thread (LSL outlets are not `Send`).
pub struct Publisher {
    /// The PUB socket, its CURVE handler (dropped before the context, which waits for it) and
    /// its context.
    socket: Option<(zmq::Socket, Option<crate::ingest::zap::ZapGuard>, zmq::Context)>,
    outlet: Option<lsl::StreamOutlet>,
    /// With a feedback recipe, the outlet ends with its ROIs' channels, then `feedback`.
    feedback_channels: Option<Vec<String>>,
    log: Option<MessageLog>,
    console: Option<ConsoleFeed>,
    results: Option<std::sync::Arc<results::ResultsBoard>>,
    send_errors: u64,
}

impl Publisher {
    /// Binds the PUB socket (if any; a CURVE server letting in only `curve`'s clients when
    /// given), creates the feedback outlet (if any) and opens the log.
    pub fn new(
        endpoint: Option<&Endpoint>,
        curve: Option<&crate::curve::Curve>,
        send_hwm: i32,
        feedback: Option<&FeedbackOutlet>,
        log: Option<MessageLog>,
    ) -> Result<Publisher, PublishError> {
        let socket = match endpoint {
            Some(ep) => {
                let address = ep.zmq_address();
                let err = |reason: String| PublishError::Socket { endpoint: address.clone(), reason };
                let ctx = zmq::Context::new();
                let s = ctx.socket(zmq::PUB).map_err(|e| err(e.to_string()))?;
                s.set_sndhwm(send_hwm).map_err(|e| err(e.to_string()))?;
                s.set_linger(500).map_err(|e| err(e.to_string()))?;
                // The handler is up before the socket binds, so no subscriber connects unchecked.
                let policy = crate::ingest::zap::Policy { curve: curve.cloned(), ..Default::default() };
                let zap =
                    crate::ingest::zap::ZapGuard::protect(&ctx, &s, &policy, "a subscriber").map_err(err)?;
                s.bind(&address).map_err(|e| err(format!("cannot bind: {e}")))?;
                Some((s, zap, ctx))
            }
            None => None,
        };
        let outlet = match feedback {
            Some(f) => Some(f.create()?),
            None => None,
        };
        let feedback_channels = feedback.and_then(|f| f.feedback.clone());
        Ok(Publisher { socket, outlet, feedback_channels, log, console: None, results: None, send_errors: 0 })
    }

    /// Also hands every message but volumes to the operator's console.
    pub fn with_console(mut self, feed: ConsoleFeed) -> Publisher {
        self.console = Some(feed);
        self
    }

    /// Also posts every message's results for the results server's clients.
    pub fn with_results(mut self, board: std::sync::Arc<results::ResultsBoard>) -> Publisher {
        self.results = Some(board);
        self
    }

    /// Sends a message on the PUB socket, logs its header and hands it to the console and the
    /// results board; returns the header sent.
    pub fn send(&mut self, msg: Message) -> Value {
        let topic = msg.topic;
        // The console scores decodes against the truth and shows pictures, so it takes their
        // payloads too.
        let for_console = self.console.as_ref().filter(|_| topic != VolumeHeader::NAME).map(|feed| {
            let payloads = match topic {
                DecodeHeader::NAME | crate::topic::PictureHeader::NAME => msg.payloads.clone(),
                _ => Vec::new(),
            };
            (feed, payloads)
        });
        let (header, frames) = msg.into_frames();
        if let Some((feed, payloads)) = for_console {
            feed.push(ConsoleInput { topic, header: header.clone(), payloads });
        }
        if let Some(board) = &self.results {
            board.record(topic, &header);
        }
        // Payloads but a volume's (the recorded volumes reproduce it) go into the session log.
        let logged: Vec<Vec<u8>> = match &self.log {
            Some(_) if topic != VolumeHeader::NAME => frames[2..].to_vec(),
            _ => Vec::new(),
        };
        if let Some((s, _, _)) = &self.socket {
            if let Err(e) = s.send_multipart(frames, zmq::DONTWAIT) {
                self.send_errors += 1;
                tracing::warn!("publish: {topic}: {e}");
            }
        }
        if let Some(log) = &mut self.log {
            let names = header["payloads"].as_array().map(Vec::as_slice).unwrap_or_default();
            let payloads: Vec<(&str, &[u8])> = names
                .iter()
                .zip(&logged)
                .map(|(d, bytes)| (d["name"].as_str().unwrap_or(""), bytes.as_slice()))
                .collect();
            if let Err(e) = log.append(clock::now(), topic, &header, &payloads) {
                self.send_errors += 1;
                tracing::warn!("{e}");
            }
        }
        header
    }

    /// Pushes one feedback sample (volume index, latency ms, each ROI's percent signal change)
    /// stamped `timestamp` (LSL clock).
    pub fn feedback(&mut self, index: u64, latency_ms: f64, roi_psc: &[f64], timestamp: f64) {
        use lsl::ExPushable;
        if let Some(o) = &self.outlet {
            let mut sample = vec![index as f32, latency_ms as f32];
            sample.extend(roi_psc.iter().map(|v| *v as f32));
            if let Err(e) = o.push_sample_ex(&sample, timestamp, true) {
                self.send_errors += 1;
                tracing::warn!("publish: feedback outlet: {e:?}");
            }
        }
    }

    /// Waits up to `seconds` for a consumer of the feedback outlet (so that a client started
    /// with the daemon misses no sample); whether one connected.
    pub fn wait_for_feedback_consumer(&self, seconds: f64) -> bool {
        match &self.outlet {
            Some(o) if seconds > 0.0 => o.wait_for_consumers(seconds),
            _ => true,
        }
    }

    /// Closes the sinks. LSL has no flush: with a consumer connected, the outlet is kept half a
    /// second so the last feedback sample reaches it before the outlet goes.
    pub fn close(self) {
        if self.outlet.as_ref().is_some_and(|o| o.have_consumers()) {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// Subscribers refused by the PUB socket's CURVE handler since the last call.
    pub fn newly_refused(&mut self) -> u64 {
        self.socket.as_mut().and_then(|(_, zap, _)| zap.as_mut()).map_or(0, |z| z.newly_refused())
    }

    /// Messages that could not be sent or logged so far.
    pub fn send_errors(&self) -> u64 {
        self.send_errors
    }

    /// Sends the results a frame carries, whatever its kind: the betas of the trials it closed,
    /// calibration progress, decoded trials and pictures; keeps the counts of `m` they change.
    pub fn publish_results(&mut self, frame: &Frame, m: &Metrics) {
        for t in frame.outputs.get::<GlmOutput>().map(|g| g.trials.as_slice()).unwrap_or_default() {
            self.send(betas_message(frame, t));
        }
        for h in frame.outputs.get::<Vec<CalibrationHeader>>().into_iter().flatten() {
            self.send(h.message(Vec::new()));
            if let Ok(mut c) = m.calibration.lock() {
                *c = Some(calibration_progress(h));
            }
            if matches!(h.phase.as_str(), "failed" | "incomplete") {
                tracing::error!("calibration: {}", h.error.as_deref().unwrap_or(&h.phase));
            }
        }
        let decoded = frame.outputs.get::<Vec<Decoded>>().map(Vec::as_slice).unwrap_or_default();
        for d in decoded {
            self.send(decode_message(d));
            m.decoded.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(closed) = decoded.first().and_then(|d| d.closed_time) {
            m.record_trial_decode((clock::now() - closed) * 1e3);
        }
        for p in frame.outputs.get::<Vec<Picture>>().into_iter().flatten() {
            self.send(picture_message(p));
        }
    }

    /// Sends a volume's own messages: its `motion`, its `roi` feedback and the `volume` itself,
    /// with the latency of each of `stages` (the path's latency keys).
    pub fn publish_volume(&mut self, frame: &Frame, stages: &[&str]) {
        if let Some(mo) = frame.outputs.get::<MotionEstimate>() {
            self.send(motion_message(frame, mo));
        }
        let roi = roi_values(frame);
        if !roi.is_empty() {
            self.send(roi_message(frame, roi));
        }
        self.send(volume_message(frame, stages));
    }

    /// Pushes a volume's feedback sample, stamped with its acquisition time (or `now`).
    pub fn push_feedback(&mut self, frame: &Frame, now: f64) {
        let mut psc: Vec<f64> = roi_values(frame).iter().map(|r| r.psc.unwrap_or(f64::NAN)).collect();
        if let Some(rois) = &self.feedback_channels {
            let f = frame.outputs.get::<Feedback>();
            psc.extend(rois.iter().map(|r| f.and_then(|f| f.of(r)).unwrap_or(f64::NAN)));
            psc.push(f.and_then(|f| f.value).unwrap_or(f64::NAN));
        }
        let latency = frame.stamps.total_ms().unwrap_or(f64::NAN);
        self.feedback(frame.volume.index, latency, &psc, frame.volume.acq_time.unwrap_or(now));
    }
}

/// A frame's ROI feedback (none before the GLM or with it off).
fn roi_values(frame: &Frame) -> &[RoiValue] {
    frame.outputs.get::<GlmOutput>().map(|g| g.roi.as_slice()).unwrap_or_default()
}

/// Calibration's progress in a few words, for the status line (`collecting 5/12`,
/// `fitting fold 2/6 40/200`, `done`).
fn calibration_progress(h: &CalibrationHeader) -> String {
    match (h.phase.as_str(), h.step) {
        ("collecting", _) => format!("collecting {}/{}", h.collected, h.needed),
        ("fitting", Some((step, steps))) => match &h.fit_stage {
            Some(stage) => format!("fitting {stage} {step}/{steps}"),
            None => format!("fitting {step}/{steps}"),
        },
        (phase, _) => phase.to_string(),
    }
}
