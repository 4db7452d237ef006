//! Building a pipeline from a resolved configuration: every stage and sink made and checked
//! before any volume flows, then the threads started, sinks first.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::resolve::{OpenSource, Resolved, Topology};
use super::{
    answer_stop_while_draining, ingest_loop, lower_priority, publish_loop, record_loop, spawn, stage_loop,
    HandOff, IngestPlan, Pipeline, PipelineHandle, Results, SetOnDrop, RESULTS_QUEUE, WORKER_NICE,
};
use crate::clock;
use crate::config::Config;
use crate::console::{ConsoleFeed, ConsoleSetup};
use crate::event::Event;
use crate::frame::{latency_keys, Boundary, Frame, RecordItem};
use crate::ingest::Endpoint;
use crate::io::session::{MessageLog, SessionWriter, SyncPolicy};
use crate::metrics::Metrics;
use crate::publish::results::ResultsBoard;
use crate::publish::{FeedbackOutlet, Publisher};
use crate::queue::{edge, handoff, EdgeRx, EdgeTx, WhenFull};
use crate::stage::{OffPath, Stage};

/// Setup errors, every one of them (the user fixes all at once).
type Errors = Vec<String>;

fn one(e: impl ToString) -> Errors {
    vec![e.to_string()]
}

/// Live events from the marker reader waiting for ingest (beyond this they are dropped and
/// counted, `events_dropped`).
const MARKER_QUEUE: usize = 4096;

/// The bounded edges between the threads, each registered with the metrics: one into each
/// stage of `names` (ingest … publish) from the one before, and the recorder's.
struct Edges {
    frames: Vec<(EdgeTx<Frame>, EdgeRx<Frame>)>,
    record: (EdgeTx<RecordItem>, EdgeRx<RecordItem>),
}

impl Edges {
    fn new(cfg: &Config, names: &[&str], metrics: &Metrics) -> Edges {
        let p = &cfg.pipeline;
        let last = names.len().saturating_sub(2);
        let frames = names
            .windows(2)
            .enumerate()
            .map(|(k, w)| {
                // Only the edge into publish may drop; the volume path before it is lossless.
                let policy = if k == last { p.publish_when_full } else { WhenFull::Block };
                let (tx, rx) =
                    edge::<Frame>(format!("{}->{}", w[0], w[1]), p.queue_capacity, p.queue_bytes, policy);
                metrics.add_edge(tx.stats());
                (tx, rx)
            })
            .collect();
        let record = edge::<RecordItem>("ingest->record", p.record_capacity, usize::MAX, WhenFull::Block);
        metrics.add_edge(record.0.stats());
        Edges { frames, record }
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
        "mirage_commit": env!("MIRAGE_COMMIT"),
        "started_unix": clock::unix_now(),
        "started_monotonic": started,
        "ingest": cfg.ingest.uri,
        "config": recorded_config(cfg),
    });
    let writer = SessionWriter::create(&dir, &meta).map_err(one)?;
    let log = MessageLog::open(&dir).map_err(one)?;
    Ok(Some(Session { dir, writer, log }))
}

/// The configuration as the session folder records it: everything but the web token, which
/// would let whoever reads the folder into a later run's console.
fn recorded_config(cfg: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    if cfg.security.token.is_some() {
        v["security"]["token"] = serde_json::json!("(set; not recorded)");
    }
    v
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
    /// Validates `cfg`, loads every input it names, opens every socket, file and outlet, and
    /// starts the threads. Returns every error found, not just the first.
    pub fn build(cfg: &Config) -> Result<PipelineHandle, Vec<String>> {
        Pipeline::start(Resolved::new(cfg)?)
    }

    /// As [`Pipeline::build`], with the volume path `topology` builds.
    pub fn build_with(cfg: &Config, topology: &Topology) -> Result<PipelineHandle, Vec<String>> {
        Pipeline::start(Resolved::with_topology(cfg, topology)?)
    }

    /// Starts a pipeline from a resolved configuration: the session folder (so that a setup
    /// error leaves none), the console and the threads.
    pub fn start(mut r: Resolved) -> Result<PipelineHandle, Vec<String>> {
        warn_exposed(&[r.uri.bound_endpoint(), r.publish.as_ref()]);
        let stages = std::mem::take(&mut r.stages);
        let names = latency_keys(stages.iter().map(|s| s.name()));
        let started = clock::now();
        let metrics = Arc::new(Metrics::with_stages(started, names.clone()));
        metrics.register(&super::resolve::counted_reasons());
        let mut handle = PipelineHandle {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            metrics: metrics.clone(),
            session_dir: None,
            source: String::new(),
        };
        let session = open_session(&r.cfg, r.session_dir.clone(), started)?;
        handle.session_dir = session.as_ref().map(|s| s.dir.clone());
        let console = start_console(&r, &names, &metrics, &mut handle)?;
        let edges = Edges::new(&r.cfg, &names, &metrics);
        let publish_ep = r.publish.take();
        let source = r.source_opener();
        let mut wiring = Wiring { r: &r, metrics, handle, errors: Vec::new() };
        wiring.start(stages, edges, session, console, publish_ep, source)?;
        let Wiring { handle, errors, .. } = wiring;
        if errors.is_empty() {
            Ok(handle)
        } else {
            drop(handle);
            Err(errors)
        }
    }
}

