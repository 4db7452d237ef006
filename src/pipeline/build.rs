//! Building a pipeline from a configuration: every stage and sink made and checked before any
//! volume flows, then the threads started, sinks first.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::calibration::LiveCalibration;
use super::stage::{DecodeDispatch, DecodeStageAdapter, GlmStage, Identity, MotionStage, Stage};
use super::{
    answer_stop_while_draining, decode_worker, ingest_loop, lower_priority, publish_loop, record_loop, spawn,
    stage_loop, Pipeline, PipelineHandle, RunOverrides, SetOnDrop, StageSlot, DECODE_NICE, EVENT_QUEUE,
    LATE_QUEUE,
};
use crate::calibrate::protocol::Protocol;
use crate::clock;
use crate::config::Config;
use crate::console::{ConsoleFeed, ConsoleSetup};
use crate::decode::gallery::Gallery;
use crate::decode::DecodeStage;
use crate::frame::{Boundary, Frame, RecordItem};
use crate::glm::events::Event;
use crate::glm::{GlmEstimator, SIM_ROI};
use crate::ingest::uri::parse_publish_uri;
use crate::ingest::{open_source, Endpoint, IngestUri, SourceLimits};
use crate::io::session::{MessageLog, SessionWriter};
use crate::metrics::Metrics;
use crate::motion::MotionCorrector;
use crate::publish::results::ResultsBoard;
use crate::publish::Publisher;
use crate::queue::{edge, EdgeRx, EdgeTx, WhenFull};

/// Setup errors, every one of them (the user fixes all at once).
type Errors = Vec<String>;

fn one(e: impl ToString) -> Errors {
    vec![e.to_string()]
}

/// The stages before their threads: motion, GLM, and decoding with its pool (none without a
/// model).
struct Stages {
    motion: Box<dyn Stage>,
    glm: Box<dyn Stage>,
    /// The live events the GLM stage takes (none without a GLM).
    events: Option<crossbeam_channel::Receiver<Event>>,
    decoding: Option<(DecodeStageAdapter, rayon::ThreadPool)>,
}

impl Stages {
    fn build(
        cfg: &Config,
        uri: &IngestUri,
        gallery: Option<Arc<Gallery>>,
        session_dir: Option<&Path>,
        events: crossbeam_channel::Receiver<Event>,
    ) -> Result<Stages, Errors> {
        let motion: Box<dyn Stage> = if cfg.motion.enabled {
            Box::new(MotionStage(MotionCorrector::new(&cfg.motion).map_err(one)?))
        } else {
            Box::new(Identity("motion"))
        };
        let (glm, events): (Box<dyn Stage>, _) = if cfg.glm.enabled {
            (Box::new(GlmStage(glm_estimator(cfg, uri).map_err(one)?)), Some(events))
        } else {
            (Box::new(Identity("glm")), None)
        };
        let decoding = match &cfg.decode.model {
            Some(_) => {
                let stage = DecodeStage::new(&cfg.decode, gallery).map_err(one)?;
                let calibration = live_calibration(cfg, &stage, session_dir).map_err(one)?;
                let adapter = DecodeStageAdapter {
                    stage,
                    now: clock::now,
                    budget_ms: cfg.decode.latency_budget_ms,
                    run_end: cfg.decode.decode_run_end,
                    calibration,
                };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.decode.threads)
                    .thread_name(|i| format!("mirage/decode{i}"))
                    .start_handler(|_| lower_priority(DECODE_NICE))
                    .build()
                    .map_err(|e| one(format!("decode threads: {e}")))?;
                Some((adapter, pool))
            }
            None => None,
        };
        Ok(Stages { motion, glm, events, decoding })
    }
}

/// The bounded edges between the threads, each registered with the metrics.
struct Edges {
    ingest: (EdgeTx<Frame>, EdgeRx<Frame>),
    motion: (EdgeTx<Frame>, EdgeRx<Frame>),
    glm: (EdgeTx<Frame>, EdgeRx<Frame>),
    decode: (EdgeTx<Frame>, EdgeRx<Frame>),
    record: (EdgeTx<RecordItem>, EdgeRx<RecordItem>),
}

