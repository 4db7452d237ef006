//! The runner: threads, queues and timestamps around the stages.
//!
//! ```text
//! ingest ─┬─► motion ─► glm ─► decode ─► publish ──► ZMQ PUB, LSL outlet, messages.jsonl
//!         └─► recorder ──► session folder (every accepted volume, before anything can drop it)
//! ```
//!
//! Each box is a named thread (`mirage/motion`, …) joined by bounded SPSC edges
//! ([`crate::queue`]). Edges up to decode block when full (lossless backpressure, counted); the edge
//! into publish follows `pipeline.publish_when_full`; the recorder edge always blocks. Stamps
//! are taken at every boundary ([`crate::frame::Boundary`]). [`Pipeline::build`] gathers every setup
//! error before anything runs; [`PipelineHandle`] stops and joins on drop.

pub mod calibration;
pub mod stage;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use self::calibration::LiveCalibration;
use self::stage::{DecodeDispatch, DecodeStageAdapter, GlmStage, Identity, MotionStage, Stage};
use crate::calibrate::protocol::Protocol;
use crate::clock;
use crate::config::Config;
use crate::console::ConsoleSetup;
use crate::decode::gallery::Gallery;
use crate::decode::DecodeStage;
use crate::frame::{Boundary, Frame, IngestFlags, RecordItem, Stamps};
use crate::glm::events::Event;
use crate::glm::{GlmEstimator, SIM_ROI};
use crate::ingest::uri::parse_publish_uri;
use crate::ingest::{open_source, Ack, IngestUri, SourceEvent, SourceLimits};
use crate::io::session::{MessageLog, SessionWriter};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::motion::MotionCorrector;
use crate::publish::{
    betas_message, calibration_message, decode_message, motion_message, roi_message, status_message,
    volume_message, Publisher,
};
use crate::queue::{edge, EdgeRx, EdgeTx, PushError, Recv, WhenFull};
use crate::volume::Volume;

/// How long a stage thread waits on its input before checking for shutdown.
const POLL: Duration = Duration::from_millis(100);

/// Nice value of decode threads: the volume path (niceness 0) runs first when cores are
/// short, so a decode delays no volume's feedback.
const DECODE_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority (Linux: per thread); failure only logs.
fn lower_priority(nice: i32) {
    // SAFETY: setpriority on the calling thread (who = 0) has no memory effects.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::debug!("decode: could not lower thread priority: {}", std::io::Error::last_os_error());
    }
}

/// Frames of trials waiting for the decode worker, and of its results waiting for publish.
const LATE_QUEUE: usize = 256;

/// Live events waiting for the GLM stage.
const EVENT_QUEUE: usize = 4096;

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

/// A stage with its input edge, output edge and the boundary stamped after it.
type StageSlot = (Box<dyn Stage>, EdgeRx<Frame>, EdgeTx<Frame>, Boundary);

/// Entry point for building a running pipeline from a configuration.
pub struct Pipeline;

/// A running pipeline. Dropping it stops ingest, drains every queue and joins every thread.
pub struct PipelineHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    session_dir: Option<PathBuf>,
    source: String,
}

impl PipelineHandle {
    /// The shared counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The flag that stops ingest when set (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Asks ingest to stop; queued frames are still processed and published.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// True once every thread has finished.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// The session folder, when recording.
    pub fn session_dir(&self) -> Option<&PathBuf> {
        self.session_dir.as_ref()
    }

    /// What the source is, for the user.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Waits for the source to end (or a stop request) and everything to drain.
    pub fn wait(mut self) -> MetricsSnapshot {
        self.join_all();
        self.metrics.snapshot()
    }

    fn join_all(&mut self) {
        for t in self.threads.drain(..) {
            let name = t.thread().name().unwrap_or("mirage").to_string();
            if t.join().is_err() {
                tracing::error!("thread {name} panicked");
            }
        }
    }
}

