//! The runner: threads, queues and timestamps around the stages.
//!
//! ```text
//! ingest ─┬─► motion ─► glm ─► decode ─► publish ──► ZMQ PUB, LSL outlet, messages.jsonl
//!         └─► recorder ──► session folder (every accepted volume, before anything can drop it)
//! ```
//!
//! Each box is a named thread (`mirage/motion`, …) joined by bounded SPSC edges
//! ([`crate::queue`]). Edges up to decode block when full (lossless backpressure, counted);
//! the edge into publish follows `pipeline.publish_when_full`; the recorder edge always
//! blocks. Stamps are taken at every boundary ([`crate::frame::Boundary`]).
//! [`Pipeline::build`] gathers every setup error before anything runs; [`PipelineHandle`]
//! stops and joins on drop.

mod build;
pub mod calibration;
#[cfg(test)]
mod quiet;
pub mod resolve;
pub mod stage;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use self::stage::DecodeStageAdapter;
use crate::calibrate::CalibrationEvent;
use crate::clock;
use crate::decode::mindeye2::MindEye2;
use crate::decode::{Decoded, Picture};
use crate::frame::{Boundary, Frame, FrameKind, IngestFlags, RecordItem, Stamps};
use crate::glm::events::Event;
use crate::glm::stage::LiveEvents;
use crate::glm::GlmOutput;
use crate::ingest::{Ack, SourceEvent};
use crate::io::session::SessionWriter;
use crate::metrics::{Metrics, MetricsSnapshot, Reason};
use crate::motion::MotionEstimate;
use crate::publish::{betas_message, decode_message, motion_message, roi_message, volume_message, Publisher};
use crate::queue::{EdgeRx, EdgeTx, PushError, Recv};
use crate::stage::Stage;
use crate::topic::Topic;
use crate::volume::Volume;

/// The recorder's edge was closed under ingest.
pub const RECORD_CLOSED: Reason =
    Reason::new("record_closed", "volumes the recorder's closed edge could not take");
/// A waiting sender was answered before its volume was written to the session (after one TR).
pub const ACK_BEFORE_RECORDED: Reason =
    Reason::new("ack_before_recorded", "senders answered after one TR, before their volume was written");
/// A volume sent after the run's STOP.
pub const REFUSED_AFTER_STOP: Reason =
    Reason::new("refused_after_stop", "volumes sent after the run was over, answered STOP");
/// A session write or sync that failed.
pub const RECORD_IO: Reason = Reason::new("record_io", "session folder writes or syncs that failed");
/// Calibration mode ended without a fitted alignment.
pub const CALIBRATION_FAILED: Reason =
    Reason::new("calibration_failed", "calibrations that failed or ended incomplete");
/// A live trial whose decode took longer than `decode.latency_budget_ms`.
pub const DECODE_OVER_BUDGET: Reason =
    Reason::new("decode_over_budget", "live trials decoded later than decode.latency_budget_ms");
/// A MindEye2 trial's picture that reached publish later than `decode.latency_budget_ms` after
/// its trial closed (it follows the decode; a CPU takes seconds per picture).
pub const PICTURE_OVER_BUDGET: Reason = Reason::new(
    "picture_over_budget",
    "pictures published later than decode.latency_budget_ms after trial close",
);
/// A MindEye2 trial's picture not made: a newer trial replaced it while the picture worker was
/// busy.
pub const PICTURE_DROPPED: Reason = Reason::new(
    "picture_dropped",
    "pictures not made: a newer trial replaced the waiting one while the picture worker was busy",
);
/// A message the publish socket could not send.
pub const PUBLISH: Reason = Reason::new("publish", "messages the publish socket could not send");
/// Counted when: a subscriber whose CURVE key is not in `publish.curve.clients` tried to connect.
pub const SUBSCRIBER_REFUSED: Reason =
    Reason::new("subscriber_refused", "PUB connections refused: CURVE key not in publish.curve.clients");