impl Edges {
    fn new(cfg: &Config, metrics: &Metrics) -> Edges {
        let p = &cfg.pipeline;
        let frame_edge = |name: &'static str, policy: WhenFull| {
            let (tx, rx) = edge::<Frame>(name, p.queue_capacity, p.queue_bytes, policy);
            metrics.add_edge(tx.stats());
            (tx, rx)
        };
        let ingest = frame_edge("ingest->motion", WhenFull::Block);
        let motion = frame_edge("motion->glm", WhenFull::Block);
        let glm = frame_edge("glm->decode", WhenFull::Block);
        let decode = frame_edge("decode->publish", p.publish_when_full);
        let record = edge::<RecordItem>("ingest->record", p.record_capacity, usize::MAX, WhenFull::Block);
        metrics.add_edge(record.0.stats());
        Edges { ingest, motion, glm, decode, record }
    }
}

/// Where the session is recorded: the folder, its volume writer and its message log.
struct Session {
    dir: PathBuf,
    writer: SessionWriter,
    log: MessageLog,
}

fn open_session(cfg: &Config, dir: Option<PathBuf>, started: f64) -> Result<Option<Session>, Errors> {
    let Some(dir) = dir else { return Ok(None) };
    let meta = serde_json::json!({
        "mirage_version": env!("CARGO_PKG_VERSION"),
        "started_unix": clock::unix_now(),
        "started_monotonic": started,
        "ingest": cfg.ingest.uri,
        "config": cfg,
    });
    let writer = SessionWriter::create(&dir, &meta, cfg.record.sync).map_err(one)?;
    let log = MessageLog::open(&dir).map_err(one)?;
    Ok(Some(Session { dir, writer, log }))
}

/// Every reason a run can count, registered up front: the runner's, the sinks', and the
/// typed errors' of each stage.
pub(super) fn counted_reasons() -> Vec<crate::reason::Reason> {
    [
        super::REASONS,
        crate::ingest::markers::REASONS,
        crate::console::REASONS,
        crate::ingest::wire::REASONS,
        crate::ingest::REASONS,
        crate::motion::REASONS,
        crate::glm::REASONS,
        crate::decode::REASONS,
        &[crate::publish::results::BAD_REQUEST, super::stage::DECODE_DROPPED],
    ]
    .concat()
}

/// Warns about every endpoint that listens beyond this machine.
fn warn_exposed(endpoints: &[Option<&Endpoint>]) {
    for ep in endpoints.iter().flatten() {
        if ep.is_exposed() {
            tracing::warn!("{} listens on every interface; reachable from the network", ep.zmq_address());
        }
    }
}

impl Pipeline {
    /// Validates `cfg`, opens every socket, file and outlet, and starts the threads. Returns
    /// every error found, not just the first.
    pub fn build(cfg: &Config) -> Result<PipelineHandle, Vec<String>> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        // Before any thread of ours starts: candle sizes its pool from the environment once.
        crate::decode::limit_candle_threads(cfg.decode.threads);
        let uri = cfg.ingest_uri().map_err(one)?;
        let publish_ep = cfg.publish.uri.as_deref().map(parse_publish_uri).transpose().map_err(one)?;
        warn_exposed(&[uri.bound_endpoint(), publish_ep.as_ref()]);
        let started = clock::now();
        let metrics = Arc::new(Metrics::new(started));
        metrics.register(&counted_reasons());
        let mut handle = PipelineHandle {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            metrics: metrics.clone(),
            session_dir: None,
            source: String::new(),
        };