impl Drop for PipelineHandle {
    fn drop(&mut self) {
        self.request_stop();
        self.join_all();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(format!("mirage/{name}"))
        .spawn(|| {
            f();
            crate::metrics::note_thread_end();
        })
        .map_err(|e| format!("cannot start thread {name}: {e}"))
}

/// Tracks indices per run to flag duplicates, gaps and reordering.
#[derive(Default)]
struct IndexTracker {
    run: Option<(String, [usize; 3])>,
    max_seen: Option<u64>,
    seen: HashSet<u64>,
}

impl IndexTracker {
    fn observe(&mut self, v: &Volume, m: &Metrics) -> IngestFlags {
        let mut flags = IngestFlags::default();
        let key = (v.run.clone(), v.dims);
        if self.run.as_ref() != Some(&key) {
            if self.run.is_some() {
                tracing::info!("ingest: new run {:?} grid {:?} from volume {}", v.run, v.dims, v.index);
            }
            flags.new_run = true;
            self.run = Some(key);
            self.max_seen = None;
            self.seen.clear();
        }
        flags.duplicate = !self.seen.insert(v.index);
        match self.max_seen {
            Some(max) if v.index > max + 1 => flags.gap_before = v.index - max - 1,
            Some(max) if v.index < max && !flags.duplicate => {
                flags.out_of_order = true;
                // It fills a hole counted earlier.
                let _ = m.missing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| x.checked_sub(1));
            }
            _ => {}
        }
        self.max_seen = Some(self.max_seen.map_or(v.index, |m| m.max(v.index)));
        if flags.duplicate {
            m.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        if flags.out_of_order {
            m.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        m.missing.fetch_add(flags.gap_before, Ordering::Relaxed);
        flags
    }
}

impl Pipeline {
    /// Validates `cfg`, opens every socket, file and outlet, and starts the threads. Returns
    /// every error found, not just the first.
    pub fn build(cfg: &Config) -> Result<PipelineHandle, Vec<String>> {
        let mut errors = cfg.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        // Before any thread of ours starts: candle sizes its pool from the environment once.
        crate::decode::limit_candle_threads(cfg.decode.threads);
        let uri = cfg.ingest_uri().map_err(|e| vec![e])?;
        let publish_ep = match cfg.publish.uri.as_deref().map(parse_publish_uri).transpose() {
            Ok(ep) => ep,
            Err(e) => return Err(vec![e]),
        };
        for ep in [uri.bound_endpoint(), publish_ep.as_ref()].into_iter().flatten() {
            if ep.is_exposed() {
                tracing::warn!("{} listens on every interface; reachable from the network", ep.zmq_address());
            }
        }
        let started = clock::now();
        let metrics = Arc::new(Metrics::new(started));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handle = PipelineHandle {
            stop: stop.clone(),
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
            Some(dir) if cfg.decode.model.is_some() => match Gallery::load(dir) {
                Ok(g) => Some(Arc::new(g)),
                Err(e) => return Err(vec![e.to_string()]),
            },
            _ => None,
        };
        let motion: Box<dyn Stage> = if cfg.motion.enabled {
            match MotionCorrector::new(&cfg.motion) {
                Ok(m) => Box::new(MotionStage(m)),
                Err(e) => return Err(vec![e.to_string()]),
            }
        } else {
            Box::new(Identity("motion"))
        };
        let (events_tx, events_rx) = crossbeam_channel::bounded::<Event>(EVENT_QUEUE);
        let glm: Box<dyn Stage> = if cfg.glm.enabled {
            match glm_estimator(cfg, &uri) {
                Ok(glm) => Box::new(GlmStage { glm, events: events_rx }),
                Err(e) => return Err(vec![e]),
            }
        } else {
            Box::new(Identity("glm"))
        };
        // The decode stage, its calibration and its thread pool; the worker starts with the
        // other threads below.
        let decoding = match &cfg.decode.model {
            Some(_) => {
                let stage =
                    DecodeStage::new(&cfg.decode, gallery.clone()).map_err(|e| vec![e.to_string()])?;
                let calibration =
                    live_calibration(cfg, &stage, session_dir.as_deref()).map_err(|e| vec![e.to_string()])?;
                let adapter = DecodeStageAdapter {
                    stage,
                    budget_ms: cfg.decode.latency_budget_ms,
                    run_end: cfg.decode.decode_run_end,
                    calibration,
                };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.decode.threads)
                    .thread_name(|i| format!("mirage/decode{i}"))
                    .start_handler(|_| lower_priority(DECODE_NICE))
                    .build()
                    .map_err(|e| vec![format!("decode threads: {e}")])?;
                Some((adapter, pool))
            }
            None => None,
        };