/// The console's page or report, started, its first event naming the path's latency keys;
/// `None` when the configuration asks for neither.
fn start_console(
    r: &Resolved,
    names: &[&str],
    metrics: &Arc<Metrics>,
    handle: &mut PipelineHandle,
) -> Result<Option<ConsoleFeed>, Errors> {
    let cfg = &r.cfg.console;
    let report = cfg.report_path(handle.session_dir.as_deref());
    if cfg.listen.is_none() && report.is_none() {
        return Ok(None);
    }
    let mut hello = r.console_hello();
    hello.insert("stages".into(), names.iter().map(|n| serde_json::Value::from(*n)).collect());
    let setup = ConsoleSetup {
        listen: cfg.listen.clone(),
        hello,
        gallery: r.gallery.clone(),
        report,
        token: r.web_token.clone(),
    };
    let (feed, thread) = crate::console::start(setup, metrics.clone()).map_err(one)?;
    handle.threads.push(thread);
    Ok(Some(feed))
}

/// Starting the threads: what they share, and the errors of those that could not start.
struct Wiring<'a> {
    r: &'a Resolved,
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

    /// Starts a thread of the volume path, at `pipeline.realtime_priority` when set.
    fn spawn_volume_path(&mut self, name: &str, f: impl FnOnce() + Send + 'static) {
        let (priority, m) = (self.r.cfg.pipeline.realtime_priority, self.metrics.clone());
        self.spawn(name, move || {
            super::raise_priority(priority, &m);
            f()
        });
    }

    /// Sinks first (so that subscribers can connect before any volume flows), then the stage
    /// threads with their workers, the recorder, the marker reader and ingest last.
    fn start(
        &mut self,
        stages: Vec<Box<dyn Stage>>,
        edges: Edges,
        session: Option<Session>,
        console: Option<ConsoleFeed>,
        publish_ep: Option<Endpoint>,
        source: OpenSource,
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
        // Edge k runs from stage k to stage k + 1 of ingest, the path, publish: ingest sends on
        // the first, publish reads the last, stage k of the path reads k, sends k + 1.
        let Edges { frames, record } = edges;
        let (txs, mut rxs): (Vec<EdgeTx<Frame>>, Vec<EdgeRx<Frame>>) = frames.into_iter().unzip();
        let mut txs = txs.into_iter();
        let (Some(ingest_tx), Some(publish_rx)) = (txs.next(), rxs.pop()) else {
            return Err(one("the volume path has no edges"));
        };
        // The workers' frames reach publish off the volume path.
        let (results_tx, results_rx) = crossbeam_channel::bounded::<Frame>(RESULTS_QUEUE);
        let worker_out = Results { tx: results_tx, waker: publish_rx.waker() };
        let sink = PublishSink { endpoint: publish_ep, log, console, results };
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<String, String>>(1);
        self.start_publish(sink, publish_rx, results_rx, published_all, recorded_all, ready_tx.clone());
        self.await_ready(&ready_rx, "publish");

        for (i, (mut stage, (rx, tx))) in stages.into_iter().zip(rxs.into_iter().zip(txs)).enumerate() {
            let (m, boundary) = (self.metrics.clone(), Boundary::after_stage(i));
            let hand_off = match stage.off_path() {
                Some(off) => match self.start_worker(stage.name(), off, boundary, &worker_out) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        self.errors.extend(e);
                        continue;
                    }
                },
                None => None,
            };
            let priority = self.r.cfg.pipeline.realtime_priority;
            let stage_pool = match stage.threads() {
                1 => Ok(None),
                n => {
                    let m = m.clone();
                    pool(&format!("mirage/{}", stage.name()), n, move || super::raise_priority(priority, &m))
                        .map(Some)
                }
            };
            let stage_pool = match stage_pool {
                Ok(p) => p,
                Err(e) => {
                    self.errors.extend(e);
                    continue;
                }
            };
            self.spawn_volume_path(stage.name(), move || match stage_pool {
                Some(pool) => pool.install(|| stage_loop(stage, rx, tx, boundary, hand_off, &m)),
                None => stage_loop(stage, rx, tx, boundary, hand_off, &m),
            });
        }
        // Publish reads the workers' frames until the last worker's copy of this is gone.
        drop(worker_out);

        let (record_tx, record_rx) = record;
        let recording = writer.is_some();
        if let Some(writer) = writer {
            let m = self.metrics.clone();
            let flush_every_volume = self.r.cfg.record.sync == SyncPolicy::EveryVolume;
            self.spawn("record", move || {
                let _done = record_done;
                record_loop(writer, record_rx, flush_every_volume, &m);
            });
        }
        let (markers_tx, markers_rx) = crossbeam_channel::bounded::<Event>(MARKER_QUEUE);
        if let Some(name) = self.r.marker_stream() {
            let (s, m) = (self.handle.stop.clone(), self.metrics.clone());
            self.spawn("markers", move || crate::ingest::markers::marker_loop(&name, &markers_tx, &s, &m));
        }
        self.start_ingest(source, ingest_tx, recording.then_some(record_tx), markers_rx, ready_tx);
        if let Some(desc) = self.await_ready(&ready_rx, "ingest") {
            self.handle.source = desc;
        }
        Ok(())
    }

    /// Starts the worker `owner` sends work off the path to (and, first, the workers it sends
    /// work to in turn), in a pool below the volume path's priority; its hand-off, registered
    /// with the metrics as `OWNER hand-off`.
    fn start_worker(
        &mut self,
        owner: &'static str,
        off: OffPath,
        boundary: Boundary,
        out: &Results,
    ) -> Result<HandOff, Errors> {
        let OffPath { mut worker, threads, capacity, when_full, dropped } = off;
        let name = worker.name();
        let (tx, rx) = handoff::<Frame>(format!("{owner} hand-off"), capacity, when_full);
        self.metrics.add_edge(tx.stats());
        let next = match worker.off_path() {
            Some(o) => Some(self.start_worker(name, o, boundary, out)?),
            None => None,
        };
        let pool = pool(&format!("mirage/{name}"), threads, || lower_priority(WORKER_NICE))?;
        let (m, out) = (self.metrics.clone(), out.clone());
        let work = move || stage_loop(worker, rx, out, boundary, next, &m);
        let thread = spawn(name, move || pool.install(work)).map_err(one)?;
        self.handle.threads.push(thread);
        Ok(HandOff { tx, dropped, worker: name })
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

    /// The Prometheus endpoint and the results server, when configured: both bound before
    /// either thread starts, so that one that cannot bind ends the start with nothing serving.
    fn start_servers(
        &mut self,
        published_all: &Arc<AtomicBool>,
    ) -> Result<Option<Arc<ResultsBoard>>, Errors> {
        let cfg = &self.r.cfg.publish;
        let metrics = cfg.metrics.as_ref().map(|a| crate::publish::prometheus::bind(a).map(|l| (a, l)));
        let results = cfg.results.as_ref().map(|a| crate::publish::results::bind(a).map(|l| (a, l)));
        let (metrics, results) = match (metrics.transpose(), results.transpose()) {
            (Ok(m), Ok(r)) => (m, r),
            (m, r) => return Err(m.err().into_iter().chain(r.err()).collect()),
        };
        if let Some((addr, listener)) = metrics {
            let (m, done, token) = (self.metrics.clone(), published_all.clone(), self.r.web_token.clone());
            let thread =
                spawn("metrics", move || crate::publish::prometheus::serve(listener, m, done, token))
                    .map_err(one)?;
            self.handle.threads.push(thread);
            tracing::info!("metrics: http://{addr}/metrics");
        }
        let Some((addr, listener)) = results else { return Ok(None) };
        let board = Arc::new(ResultsBoard::default());
        let (b, m, done, allow) =
            (board.clone(), self.metrics.clone(), published_all.clone(), self.r.allow.clone());
        let thread = spawn("results", move || crate::publish::results::serve(listener, b, m, done, allow))
            .map_err(one)?;
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
        results_rx: crossbeam_channel::Receiver<Frame>,
        published_all: Arc<AtomicBool>,
        recorded_all: Arc<AtomicBool>,
        ready: crossbeam_channel::Sender<Result<String, String>>,
    ) {
        let cfg = &self.r.cfg;
        let feedback: Option<FeedbackOutlet> = self.r.feedback_outlet();
        let curve = self.r.publish_curve.clone();
        let lsl_wait_s = cfg.publish.lsl_wait_s;
        let (hwm, interval) = (cfg.publish.send_hwm, cfg.publish.status_interval_s);
        let m = self.metrics.clone();
        // Set when publish ends, panics or never starts.
        let published_all = SetOnDrop(published_all);
        self.spawn_volume_path("publish", move || {
            let _done = published_all;
            let PublishSink { endpoint, log, console, results } = sink;
            let publisher =
                match Publisher::new(endpoint.as_ref(), curve.as_ref(), hwm, feedback.as_ref(), log) {
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
            publish_loop(publisher, rx, results_rx, &m, interval, &recorded_all);
        });
    }

    /// The ingest thread: opens the source, runs the volume path's head, and answers `STOP`
    /// while the rest drains.
    fn start_ingest(
        &mut self,
        open: OpenSource,
        out: EdgeTx<Frame>,
        record: Option<EdgeTx<RecordItem>>,
        markers: crossbeam_channel::Receiver<Event>,
        ready: crossbeam_channel::Sender<Result<String, String>>,
    ) {
        // The URI's `?tr=` wins over `ingest.tr`, which wins over the sender's headers.
        let n_stages = self.metrics.stage_names().len() - 2;
        let cfg = &self.r.cfg;
        if self.r.configured_tr().is_some() {
            crate::ingest::wire::tr_configured();
        }
        let plan = IngestPlan {
            stop_after: cfg.ingest.stop_after,
            idle_exit_s: cfg.ingest.idle_exit_s,
            tr: self.r.configured_tr(),
            n_stages,
        };
        let (m, s) = (self.metrics.clone(), self.handle.stop.clone());
        self.spawn_volume_path("ingest", move || match open() {
            Ok(source) => {
                let _ = ready.send(Ok(source.describe()));
                let (source, last_tr) = ingest_loop(source, out, record, &markers, &m, &s, plan);
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

/// A pool of `threads` threads named `PREFIXi`, each calling `on_start` first (to set its
/// priority): the workers', and those of a stage asking for `Stage::threads`.
fn pool(
    prefix: &str,
    threads: usize,
    on_start: impl Fn() + Send + Sync + 'static,
) -> Result<rayon::ThreadPool, Errors> {
    let name = prefix.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}{i}"))
        .start_handler(move |_| on_start())
        .build()
        .map_err(|e| one(format!("{prefix} threads: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::WhenFull;

    #[test]
    fn the_runner_wires_the_edges_the_architecture_names_and_every_volume_goes_through() {
        let mut cfg = super::super::quiet::sim_config(6);
        cfg.pipeline.publish_when_full = WhenFull::DropNewest;
        let handle = Pipeline::build(&cfg).unwrap_or_else(|e| panic!("{e:?}"));
        let snap = handle.wait();
        let edges: Vec<(&str, WhenFull, u64)> =
            snap.queues.iter().map(|q| (q.name.as_str(), q.policy, q.pushed)).collect();
        // One edge into each stage of the path from the one before: lossless up to the last
        // stage, the edge into publish by its policy; then the recorder's.
        let last = snap.stages.len() - 2;
        let mut want: Vec<(String, WhenFull, u64)> = snap
            .stages
            .windows(2)
            .enumerate()
            .map(|(k, w)| {
                let policy = if k == last { WhenFull::DropNewest } else { WhenFull::Block };
                (format!("{}->{}", w[0], w[1]), policy, 6)
            })
            .collect();
        // Not recording: the edge exists, nothing is pushed to it.
        want.push(("ingest->record".into(), WhenFull::Block, 0));
        let want: Vec<(&str, WhenFull, u64)> = want.iter().map(|(n, p, k)| (n.as_str(), *p, *k)).collect();
        assert_eq!(edges, want, "{:?}", snap.queues);
        // The stages the architecture names, in its order, between ingest and publish.
        let at = |name: &str| snap.stages.iter().position(|s| s == name);
        assert!(at("ingest") == Some(0) && at("publish") == Some(snap.stages.len() - 1), "{:?}", snap.stages);
        assert!(
            at("motion") < at("glm") && at("glm") < at("decode") && at("motion").is_some(),
            "{:?}",
            snap.stages
        );
        assert_eq!(snap.received, 6);
    }

    /// A stage the built-in path does not have: it counts the frames it sees and what the
    /// stages before and after it have added to them.
    struct Probe {
        seen: Arc<[std::sync::atomic::AtomicU64; 3]>,
    }

    impl Stage for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }

        fn process(&mut self, frame: &mut Frame) -> Result<(), crate::stage::StageError> {
            let [all, motion, glm] = &*self.seen;
            all.fetch_add(1, Ordering::Relaxed);
            if frame.outputs.get::<crate::motion::MotionEstimate>().is_some() {
                motion.fetch_add(1, Ordering::Relaxed);
            }
            if frame.outputs.get::<crate::glm::GlmOutput>().is_some() {
                glm.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    }

    #[test]
    fn a_stage_added_to_the_topology_gets_its_thread_edges_stamps_and_place() {
        let cfg = super::super::quiet::sim_config(6);
        let seen: Arc<[std::sync::atomic::AtomicU64; 3]> = Arc::default();
        // Between motion and the GLM: one line, as in the topology.
        let mut topology = Topology::standard();
        let probe = seen.clone();
        topology.0.insert(
            1,
            Box::new(move |_| Ok(Some(Box::new(Probe { seen: probe.clone() }) as Box<dyn Stage>))),
        );
        let snap = Pipeline::build_with(&cfg, &topology).unwrap_or_else(|e| panic!("{e:?}")).wait();
        // Its place: right after motion, before the GLM, with an edge in and out like any stage.
        let at = |name: &str| snap.stages.iter().position(|s| s == name);
        let (motion, probe, glm) = (at("motion"), at("probe"), at("glm"));
        assert!(motion.is_some() && probe == motion.map(|m| m + 1) && probe < glm, "{:?}", snap.stages);
        let pushed = |edge: String| snap.queues.iter().find(|q| q.name == edge).map(|q| q.pushed);
        let next = &snap.stages[probe.unwrap_or_default() + 1];
        assert_eq!(pushed("motion->probe".into()), Some(6), "{:?}", snap.queues);
        assert_eq!(pushed(format!("probe->{next}")), Some(6), "{:?}", snap.queues);
        assert_eq!(snap.stage_latency_ms["probe"].count, 6, "{:?}", snap.stage_latency_ms);
        let [all, motion, glm] = seen.each_ref().map(|a| a.load(Ordering::Relaxed));
        // Every frame, after motion realigned it and before the GLM saw it.
        assert_eq!((all, motion, glm), (6, 6, 0));
        assert_eq!(snap.published, 6);
    }

    /// Records the scheduling policy and priority of the thread that runs it.
    struct Policy(Arc<std::sync::Mutex<Vec<(i32, i32)>>>);

    impl Stage for Policy {
        fn name(&self) -> &'static str {
            "policy"
        }

        fn process(&mut self, _frame: &mut Frame) -> Result<(), crate::stage::StageError> {
            let (mut policy, mut param) = (-1, libc::sched_param { sched_priority: -1 });
            // SAFETY: reads the calling thread's policy into valid locals.
            unsafe { libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut param) };
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push((policy, param.sched_priority));
            Ok(())
        }
    }

    #[test]
    fn the_volume_path_runs_at_the_realtime_priority_or_counts_the_refusal() {
        let mut cfg = super::super::quiet::sim_config(4);
        cfg.pipeline.realtime_priority = 7;
        let mut r = Resolved::new(&cfg).unwrap_or_else(|e| panic!("{e:?}"));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        r.stages.insert(1, Box::new(Policy(seen.clone())));
        let snap = Pipeline::start(r).unwrap_or_else(|e| panic!("{e:?}")).wait();
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(seen.len(), 4);
        let refused = snap.errors.get("realtime_refused").copied().unwrap_or(0);
        if refused == 0 {
            assert!(seen.iter().all(|&p| p == (libc::SCHED_FIFO, 7)), "{seen:?}");
        } else {
            // Every volume-path thread tried and was refused: ingest, four stages, publish, and
            // the threads of the motion stage's pool.
            assert_eq!(refused, 6 + cfg.motion.threads as u64, "{:?}", snap.errors);
            assert!(seen.iter().all(|&(policy, _)| policy == libc::SCHED_OTHER), "{seen:?}");
        }
        assert_eq!(snap.published, 4);
    }

    #[test]
    fn the_session_records_the_configuration_but_not_the_web_token() {
        let mut cfg = Config::default();
        cfg.security.token = Some("0123456789abcdef-token-value".into());
        let text = recorded_config(&cfg).to_string();
        assert!(!text.contains("token-value") && text.contains("not recorded"), "{text}");
        assert_eq!(recorded_config(&cfg)["ingest"], serde_json::to_value(&cfg.ingest).unwrap());
    }

    #[test]
    fn every_counter_is_named_once_explained_and_exported_before_it_happens() {
        let all = super::super::resolve::counted_reasons();
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
            I::Marker(crate::event::EventError::Marker { marker: s(), reason: s() }).reason(),
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
            assert!(
                super::super::resolve::counted_reasons().contains(&r),
                "{r:?} is counted but not registered"
            );
        }
    }
}