        // Every stage is made before the session folder, so that a setup error leaves none.
        let session_dir = cfg
            .record
            .dir
            .as_ref()
            .map(|d| PathBuf::from(d.replace("{time}", &clock::utc_label(clock::unix_now()))));
        // Loaded once: the decode stage ranks against it, the console scores against it.
        let gallery = match &cfg.decode.gallery {
            Some(dir) if cfg.decode.model.is_some() => Some(Arc::new(Gallery::load(dir).map_err(one)?)),
            _ => None,
        };
        let (events_tx, events_rx) = crossbeam_channel::bounded::<Event>(EVENT_QUEUE);
        let stages = Stages::build(cfg, &uri, gallery.clone(), session_dir.as_deref(), events_rx)?;
        let session = open_session(cfg, session_dir, started)?;
        handle.session_dir = session.as_ref().map(|s| s.dir.clone());
        let console = start_console(cfg, &metrics, gallery, &mut handle)?;
        let edges = Edges::new(cfg, &metrics);
        let mut wiring = Wiring { cfg, uri, metrics, handle, errors: Vec::new() };
        wiring.start(stages, edges, session, console, publish_ep, events_tx)?;
        let Wiring { handle, errors, .. } = wiring;
        if errors.is_empty() {
            Ok(handle)
        } else {
            drop(handle);
            Err(errors)
        }
    }
}

/// The console's page or report, started; `None` when the configuration asks for neither.
fn start_console(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    gallery: Option<Arc<Gallery>>,
    handle: &mut PipelineHandle,
) -> Result<Option<ConsoleFeed>, Errors> {
    let Some(setup) = console_setup(cfg, handle.session_dir.as_deref(), gallery).map_err(one)? else {
        return Ok(None);
    };
    let (feed, thread) = crate::console::start(setup, metrics.clone()).map_err(one)?;
    handle.threads.push(thread);
    Ok(Some(feed))
}

/// Starting the threads: what they share, and the errors of those that could not start.
struct Wiring<'a> {
    cfg: &'a Config,
    uri: IngestUri,
    metrics: Arc<Metrics>,
    handle: PipelineHandle,
    errors: Errors,
}