        let session = match session_dir {
            Some(dir) => {
                let meta = serde_json::json!({
                    "mirage_version": env!("CARGO_PKG_VERSION"),
                    "started_unix": clock::unix_now(),
                    "started_monotonic": started,
                    "ingest": cfg.ingest.uri,
                    "config": cfg,
                });
                match SessionWriter::create(&dir, &meta, cfg.record.sync) {
                    Ok(w) => {
                        handle.session_dir = Some(dir);
                        Some(w)
                    }
                    Err(e) => return Err(vec![e.to_string()]),
                }
            }
            None => None,
        };
        let message_log = match &handle.session_dir {
            Some(d) => match MessageLog::open(d) {
                Ok(l) => Some(l),
                Err(e) => return Err(vec![e.to_string()]),
            },
            None => None,
        };

        let console = match console_setup(cfg, handle.session_dir.as_deref(), gallery) {
            Ok(Some(setup)) => match crate::console::start(setup, metrics.clone()) {
                Ok((feed, thread)) => {
                    handle.threads.push(thread);
                    Some(feed)
                }
                Err(e) => return Err(vec![e]),
            },
            Ok(None) => None,
            Err(e) => return Err(vec![e]),
        };

        let p = &cfg.pipeline;
        let frame_edge = |name: &'static str, policy: WhenFull| {
            let (tx, rx) = edge::<Frame>(name, p.queue_capacity, p.queue_bytes, policy);
            metrics.add_edge(tx.stats());
            (tx, rx)
        };
        let (ingest_tx, motion_rx) = frame_edge("ingest->motion", WhenFull::Block);
        let (motion_tx, glm_rx) = frame_edge("motion->glm", WhenFull::Block);
        let (glm_tx, decode_rx) = frame_edge("glm->decode", WhenFull::Block);
        let (decode_tx, publish_rx) = frame_edge("decode->publish", p.publish_when_full);
        let (record_tx, record_rx) =
            edge::<RecordItem>("ingest->record", p.record_capacity, usize::MAX, WhenFull::Block);
        metrics.add_edge(record_tx.stats());