/// What the runner counts itself.
pub const REASONS: &[Reason] = &[
    crate::glm::events::EVENTS_DROPPED,
    RECORD_CLOSED,
    ACK_BEFORE_RECORDED,
    REFUSED_AFTER_STOP,
    RECORD_IO,
    CALIBRATION_FAILED,
    DECODE_OVER_BUDGET,
    PICTURE_OVER_BUDGET,
    PICTURE_DROPPED,
    PUBLISH,
    SUBSCRIBER_REFUSED,
];

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

/// Puts the calling thread under SCHED_FIFO at `priority` (0: leaves it as it is); refused
/// (no CAP_SYS_NICE or rtprio limit), it stays under the normal scheduler, logged and counted.
pub(crate) fn raise_priority(priority: u8, m: &Metrics) {
    if priority == 0 {
        return;
    }
    let param = libc::sched_param { sched_priority: i32::from(priority) };
    // SAFETY: sets the scheduling policy of the calling thread from a valid, initialised param.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc != 0 {
        let thread = std::thread::current();
        tracing::warn!(
            "pipeline.realtime_priority {priority}: {} stays under the normal scheduler: {}",
            thread.name().unwrap_or("a thread"),
            std::io::Error::from_raw_os_error(rc)
        );
        m.count_error("realtime_refused");
    }
}

/// Frames of trials waiting for the decode worker, and of its results waiting for publish.
const LATE_QUEUE: usize = 256;

/// Live events waiting for the GLM stage.
const EVENT_QUEUE: usize = 4096;

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

/// What ingest takes from the configuration: the run's length and TR over its sender's, and
/// the number of stages its frames' stamps span.
struct IngestPlan {
    stop_after: Option<u64>,
    tr: Option<f64>,
    n_stages: usize,
}