impl Wiring<'_> {
    /// Starts a thread, keeping its handle or its error.
    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) {
        match spawn(name, f) {
            Ok(t) => self.handle.threads.push(t),
            Err(e) => self.errors.push(e),
        }
    }

    /// Sinks first (so that subscribers can connect before any volume flows), then the stage
    /// threads, the recorder, the marker reader and ingest last.
    fn start(
        &mut self,
        stages: Stages,
        edges: Edges,
        session: Option<Session>,
        console: Option<ConsoleFeed>,
        publish_ep: Option<Endpoint>,
        events_tx: crossbeam_channel::Sender<Event>,
    ) -> Result<(), Errors> {
        // The Prometheus endpoint and the results server serve until publish has sent its
        // last status.
        let published_all = Arc::new(AtomicBool::new(false));
        let results = self.start_servers(&published_all)?;
        // The last status waits for the recorder, so that its counts are the final ones; both
        // flags are set when their thread ends, panics or never starts.
        let recorded_all = Arc::new(AtomicBool::new(session.is_none()));
        let record_done = SetOnDrop(recorded_all.clone());
        let (writer, log) = match session {
            Some(s) => (Some(s.writer), Some(s.log)),
            None => (None, None),
        };
        let Edges { ingest, motion, glm, decode, record } = edges;
        // Decoded trials reach publish off the volume path, from the decode worker.
        let (late_tx, late_rx) = crossbeam_channel::bounded::<Frame>(LATE_QUEUE);
        let waker = decode.1.waker();
        let sink = PublishSink { endpoint: publish_ep, log, console, results };
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<String, String>>(1);
        self.start_publish(sink, decode.1, late_rx, published_all, recorded_all, ready_tx.clone());
        self.await_ready(&ready_rx, "publish");

        let decode_stage: Box<dyn Stage> = match stages.decoding {
            Some((adapter, pool)) => {
                // Never blocks the volume path: when the worker is this far behind, the newest
                // trial's decode is dropped and counted (the edge's `dropped`).
                let (worker_tx, worker_rx) = edge::<Frame>(
                    "decode hand-off",
                    LATE_QUEUE,
                    self.cfg.pipeline.queue_bytes,
                    WhenFull::DropNewest,
                );
                self.metrics.add_edge(worker_tx.stats());
                let m = self.metrics.clone();
                let work = move || decode_worker(adapter, worker_rx, late_tx, waker, &m);
                let thread = spawn("decoder", move || pool.install(work)).map_err(|e| vec![e])?;
                self.handle.threads.push(thread);
                Box::new(DecodeDispatch { worker: worker_tx })
            }
            None => Box::new(Identity("decode")),
        };
        let slots: Vec<StageSlot> = vec![
            (stages.motion, ingest.1, motion.0, Boundary::Motion, None),
            (stages.glm, motion.1, glm.0, Boundary::Glm, stages.events),
            (decode_stage, glm.1, decode.0, Boundary::Decode, None),
        ];
        for (stage, rx, tx, boundary, events) in slots {
            let m = self.metrics.clone();
            self.spawn(stage.name(), move || stage_loop(stage, rx, tx, boundary, events, &m));
        }

        let (record_tx, record_rx) = record;
        let recording = writer.is_some();
        if let Some(writer) = writer {
            let m = self.metrics.clone();
            self.spawn("record", move || {
                let _done = record_done;
                record_loop(writer, record_rx, &m);
            });
        }
        if let Some(markers) = self.cfg.glm.markers.as_deref().and_then(|m| m.strip_prefix("lsl://")) {
            let (name, tx) = (markers.to_string(), events_tx.clone());
            let (s, m) = (self.handle.stop.clone(), self.metrics.clone());
            self.spawn("markers", move || crate::ingest::markers::marker_loop(&name, &tx, &s, &m));
        }
        self.start_ingest(ingest.0, recording.then_some(record_tx), events_tx, ready_tx);
        if let Some(desc) = self.await_ready(&ready_rx, "ingest") {
            self.handle.source = desc;
        }
        Ok(())
    }

    /// The thread that started last says whether its setup worked; its error is kept.
    fn await_ready(
        &mut self,
        ready: &crossbeam_channel::Receiver<Result<String, String>>,
        what: &str,
    ) -> Option<String> {
        match ready.recv() {
            Ok(Ok(desc)) => Some(desc),
            Ok(Err(e)) => {
                self.errors.push(e);
                None
            }
            Err(_) => {
                self.errors.push(format!("{what} thread ended during setup"));
                None
            }
        }
    }

    /// The Prometheus endpoint and the results server, when configured.
    fn start_servers(
        &mut self,
        published_all: &Arc<AtomicBool>,
    ) -> Result<Option<Arc<ResultsBoard>>, Errors> {
        if let Some(addr) = &self.cfg.publish.metrics {
            let listener = crate::publish::prometheus::bind(addr).map_err(one)?;
            let (m, done) = (self.metrics.clone(), published_all.clone());
            let thread = spawn("metrics", move || crate::publish::prometheus::serve(listener, m, done))
                .map_err(one)?;
            self.handle.threads.push(thread);
            tracing::info!("metrics: http://{addr}/metrics");
        }
        let Some(addr) = &self.cfg.publish.results else { return Ok(None) };
        let listener = crate::publish::results::bind(addr).map_err(one)?;
        let board = Arc::new(ResultsBoard::default());
        let (b, m, done) = (board.clone(), self.metrics.clone(), published_all.clone());
        let thread =
            spawn("results", move || crate::publish::results::serve(listener, b, m, done)).map_err(one)?;
        self.handle.threads.push(thread);
        tracing::info!("results server: {addr}");
        Ok(Some(board))
    }

    /// The publish thread: the ZMQ socket, the LSL feedback outlet (waiting for a consumer when
    /// asked), the message log, the console and the results board.
    fn start_publish(
        &mut self,
        sink: PublishSink,
        rx: EdgeRx<Frame>,
        late_rx: crossbeam_channel::Receiver<Frame>,
        published_all: Arc<AtomicBool>,
        recorded_all: Arc<AtomicBool>,
        ready: crossbeam_channel::Sender<Result<String, String>>,
    ) {
        let cfg = self.cfg;
        let feedback = cfg.publish.lsl_feedback.clone().map(|name| crate::publish::FeedbackOutlet {
            name,
            rois: if cfg.glm.enabled {
                cfg.glm.rois.iter().map(|r| r.name.clone()).collect()
            } else {
                Vec::new()
            },
            tr: known_tr(cfg, &self.uri),
        });
        let lsl_wait_s = cfg.publish.lsl_wait_s;
        let (hwm, interval) = (cfg.publish.send_hwm, cfg.publish.status_interval_s);
        let m = self.metrics.clone();
        // Set when publish ends, panics or never starts.
        let published_all = SetOnDrop(published_all);
        self.spawn("publish", move || {
            let _done = published_all;
            let PublishSink { endpoint, log, console, results } = sink;
            let publisher = match Publisher::new(endpoint.as_ref(), hwm, feedback.as_ref(), log) {
                Ok(p) => p,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            };
            if let Some(f) = feedback.as_ref().filter(|_| lsl_wait_s > 0.0) {
                tracing::info!(
                    "waiting up to {lsl_wait_s} s for an LSL consumer of {:?} (publish.lsl_wait_s)",
                    f.name
                );
                if !publisher.wait_for_feedback_consumer(lsl_wait_s) {
                    tracing::info!("no LSL consumer of {:?} yet; starting", f.name);
                }
            }
            let publisher = match console {
                Some(feed) => publisher.with_console(feed),
                None => publisher,
            };
            let publisher = match results {
                Some(board) => publisher.with_results(board),
                None => publisher,
            };
            let _ = ready.send(Ok(String::new()));
            publish_loop(publisher, rx, Some(late_rx), &m, interval, &recorded_all);
        });
    }

    /// The ingest thread: opens the source, runs the volume path's head, and answers `STOP`
    /// while the rest drains.
    fn start_ingest(
        &mut self,
        out: EdgeTx<Frame>,
        record: Option<EdgeTx<RecordItem>>,
        events: crossbeam_channel::Sender<Event>,
        ready: crossbeam_channel::Sender<Result<String, String>>,
    ) {
        let cfg = self.cfg;
        let limits = SourceLimits { max_voxels: cfg.ingest.max_voxels };
        let run = crate::volume::sanitize_run_id(&cfg.ingest.run);
        // The URI's `?tr=` wins over `ingest.tr`, which wins over the sender's headers.
        let overrides = RunOverrides { stop_after: cfg.ingest.stop_after, tr: configured_tr(cfg, &self.uri) };
        let (uri, m, s) = (self.uri.clone(), self.metrics.clone(), self.handle.stop.clone());
        self.spawn("ingest", move || match open_source(&uri, limits, &run) {
            Ok(source) => {
                let _ = ready.send(Ok(source.describe()));
                let (source, last_tr) = ingest_loop(source, out, record, &events, &m, &s, overrides);
                // Ingest is over: helpers such as the marker reader stop too.
                s.store(true, Ordering::Release);
                answer_stop_while_draining(source, last_tr, &m);
            }
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
            }
        });
    }
}