        // Publish first, so subscribers can connect before any volume flows.
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<String, String>>(1);
        let feedback = cfg.publish.lsl_feedback.clone().map(|name| crate::publish::FeedbackOutlet {
            name,
            rois: if cfg.glm.enabled {
                cfg.glm.rois.iter().map(|r| r.name.clone()).collect()
            } else {
                Vec::new()
            },
            tr: known_tr(cfg, &uri),
        });
        let lsl_wait_s = cfg.publish.lsl_wait_s;
        let (hwm, interval) = (cfg.publish.send_hwm, cfg.publish.status_interval_s);
        let m = metrics.clone();
        let ready = ready_tx.clone();
        let ep = publish_ep.clone();
        // The Prometheus endpoint serves until publish has sent its last status.
        let published_all = Arc::new(AtomicBool::new(false));
        if let Some(addr) = &cfg.publish.metrics {
            let listener = match crate::publish::prometheus::bind(addr) {
                Ok(l) => l,
                Err(e) => return Err(vec![e]),
            };
            let (m, done) = (metrics.clone(), published_all.clone());
            match spawn("metrics", move || crate::publish::prometheus::serve(listener, m, done)) {
                Ok(t) => handle.threads.push(t),
                Err(e) => return Err(vec![e]),
            }
            tracing::info!("metrics: http://{addr}/metrics");
        }
        let results_board = match &cfg.publish.results {
            Some(addr) => {
                let listener = crate::publish::results::bind(addr).map_err(|e| vec![e])?;
                let board = Arc::new(crate::publish::results::ResultsBoard::default());
                let (b, m, done) = (board.clone(), metrics.clone(), published_all.clone());
                match spawn("results", move || crate::publish::results::serve(listener, b, m, done)) {
                    Ok(t) => handle.threads.push(t),
                    Err(e) => return Err(vec![e]),
                }
                tracing::info!("results server: {addr}");
                Some(board)
            }
            None => None,
        };
        // Set when publish ends, panics or never starts.
        let published_all_flag = SetOnDrop(published_all.clone());
        // The last status waits for the recorder, so that its counts are the final ones.
        let recorded_all = Arc::new(AtomicBool::new(session.is_none()));
        let recorded_all_flag = recorded_all.clone();
        // Set when the recorder ends, panics or never starts (also when setup fails below).
        let record_done = SetOnDrop(recorded_all);
        // Decoded trials reach publish off the volume path, from the decode worker.
        let (late_tx, late_rx) = crossbeam_channel::bounded::<Frame>(LATE_QUEUE);
        let waker = publish_rx.waker();
        match spawn("publish", move || {
            let _done = published_all_flag;
            match Publisher::new(ep.as_ref(), hwm, feedback.as_ref(), message_log) {
                Ok(publisher) => {
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
                    let publisher = match results_board {
                        Some(board) => publisher.with_results(board),
                        None => publisher,
                    };
                    let _ = ready.send(Ok(String::new()));
                    publish_loop(publisher, publish_rx, Some(late_rx), &m, interval, &recorded_all_flag);
                }
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                }
            }
        }) {
            Ok(t) => handle.threads.push(t),
            Err(e) => errors.push(e),
        }
        match ready_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("publish thread ended during setup".into()),
        }

        let decode: Box<dyn Stage> = match decoding {
            Some((adapter, pool)) => {
                // Never blocks the volume path: when the worker is this far behind, the newest
                // trial's decode is dropped and counted (the edge's `dropped`).
                let (worker_tx, worker_rx) =
                    edge::<Frame>("decode hand-off", LATE_QUEUE, p.queue_bytes, WhenFull::DropNewest);
                metrics.add_edge(worker_tx.stats());
                let m = metrics.clone();
                let work = move || decode_worker(adapter, worker_rx, late_tx, waker, &m);
                match spawn("decoder", move || pool.install(work)) {
                    Ok(t) => handle.threads.push(t),
                    Err(e) => return Err(vec![e]),
                }
                Box::new(DecodeDispatch { worker: worker_tx })
            }
            None => Box::new(Identity("decode")),
        };
        let stages: Vec<StageSlot> = vec![
            (motion, motion_rx, motion_tx, Boundary::Motion),
            (glm, glm_rx, glm_tx, Boundary::Glm),
            (decode, decode_rx, decode_tx, Boundary::Decode),
        ];
        for (stage, rx, tx, boundary) in stages {
            let name = stage.name();
            let m = metrics.clone();
            match spawn(name, move || stage_loop(stage, rx, tx, boundary, &m)) {
                Ok(t) => handle.threads.push(t),
                Err(e) => errors.push(e),
            }
        }

        if let Some(writer) = session {
            let m = metrics.clone();
            match spawn("record", move || {
                let _done = record_done;
                record_loop(writer, record_rx, &m);
            }) {
                Ok(t) => handle.threads.push(t),
                Err(e) => errors.push(e),
            }
        } else {
            drop(record_rx);
        }

        if let Some(markers) = cfg.glm.markers.as_deref().and_then(|m| m.strip_prefix("lsl://")) {
            let (name, tx, s, m) = (markers.to_string(), events_tx.clone(), stop.clone(), metrics.clone());
            match spawn("markers", move || crate::ingest::markers::marker_loop(&name, &tx, &s, &m)) {
                Ok(t) => handle.threads.push(t),
                Err(e) => errors.push(e),
            }
        }

        let limits = SourceLimits { max_voxels: cfg.ingest.max_voxels };
        let run = crate::volume::sanitize_run_id(&cfg.ingest.run);
        let stop_after = cfg.ingest.stop_after;
        // The URI's `?tr=` wins over `ingest.tr`, which wins over the sender's headers.
        let tr = configured_tr(cfg, &uri);
        let recording = handle.session_dir.is_some();
        let m = metrics.clone();
        let s = stop.clone();
        match spawn("ingest", move || match open_source(&uri, limits, &run) {
            Ok(source) => {
                let _ = ready_tx.send(Ok(source.describe()));
                let (source, last_tr) = ingest_loop(
                    source,
                    ingest_tx,
                    recording.then_some(record_tx),
                    &events_tx,
                    &m,
                    &s,
                    RunOverrides { stop_after, tr },
                );
                // Ingest is over: helpers such as the marker reader stop too.
                s.store(true, Ordering::Release);
                answer_stop_while_draining(source, last_tr, &m);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
            }
        }) {
            Ok(t) => handle.threads.push(t),
            Err(e) => errors.push(e),
        }
        match ready_rx.recv() {
            Ok(Ok(desc)) => handle.source = desc,
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("ingest thread ended during setup".into()),
        }
        if errors.is_empty() {
            Ok(handle)
        } else {
            drop(handle);
            Err(errors)
        }
    }
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