fn ingest_loop(
    mut source: Box<dyn crate::ingest::Source>,
    mut out: EdgeTx<Frame>,
    mut record: Option<EdgeTx<RecordItem>>,
    events: &crossbeam_channel::Sender<Event>,
    m: &Metrics,
    stop: &AtomicBool,
    IngestPlan { stop_after, tr, n_stages }: IngestPlan,
) -> (Box<dyn crate::ingest::Source>, Option<f64>) {
    tracing::info!("ingest: {}", source.describe());
    let mut last_tr = tr;
    let mut tracker = IndexTracker::default();
    let mut seq = 0u64;
    // Markers since the last volume, recorded with the next one (a replay plays them there).
    let mut markers = Vec::new();
    while !stop.load(Ordering::Acquire) && stop_after.is_none_or(|n| seq < n) {
        match source.next(POLL) {
            SourceEvent::Idle => {}
            SourceEvent::End => break,
            SourceEvent::Refused(n) => (0..n).for_each(|_| m.count(crate::ingest::SENDER_REFUSED)),
            SourceEvent::Marker(e) => {
                if record.is_some() {
                    markers.push(serde_json::to_value(&e).unwrap_or_default());
                }
                if events.try_send(e).is_err() {
                    m.count(crate::glm::events::EVENTS_DROPPED);
                }
            }
            SourceEvent::Rejected(e) => {
                m.rejected.fetch_add(1, Ordering::Relaxed);
                m.count(e.reason());
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
                        let item = RecordItem {
                            seq,
                            volume: volume.clone(),
                            flags,
                            markers: std::mem::take(&mut markers),
                        };
                        let pushed = r.push(item).is_ok();
                        if !pushed {
                            m.count(RECORD_CLOSED);
                        }
                        pushed
                    }
                    None => false,
                };
                let tr = volume.tr;
                last_tr = tr.or(last_tr);
                let mut stamps = Stamps::new(n_stages);
                stamps.set(Boundary::RECEIVED, volume.recv_time);
                stamps.set(Boundary::INGESTED, clock::now());
                let frame = Frame::new(seq, volume, flags, stamps);
                let closed = out.push(frame) == Err(PushError::Closed);
                // The volume path has the frame; a waiting sender hears back once the volume
                // is written to the session (the flush to disk is not waited for), or after one
                // TR (counted) so that a slow disk never stalls it.
                let one_tr =
                    Duration::from_secs_f64(tr.filter(|t| t.is_finite()).unwrap_or(1.0).clamp(0.01, 10.0));
                if recording && source.answers_sender() && !m.record_attempts.wait_for(seq + 1, one_tr) {
                    m.count(ACK_BEFORE_RECORDED);
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
        m.count(REFUSED_AFTER_STOP);
        source.acknowledge(Ack::Stopped { index });
    }
}

/// Runs one stage on its thread: each frame from `rx` (with the live events waiting in
/// `events`, when the stage takes them) through `process`, stamped at `boundary`, on to `tx`;
/// `flush` when the input ends.
fn stage_loop(
    mut stage: Box<dyn Stage>,
    mut rx: EdgeRx<Frame>,
    mut tx: EdgeTx<Frame>,
    boundary: Boundary,
    events: Option<crossbeam_channel::Receiver<Event>>,
    m: &Metrics,
) {
    let mut last: Option<Frame> = None;
    loop {
        match rx.recv_timeout(POLL) {
            Recv::Msg(mut frame) => {
                if let Some(e) = &events {
                    let live: Vec<Event> = e.try_iter().collect();
                    if !live.is_empty() {
                        frame.outputs.update::<LiveEvents>(|l| l.0.extend(live));
                    }
                }
                if let Err(e) = stage.process(&mut frame) {
                    m.count_error(e.reason);
                    tracing::warn!("volume {}: {e}", frame.volume.index);
                    frame.stage_errors.push(e.to_string());
                }
                frame.stamps.set(boundary, clock::now());
                if frame.kind == FrameKind::Volume {
                    last = Some(Frame::results_after(&frame));
                }
                if tx.push(frame) == Err(PushError::Closed) {
                    return;
                }
                let Some(l) = &last else { continue };
                match stage.after(l) {
                    Ok(Some(mut f)) => {
                        f.stamps.set(boundary, clock::now());
                        if tx.push(f) == Err(PushError::Closed) {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        m.count_error(e.reason);
                        tracing::warn!("after volume {}: {e}", l.volume.index);
                    }
                }
            }
            Recv::Timeout => {}
            Recv::Closed => break,
        }
    }
    if let Some(mut f) = last.and_then(|l| stage.flush(&Frame::end_of_run_after(&l))) {
        f.stamps.set(boundary, clock::now());
        let _ = tx.push(f);
    }
}

/// A decoded trial's blurry latent on its way to the picture worker.
struct PictureJob {
    /// A results frame after the decode's (the picture's goes out in it).
    template: Frame,
    trial: crate::glm::TrialBetas,
    latent: Vec<f32>,
    closed_time: Option<f64>,
}

/// The picture worker's hand-off: one waiting trial at most, the newest (a picture of an older
/// trial is stale feedback).
struct PictureQueue {
    tx: crossbeam_channel::Sender<PictureJob>,
    rx: crossbeam_channel::Receiver<PictureJob>,
}

impl PictureQueue {
    fn new() -> PictureQueue {
        let (tx, rx) = crossbeam_channel::bounded(1);
        PictureQueue { tx, rx }
    }

    /// Queues `job`, replacing (and counting) a trial still waiting: a decode never waits.
    fn push(&self, mut job: PictureJob, m: &Metrics) {
        loop {
            match self.tx.try_send(job) {
                Ok(()) => return,
                Err(crossbeam_channel::TrySendError::Full(back)) => {
                    if self.rx.try_recv().is_ok() {
                        m.count(PICTURE_DROPPED);
                    }
                    job = back;
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// Hands each live decoded trial's `blurry_latent` to the picture worker.
fn hand_pictures(frame: &Frame, to: &PictureQueue, m: &Metrics) {
    for d in frame.outputs.get::<Vec<Decoded>>().into_iter().flatten().filter(|d| !d.trial.at_run_end) {
        let Some((_, _, latent)) = d.heads.iter().find(|(name, _, _)| name == "blurry_latent") else {
            continue;
        };
        let template = Frame::results_after(frame);
        let job = PictureJob {
            template,
            trial: d.trial.clone(),
            latent: latent.clone(),
            closed_time: d.closed_time,
        };
        to.push(job, m);
    }
}

/// The picture worker: makes each handed-over trial's picture (the SD VAE) and sends it to
/// publish, after its decode. It runs in a pool of its own at the decode threads' priority.
fn picture_worker(
    net: Arc<MindEye2>,
    device: String,
    budget_ms: f64,
    rx: crossbeam_channel::Receiver<PictureJob>,
    tx: crossbeam_channel::Sender<Frame>,
    waker: crate::queue::Waker,
    m: &Metrics,
) {
    for job in rx.iter() {
        let start = clock::now();
        match net.picture_png(&job.latent) {
            Ok(png) => {
                let now = clock::now();
                let over_budget = job.closed_time.is_some_and(|c| (now - c) * 1e3 > budget_ms);
                let picture = Picture {
                    trial: job.trial,
                    png,
                    device: device.clone(),
                    latency_ms: (now - start) * 1e3,
                    closed_time: job.closed_time,
                    over_budget,
                };
                let mut frame = job.template;
                frame.outputs.insert(vec![picture]);
                if tx.send(frame).is_ok() {
                    waker.wake();
                }
            }
            Err(e) => {
                m.count(e.reason());
                tracing::warn!("picture of trial {}: {e}", job.trial.trial);
            }
        }
    }
}

/// The decode worker: decodes the trials of each frame the dispatch hands over (and runs
/// calibration), hands MindEye2 latents to the picture worker, and sends the results to
/// publish, waking it. It runs inside a thread pool of `decode.threads`, which candle's matrix
/// products then use.
fn decode_worker(
    mut adapter: DecodeStageAdapter,
    boundary: Boundary,
    mut rx: EdgeRx<Frame>,
    (tx, pictures): (crossbeam_channel::Sender<Frame>, Option<PictureQueue>),
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
                if let Some(to) = &pictures {
                    hand_pictures(&frame, to, m);
                }
                frame.stamps.set(boundary, clock::now());
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

/// Appends each volume to the session (what a waiting sender's acknowledgement waits for); with
/// `flush_every_volume`, a flusher thread beside it `fdatasync`s after each append. A flush covers
/// every append before it, so a stalled disk's flushes coalesce instead of holding back appends.
fn record_loop(mut writer: SessionWriter, mut rx: EdgeRx<RecordItem>, flush_every_volume: bool, m: &Metrics) {
    let record_io = |e: &dyn std::fmt::Display| {
        m.count(RECORD_IO);
        tracing::error!("{e}");
    };
    std::thread::scope(|scope| {
        // One pending request at most: a request made while one waits is covered by that flush.
        let (flush_tx, flush_rx) = crossbeam_channel::bounded::<()>(1);
        if flush_every_volume {
            let flusher = writer.flusher().map_err(|e| e.to_string()).and_then(|f| {
                std::thread::Builder::new()
                    .name("mirage/flush".into())
                    .spawn_scoped(scope, move || {
                        while flush_rx.recv().is_ok() {
                            if let Err(e) = f.flush() {
                                record_io(&e);
                            }
                        }
                    })
                    .map_err(|e| format!("record: cannot start the flusher thread: {e}"))
            });
            if let Err(e) = flusher {
                record_io(&e);
            }
        }
        loop {
            match rx.recv_timeout(POLL) {
                Recv::Msg(item) => {
                    let flags = serde_json::to_value(item.flags).unwrap_or_default();
                    match writer.append(item.seq, &item.volume, flags, &item.markers) {
                        Ok(()) => {
                            m.recorded.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => record_io(&e),
                    }
                    m.record_attempts.advance();
                    let _ = flush_tx.try_send(());
                }
                Recv::Timeout => {}
                Recv::Closed => break,
            }
        }
    });
    if let Err(e) = writer.sync() {
        record_io(&e);
    }
}

/// Publishes a frame's calibration events and decoded trials.
fn publish_results(publisher: &mut Publisher, frame: &Frame, m: &Metrics) {
    for ev in frame.outputs.get::<Vec<CalibrationEvent>>().into_iter().flatten() {
        publisher.send(ev.message(Vec::new()));
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
            m.count(CALIBRATION_FAILED);
            tracing::error!("calibration: {}", ev.error.as_deref().unwrap_or(ev.phase));
        }
    }
    for d in frame.outputs.get::<Vec<Decoded>>().into_iter().flatten() {
        publisher.send(decode_message(d));
        m.decoded.fetch_add(1, Ordering::Relaxed);
        if d.over_budget {
            m.count(DECODE_OVER_BUDGET);
        }
    }
    for p in frame.outputs.get::<Vec<Picture>>().into_iter().flatten() {
        publisher.send(crate::publish::picture_message(p));
        if p.over_budget {
            m.count(PICTURE_OVER_BUDGET);
        }
    }
}

/// Publishes one frame of late results (decoded trials, calibration events).
fn publish_late(publisher: &mut Publisher, frame: &Frame, m: &Metrics) {
    publish_results(publisher, frame, m);
    let decoded = frame.outputs.get::<Vec<Decoded>>().map(Vec::as_slice).unwrap_or_default();
    if let Some(closed) = decoded.first().and_then(|d| d.closed_time) {
        m.record_trial_decode((clock::now() - closed) * 1e3);
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
    let stage_names = m.stage_names();
    loop {
        if let Some(late) = &late {
            for f in late.try_iter() {
                publish_late(&mut publisher, &f, m);
            }
        }
        let wait = Duration::from_secs_f64((next_status - clock::now()).clamp(0.0, POLL.as_secs_f64()));
        match rx.recv_timeout(wait) {
            Recv::Msg(mut frame) => {
                frame.stamps.set_published(clock::now());
                let glm = frame.outputs.get::<GlmOutput>();
                if let Some(g) = glm {
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
                if frame.kind != FrameKind::Volume {
                    continue;
                }
                if let Some(mo) = frame.outputs.get::<MotionEstimate>() {
                    publisher.send(motion_message(&frame, mo));
                }
                let roi = glm.map(|g| g.roi.as_slice()).unwrap_or_default();
                if !roi.is_empty() {
                    publisher.send(roi_message(&frame, roi));
                }
                publisher.send(volume_message(&frame, &stage_names));
                let done = clock::now();
                frame.stamps.set_published(done);
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
        (0..publisher.newly_refused()).for_each(|_| m.count(SUBSCRIBER_REFUSED));
        if publisher.send_errors() > reported_errors {
            for _ in reported_errors..publisher.send_errors() {
                m.count(PUBLISH);
            }
            reported_errors = publisher.send_errors();
        }
        if clock::now() >= next_status {
            publisher.send(m.snapshot().message(Vec::new()));
            next_status += status_interval_s;
        }
    }
    while !recorded_all.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
        if clock::now() >= next_status {
            publisher.send(m.snapshot().message(Vec::new()));
            next_status += status_interval_s;
        }
    }
    publisher.send(m.snapshot().message(Vec::new()));
    publisher.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(run: &str, index: u64, dims: [usize; 3]) -> Volume {
        Volume {
            data: Vec::new(),
            dims,
            affine: crate::volume::IDENTITY_AFFINE,
            index,
            run: run.into(),
            tr: None,
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        }
    }

    /// Notes, at each `after`, how many frames its output edge had taken by then.
    struct Deferring {
        out: Arc<crate::queue::EdgeStats>,
        seen: Arc<std::sync::Mutex<Vec<u64>>>,
    }

    impl Stage for Deferring {
        fn name(&self) -> &'static str {
            "deferring"
        }

        fn process(&mut self, _frame: &mut Frame) -> Result<(), crate::stage::StageError> {
            Ok(())
        }

        fn after(&mut self, _last: &Frame) -> Result<Option<Frame>, crate::stage::StageError> {
            self.seen.lock().unwrap().push(self.out.pushed.load(Ordering::Acquire));
            Ok(None)
        }
    }

    #[test]
    fn a_stage_s_deferred_work_runs_once_its_frame_has_gone_on() {
        use crate::queue::{edge, WhenFull};
        let (mut in_tx, in_rx) = edge::<Frame>("in", 8, 1 << 20, WhenFull::Block);
        let (out_tx, _out_rx) = edge::<Frame>("out", 8, 1 << 20, WhenFull::Block);
        let seen = Arc::default();
        let stage = Box::new(Deferring { out: out_tx.stats(), seen: Arc::clone(&seen) });
        for i in 0..3 {
            let v = Arc::new(volume("r", i, [2, 2, 2]));
            in_tx.push(Frame::new(i, v, IngestFlags::default(), Stamps::new(1))).unwrap();
        }
        drop(in_tx);
        stage_loop(stage, in_rx, out_tx, Boundary::after_stage(0), None, &Metrics::new(0.0));
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
    }

    #[test]
    fn the_picture_queue_keeps_the_newest_trial_and_counts_those_it_replaced() {
        let (queue, m) = (PictureQueue::new(), Metrics::new(0.0));
        let frame =
            Frame::new(0, Arc::new(volume("r", 0, [2, 2, 2])), IngestFlags::default(), Stamps::new(3));
        for trial in 1..=3 {
            let t = crate::decode::synthetic::trial(trial, &[]);
            let job =
                PictureJob { template: frame.clone(), trial: t, latent: vec![0.0; 4], closed_time: None };
            queue.push(job, &m);
        }
        let waiting: Vec<u64> = queue.rx.try_iter().map(|j| j.trial.trial).collect();
        assert_eq!(waiting, [3]);
        assert_eq!(m.snapshot().errors.get(PICTURE_DROPPED.name), Some(&2));
    }

    /// `(new_run, gap_before, out_of_order, duplicate)` of one volume.
    type Flags = (bool, u64, bool, bool);

    /// Flags of each index in turn (run `r1`, one grid), and the counters after them
    /// (missing, out of order, duplicates).
    fn observe(indices: &[u64]) -> (Vec<Flags>, [u64; 3]) {
        let (mut tracker, m) = (IndexTracker::default(), Metrics::new(0.0));
        let flags = indices
            .iter()
            .map(|&i| {
                let f = tracker.observe(&volume("r1", i, [4, 4, 2]), &m);
                (f.new_run, f.gap_before, f.out_of_order, f.duplicate)
            })
            .collect();
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        (flags, [count(&m.missing), count(&m.out_of_order), count(&m.duplicates)])
    }

    #[test]
    fn a_clean_run_is_flagged_only_at_its_start() {
        let (flags, counts) = observe(&[0, 1, 2, 3]);
        assert_eq!(flags[0], (true, 0, false, false));
        assert!(flags[1..].iter().all(|f| *f == (false, 0, false, false)), "{flags:?}");
        assert_eq!(counts, [0, 0, 0]);
    }

    #[test]
    fn gaps_late_arrivals_and_resends_are_told_apart_and_counted() {
        // 0, then 3 (1 and 2 missing), then 1 arrives late (fills a hole), then 3 again.
        let (flags, counts) = observe(&[0, 3, 1, 3, 4]);
        assert_eq!(flags[1], (false, 2, false, false));
        assert_eq!(flags[2], (false, 0, true, false));
        assert_eq!(flags[3], (false, 0, false, true));
        assert_eq!(flags[4], (false, 0, false, false));
        // Missing: 2 counted, 1 filled; one late arrival; one resend.
        assert_eq!(counts, [1, 1, 1]);
    }

    #[test]
    fn a_new_run_id_or_grid_starts_the_indices_over() {
        let (mut tracker, m) = (IndexTracker::default(), Metrics::new(0.0));
        assert!(tracker.observe(&volume("r1", 5, [4, 4, 2]), &m).new_run);
        assert!(!tracker.observe(&volume("r1", 6, [4, 4, 2]), &m).new_run);
        let f = tracker.observe(&volume("r2", 0, [4, 4, 2]), &m);
        assert!(f.new_run && !f.duplicate && !f.out_of_order && f.gap_before == 0, "{f:?}");
        let f = tracker.observe(&volume("r2", 0, [8, 8, 2]), &m);
        assert!(f.new_run && !f.duplicate, "{f:?}");
        assert_eq!(m.duplicates.load(Ordering::Relaxed), 0);
    }
}