/// What the publish thread writes to besides its edge.
struct PublishSink {
    endpoint: Option<Endpoint>,
    log: Option<MessageLog>,
    console: Option<ConsoleFeed>,
    results: Option<Arc<ResultsBoard>>,
}

/// Calibration mode's state, when `decode.mode = "calibrate"`: the protocol checked against
/// the model and gallery, and where the head will be saved.
fn live_calibration(
    cfg: &Config,
    stage: &DecodeStage,
    session_dir: Option<&std::path::Path>,
) -> Result<Option<LiveCalibration>, String> {
    if cfg.decode.mode != crate::decode::Mode::Calibrate {
        return Ok(None);
    }
    let path = cfg.calibrate.protocol.as_ref().ok_or("calibration mode needs calibrate.protocol")?;
    let protocol = Protocol::load(path).map_err(|e| e.to_string())?;
    let out = match (&cfg.calibrate.out, session_dir, &cfg.decode.model) {
        (Some(out), _, _) => out.clone(),
        (None, Some(dir), _) => dir.join("alignment.safetensors"),
        (None, None, Some(model)) => {
            model.join(format!("alignment-{}.safetensors", clock::utc_label(clock::unix_now())))
        }
        (None, None, None) => return Err("calibration mode needs decode.model".into()),
    };
    LiveCalibration::new(protocol, cfg.calibrate.clone(), out, stage.decoder(), stage.gallery())
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Builds the GLM estimator, resolving `glm.mask = "sim"` to the simulator's visual ROI.
fn glm_estimator(cfg: &Config, uri: &IngestUri) -> Result<GlmEstimator, String> {
    let mut est = GlmEstimator::new(&cfg.glm).map_err(|e| e.to_string())?;
    let sim_rois: Vec<&str> =
        cfg.glm.rois.iter().filter(|r| r.path == Path::new(SIM_ROI)).map(|r| r.name.as_str()).collect();
    if cfg.glm.mask != "sim" && sim_rois.is_empty() {
        return Ok(est);
    }
    let IngestUri::Sim { sim, .. } = uri else {
        return Err("glm.mask or glm.rois = \"sim\" needs sim:// ingest; give a mask file".into());
    };
    let s = crate::sim::Simulator::new(sim).map_err(|e| e.to_string())?;
    for name in sim_rois {
        est = est.with_roi(name, s.dims(), &s.anatomy().roi);
    }
    if cfg.glm.mask == "sim" {
        est = est.with_mask(s.dims(), s.anatomy().roi.clone());
    }
    Ok(est)
}

/// The console's setup: a page when `console.listen` is set, a report when recording with
/// `console.report`; `None` when neither.
fn console_setup(
    cfg: &Config,
    session_dir: Option<&Path>,
    gallery: Option<Arc<Gallery>>,
) -> Result<Option<ConsoleSetup>, String> {
    let report = cfg.console.report_path(session_dir);
    if cfg.console.listen.is_none() && report.is_none() {
        return Ok(None);
    }
    let mode = match cfg.decode.mode {
        crate::decode::Mode::Calibrate => "calibrate",
        crate::decode::Mode::Decode => "decode",
    };
    let mut hello = serde_json::Map::new();
    hello.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    hello.insert("source".into(), cfg.ingest.uri.clone().into());
    hello.insert("mode".into(), mode.into());
    hello.insert("decoding".into(), cfg.decode.model.is_some().into());
    hello.insert("fd_threshold_mm".into(), cfg.motion.fd_threshold_mm.into());
    hello.insert("latency_budget_ms".into(), cfg.decode.latency_budget_ms.into());
    let rois: Vec<serde_json::Value> = cfg.glm.rois.iter().map(|r| r.name.clone().into()).collect();
    hello.insert("rois".into(), rois.into());
    hello.insert("report".into(), false.into());
    Ok(Some(ConsoleSetup { listen: cfg.console.listen.clone(), hello, gallery, report }))
}

/// The TR the configuration sets over the sender's headers: the URI's `?tr=`, else `ingest.tr`.
fn configured_tr(cfg: &Config, uri: &IngestUri) -> Option<f64> {
    uri.tr().or(cfg.ingest.tr)
}

/// The repetition time known before any volume: the configured one, else the simulator's.
fn known_tr(cfg: &Config, uri: &IngestUri) -> Option<f64> {
    let sim = match uri {
        IngestUri::Sim { sim, .. } => Some(sim.tr),
        _ => None,
    };
    configured_tr(cfg, uri).or(sim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::WhenFull;

    #[test]
    fn the_runner_wires_the_edges_the_architecture_names_and_every_volume_goes_through() {
        let mut cfg = Config::default();
        cfg.ingest.uri = "sim://?volumes=6&shape=12,12,6&speed=max".into();
        cfg.publish.uri = None;
        cfg.publish.lsl_feedback = None;
        cfg.record.dir = None;
        cfg.console.listen = None;
        cfg.decode.model = None;
        cfg.pipeline.publish_when_full = WhenFull::DropNewest;
        let handle = Pipeline::build(&cfg).unwrap_or_else(|e| panic!("{e:?}"));
        let snap = handle.wait();
        let edges: Vec<(&str, WhenFull, u64)> =
            snap.queues.iter().map(|q| (q.name, q.policy, q.pushed)).collect();
        assert_eq!(
            edges,
            [
                ("ingest->motion", WhenFull::Block, 6),
                ("motion->glm", WhenFull::Block, 6),
                ("glm->decode", WhenFull::Block, 6),
                ("decode->publish", WhenFull::DropNewest, 6),
                // Not recording: the edge exists, nothing is pushed to it.
                ("ingest->record", WhenFull::Block, 0),
            ],
            "{:?}",
            snap.queues
        );
        assert_eq!(snap.received, 6);
    }

    #[test]
    fn every_counter_is_named_once_explained_and_exported_before_it_happens() {
        let all = counted_reasons();
        let mut names: Vec<&str> = all.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "a counter name is declared twice: {all:?}");
        for r in &all {
            assert!(r.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r:?}");
            assert!(!r.help.is_empty(), "{r:?}");
        }
        let m = Metrics::new(0.0);
        m.register(&all);
        let text = m.prometheus();
        for r in &all {
            assert!(text.contains(&format!("mirage_errors_total{{reason=\"{}\"}} 0", r.name)), "{}", r.name);
            assert!(text.contains(&format!("# reason {}: {}.", r.name, r.help)), "{}", r.name);
        }
        m.count(super::super::RECORD_IO);
        assert!(m.prometheus().contains("mirage_errors_total{reason=\"record_io\"} 1"));
        assert_eq!(m.snapshot().errors.get("record_io"), Some(&1));
        // The status keeps only what happened.
        assert_eq!(m.snapshot().errors.len(), 1);
    }

    #[test]
    fn every_typed_error_counts_under_a_registered_reason() {
        use crate::decode::DecodeError as D;
        use crate::glm::GlmError as G;
        use crate::ingest::wire::WireError as W;
        use crate::ingest::IngestError as I;
        use crate::motion::MotionError as M;
        let s = || String::from("x");
        let wire = [
            W::Header(s()),
            W::Dtype(s()),
            W::TooLarge { voxels: 1, limit: 0 },
            W::PayloadSize { expected: 1, got: 0 },
            W::Frames(3),
            W::Affine(s()),
        ];
        let mut reasons: Vec<crate::reason::Reason> = wire.into_iter().map(|w| I::Wire(w).reason()).collect();
        reasons.extend([
            I::Socket { endpoint: s(), reason: s() }.reason(),
            I::Lsl { name: s(), reason: s() }.reason(),
            I::File(crate::io::nifti::NiftiError::Io {
                path: "x".into(),
                source: std::io::Error::other("x"),
            })
            .reason(),
            I::Sim(crate::sim::SimError::Config(s())).reason(),
            I::Marker(crate::glm::events::EventError::Marker { marker: s(), reason: s() }).reason(),
            M::Shape(s()).reason(),
            M::Degenerate(s()).reason(),
            M::ReferenceFile { path: "x".into(), reason: s() }.reason(),
            G::Setup(s()).reason(),
            G::Volume(s()).reason(),
            D::Model(s()).reason(),
            D::Gallery(s()).reason(),
            D::Input(s()).reason(),
            D::Device(s()).reason(),
            D::Compute(s()).reason(),
            D::Train(s()).reason(),
        ]);
        for r in reasons {
            assert!(counted_reasons().contains(&r), "{r:?} is counted but not registered");
        }
    }
}