/// What the configuration imposes on the run over its sender: its length and its TR.
struct RunOverrides {
    stop_after: Option<u64>,
    tr: Option<f64>,
}

fn ingest_loop(
    mut source: Box<dyn crate::ingest::Source>,
    mut out: EdgeTx<Frame>,
    mut record: Option<EdgeTx<RecordItem>>,
    events: &crossbeam_channel::Sender<Event>,
    m: &Metrics,
    stop: &AtomicBool,
    RunOverrides { stop_after, tr }: RunOverrides,
) -> (Box<dyn crate::ingest::Source>, Option<f64>) {
    tracing::info!("ingest: {}", source.describe());
    let mut last_tr = tr;
    let mut tracker = IndexTracker::default();
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) && stop_after.is_none_or(|n| seq < n) {
        match source.next(POLL) {
            SourceEvent::Idle => {}
            SourceEvent::End => break,
            SourceEvent::Marker(e) => {
                if events.try_send(e).is_err() {
                    m.count_error("events_dropped");
                }
            }
            SourceEvent::Rejected(e) => {
                m.rejected.fetch_add(1, Ordering::Relaxed);
                m.count_error(e.reason());
                let text = e.to_string();
                tracing::warn!("{text}");
                source.acknowledge(Ack::Rejected { reason: &text });
            }
            SourceEvent::Volume(mut v) => {
                // A configured TR wins over the sender's.
                v.tr = tr.or(v.tr);
                let flags = tracker.observe(&v, m);
                m.received.fetch_add(1, Ordering::Relaxed);
                let index = v.index;
                let volume = Arc::new(v);
                let recording = match record.as_mut() {
                    Some(r) => {
                        let pushed = r.push(RecordItem { seq, volume: volume.clone(), flags }).is_ok();
                        if !pushed {
                            m.count_error("record_closed");
                        }
                        pushed
                    }
                    None => false,
                };
                let tr = volume.tr;
                last_tr = tr.or(last_tr);
                let mut stamps = Stamps::default();
                stamps.set(Boundary::Received, volume.recv_time);
                stamps.set(Boundary::Ingested, clock::now());
                let frame = Frame::new(seq, volume, flags, stamps);
                let closed = out.push(frame) == Err(PushError::Closed);
                // The volume path has the frame; a waiting sender hears back once the volume
                // is on disk, or after one TR (counted) so that a slow disk never stalls it.
                if recording && source.answers_sender() && !wait_recorded(m, seq + 1, tr.unwrap_or(1.0)) {
                    m.count_error("ack_before_recorded");
                }
                // The last volume's answer tells the sender the run is over.
                let last = closed || stop.load(Ordering::Acquire) || stop_after.is_some_and(|n| seq + 1 >= n);
                source.acknowledge(Ack::Accepted { index, last });
                if closed {
                    break;
                }
                seq += 1;
            }
        }
    }
    tracing::info!("ingest: stopped after {seq} volumes");
    (source, last_tr)
}

/// After the run ends, answers `STOP` to whatever a waiting sender still sends, for one TR and
/// a half (at most 3 s), so that pyneal's sender stops instead of waiting for a reply forever.
fn answer_stop_while_draining(mut source: Box<dyn crate::ingest::Source>, tr: Option<f64>, m: &Metrics) {
    if !source.answers_sender() {
        return;
    }
    let until = clock::now() + (1.5 * tr.unwrap_or(1.0)).clamp(0.5, 3.0);
    while clock::now() < until {
        let index = match source.next(POLL) {
            SourceEvent::Volume(v) => Some(v.index),
            SourceEvent::Rejected(_) => None,
            _ => continue,
        };
        m.count_error("refused_after_stop");
        source.acknowledge(Ack::Stopped { index });
    }
}

/// Waits until the recorder has finished with `n` volumes, for at most `seconds`; whether it has.
fn wait_recorded(m: &Metrics, n: u64, seconds: f64) -> bool {
    let deadline = clock::now() + seconds.clamp(0.01, 10.0);
    while m.record_attempts.load(Ordering::Acquire) < n {
        if clock::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    true
}

fn stage_loop(
    mut stage: Box<dyn Stage>,
    mut rx: EdgeRx<Frame>,
    mut tx: EdgeTx<Frame>,
    boundary: Boundary,
    m: &Metrics,
) {
    let mut last: Option<Frame> = None;
    loop {
        match rx.recv_timeout(POLL) {
            Recv::Msg(mut frame) => {
                if let Err(e) = stage.process(&mut frame) {
                    m.count_error(e.reason);
                    tracing::warn!("volume {}: {e}", frame.volume.index);
                    frame.stage_errors.push(e.to_string());
                }
                frame.stamps.set(boundary, clock::now());
                if !frame.end_of_run {
                    last = Some(Frame::end_of_run_after(&frame));
                }
                if tx.push(frame) == Err(PushError::Closed) {
                    return;
                }
            }
            Recv::Timeout => {}
            Recv::Closed => break,
        }
    }
    if let Some(mut f) = last.and_then(|l| stage.flush(&l)) {
        f.stamps.set(boundary, clock::now());
        let _ = tx.push(f);
    }
}

/// The decode worker: decodes the trials of each frame the dispatch hands over (and runs
/// calibration), and sends the results to publish, waking it. It runs inside a thread pool
/// of `decode.threads`, which candle's matrix products then use.
fn decode_worker(
    mut adapter: DecodeStageAdapter,
    mut rx: EdgeRx<Frame>,
    tx: crossbeam_channel::Sender<Frame>,
    waker: crate::queue::Waker,
    m: &Metrics,
) {
    let send = |f: Frame| {
        if tx.send(f).is_ok() {
            waker.wake();
        }
    };
    // The first decode (paging weights in, making candle's pool) happens here, on a decode
    // thread at its lower priority, before any trial waits for it.
    if let Err(e) = adapter.stage.warm_up() {
        tracing::warn!("decode warm-up: {e}");
    }
    let mut last: Option<Frame> = None;
    loop {
        match rx.recv_timeout(POLL) {
            Recv::Msg(mut frame) => {
                if let Err(e) = adapter.process(&mut frame) {
                    m.count_error(e.reason);
                    tracing::warn!("volume {}: {e}", frame.volume.index);
                }
                frame.stamps.set(Boundary::Decode, clock::now());
                last = Some(Frame::end_of_run_after(&frame));
                send(frame);
            }
            Recv::Timeout => {
                if let Some(f) = last.as_ref().and_then(|l| adapter.idle(l)) {
                    send(f);
                }
            }
            Recv::Closed => break,
        }
    }
    if let Some(f) = last.as_ref().and_then(|l| adapter.flush(l)) {
        send(f);
    }
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn record_loop(mut writer: SessionWriter, mut rx: EdgeRx<RecordItem>, m: &Metrics) {
    loop {
        match rx.recv_timeout(POLL) {
            Recv::Msg(item) => {
                let flags = serde_json::to_value(item.flags).unwrap_or_default();
                match writer.append(item.seq, &item.volume, flags) {
                    Ok(()) => {
                        m.recorded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        m.count_error("record_io");
                        tracing::error!("{e}");
                    }
                }
                m.record_attempts.fetch_add(1, Ordering::Release);
            }
            Recv::Timeout => {}
            Recv::Closed => break,
        }
    }
    if let Err(e) = writer.sync() {
        m.count_error("record_io");
        tracing::error!("{e}");
    }
}

/// Publishes a frame's calibration events and decoded trials.
fn publish_results(publisher: &mut Publisher, frame: &Frame, m: &Metrics) {
    for ev in &frame.calibration {
        publisher.send(calibration_message(ev));
        let progress = match (ev.phase, ev.step) {
            ("collecting", _) => format!("collecting {}/{}", ev.collected, ev.needed),
            ("fitting", Some((step, steps))) => match &ev.fit_stage {
                Some(stage) => format!("fitting {stage} {step}/{steps}"),
                None => format!("fitting {step}/{steps}"),
            },
            (phase, _) => phase.to_string(),
        };
        if let Ok(mut c) = m.calibration.lock() {
            *c = Some(progress);
        }
        if matches!(ev.phase, "failed" | "incomplete") {
            m.count_error("calibration_failed");
            tracing::error!("calibration: {}", ev.error.as_deref().unwrap_or(ev.phase));
        }
    }
    for d in &frame.decoded {
        publisher.send(decode_message(d));
        m.decoded.fetch_add(1, Ordering::Relaxed);
        if d.over_budget {
            m.count_error("decode_over_budget");
        }
    }
}

/// Publishes one frame of late results (decoded trials, calibration events).
fn publish_late(publisher: &mut Publisher, frame: &Frame, m: &Metrics) {
    publish_results(publisher, frame, m);
    if let Some(closed) = frame.stamps.get(Boundary::Glm) {
        if !frame.decoded.is_empty() {
            m.record_trial_decode((clock::now() - closed) * 1e3);
        }
    }
}

fn publish_loop(
    mut publisher: Publisher,
    mut rx: EdgeRx<Frame>,
    late: Option<crossbeam_channel::Receiver<Frame>>,
    m: &Metrics,
    status_interval_s: f64,
    recorded_all: &AtomicBool,
) {
    let mut next_status = clock::now() + status_interval_s;
    let mut reported_errors = 0;
    loop {
        if let Some(late) = &late {
            for f in late.try_iter() {
                publish_late(&mut publisher, &f, m);
            }
        }
        let wait = Duration::from_secs_f64((next_status - clock::now()).clamp(0.0, POLL.as_secs_f64()));
        match rx.recv_timeout(wait) {
            Recv::Msg(mut frame) => {
                frame.stamps.set(Boundary::Published, clock::now());
                if let Some(g) = &frame.glm {
                    for t in &g.trials {
                        publisher.send(betas_message(&frame, t));
                    }
                    for (reason, n) in [
                        ("nan_voxels", g.new_nan_voxels),
                        ("late_events", g.late_events),
                        ("rejected_events", g.rejected_events),
                    ] {
                        (0..n).for_each(|_| m.count_error(reason));
                    }
                }
                publish_results(&mut publisher, &frame, m);
                if frame.end_of_run {
                    continue;
                }
                if let Some(mo) = &frame.motion {
                    publisher.send(motion_message(&frame, mo));
                }
                let roi = frame.glm.as_ref().map(|g| g.roi.as_slice()).unwrap_or_default();
                if !roi.is_empty() {
                    publisher.send(roi_message(&frame, roi));
                }
                publisher.send(volume_message(&frame));
                let done = clock::now();
                frame.stamps.set(Boundary::Published, done);
                let acq = frame.volume.acq_time;
                m.record_latency(&frame.stamps, acq.map(|a| (done - a) * 1e3));
                m.published.fetch_add(1, Ordering::Relaxed);
                let psc: Vec<f64> = roi.iter().map(|r| r.psc.unwrap_or(f64::NAN)).collect();
                publisher.feedback(
                    frame.volume.index,
                    frame.stamps.total_ms().unwrap_or(f64::NAN),
                    &psc,
                    acq.unwrap_or(done),
                );
            }
            Recv::Timeout => {}
            Recv::Closed => {
                // The decode worker ends after the volume path; publish what it still sends.
                for f in late.iter().flat_map(|l| l.iter()) {
                    publish_late(&mut publisher, &f, m);
                }
                break;
            }
        }
        if publisher.send_errors() > reported_errors {
            for _ in reported_errors..publisher.send_errors() {
                m.count_error("publish");
            }
            reported_errors = publisher.send_errors();
        }
        if clock::now() >= next_status {
            publisher.send(status_message(&m.snapshot()));
            next_status += status_interval_s;
        }
    }
    while !recorded_all.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
        if clock::now() >= next_status {
            publisher.send(status_message(&m.snapshot()));
            next_status += status_interval_s;
        }
    }
    publisher.send(status_message(&m.snapshot()));
    publisher.close();
}
