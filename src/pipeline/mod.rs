//! The runner: threads, queues and timestamps around the stages. It knows no stage: the
//! topology ([`resolve`]) builds them, the runner gives each a thread, its edges, a stamp and
//! a latency key, and runs the work a stage sends off the path on workers of its own.
//!
//! ```text
//! ingest ─┬─► stage 1 ─► … ─► stage n ─► publish ──► ZMQ PUB, LSL outlet, messages.jsonl
//!         │                     └─ hand-off ─► worker (niced) ─► publish
//!         └─► recorder ──► session folder (every accepted volume, before anything can drop it)
//! ```
//!
//! Each box is a named thread (`mirage/motion`, …) joined by bounded SPSC edges
//! ([`crate::queue`]). Edges up to the last stage block when full (lossless backpressure,
//! counted); the edge into publish follows `pipeline.publish_when_full`; the recorder edge
//! always blocks; a hand-off to a worker never waits ([`crate::stage::OffPath`]). Stamps are
//! taken at every boundary ([`crate::frame::Boundary`]). [`Pipeline::build`] gathers every
//! setup error before anything runs; [`PipelineHandle`] stops and joins on drop.

mod build;
#[cfg(test)]
mod quiet;
pub mod resolve;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock;
use crate::event::{Event, LiveEvents};
use crate::frame::{Boundary, Frame, FrameKind, RecordItem, Stamps, Tally};
use crate::ingest::intake::Intake;
use crate::ingest::{Ack, SourceEvent};
use crate::io::session::SessionWriter;
use crate::metrics::{Metrics, MetricsSnapshot, Reason};
use crate::publish::Publisher;
use crate::queue::{EdgeRx, EdgeTx, Handed, HandoffRx, HandoffTx, PushError, Recv, Waker};
use crate::stage::Stage;
use crate::topic::Topic;

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
/// Work a stage could not hand off: the worker beside the volume path had stopped.
pub const WORKER_STOPPED: Reason =
    Reason::new("worker_stopped", "work not handed off: the worker beside the volume path had stopped");
/// What the runner counts itself.
pub const REASONS: &[Reason] =
    &[RECORD_CLOSED, ACK_BEFORE_RECORDED, REFUSED_AFTER_STOP, RECORD_IO, WORKER_STOPPED];

/// How long a stage thread waits on its input before checking for shutdown (and calling the
/// stage's `idle`).
const POLL: Duration = Duration::from_millis(100);

/// Nice value of the workers beside the volume path: the volume path (niceness 0) runs first
/// when cores are short, so a decode delays no volume's feedback.
const WORKER_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority (Linux: per thread); failure only logs.
fn lower_priority(nice: i32) {
    // SAFETY: setpriority on the calling thread (who = 0) has no memory effects.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::debug!("worker: could not lower thread priority: {}", std::io::Error::last_os_error());
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

/// Frames from the workers waiting for publish.
const RESULTS_QUEUE: usize = 256;

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

/// What ingest takes from the configuration: the run's length and TR over its sender's, and
/// the number of stages its frames' stamps span.
struct IngestPlan {
    stop_after: Option<u64>,
    idle_exit_s: Option<f64>,
    tr: Option<f64>,
    n_stages: usize,
}

/// The ingest thread's loop: each volume from `source` through ingest's bookkeeping, to the
/// recorder and down the path, its waiting sender answered once it is written; live events
/// (from the source or the marker reader, `markers`) go with the next volume.
fn ingest_loop(
    mut source: Box<dyn crate::ingest::Source>,
    mut out: EdgeTx<Frame>,
    mut record: Option<EdgeTx<RecordItem>>,
    markers: &crossbeam_channel::Receiver<Event>,
    m: &Metrics,
    stop: &AtomicBool,
    IngestPlan { stop_after, idle_exit_s, tr, n_stages }: IngestPlan,
) -> (Box<dyn crate::ingest::Source>, Option<f64>) {
    tracing::info!("ingest: {}", source.describe());
    let mut intake = Intake::new(tr);
    // Every volume recorded takes a `seq`; those set aside are not taken down the path.
    let (mut seq, mut set_aside) = (0u64, 0u64);
    // When the last volume came (the idle exit's clock).
    let mut last_volume: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Acquire) && stop_after.is_none_or(|n| seq - set_aside < n) {
        let event = source.next(POLL);
        markers.try_iter().for_each(|e| intake.event(e, m));
        match event {
            SourceEvent::Idle => {
                if let (Some(limit), Some(at)) = (idle_exit_s, last_volume) {
                    if at.elapsed().as_secs_f64() >= limit {
                        tracing::info!(
                            "ingest: no volume for {limit} s (ingest.idle_exit_s): the run is over"
                        );
                        break;
                    }
                }
            }
            SourceEvent::End => break,
            SourceEvent::Refused(n) => (0..n).for_each(|_| m.count(crate::ingest::SENDER_REFUSED)),
            SourceEvent::Marker(e) => intake.event(e, m),
            SourceEvent::Rejected(e) => {
                m.rejected.fetch_add(1, Ordering::Relaxed);
                m.count(e.reason());
                let text = e.to_string();
                tracing::warn!("{text}");
                source.acknowledge(Ack::Rejected { reason: &text });
            }
            SourceEvent::Volume(v) => {
                last_volume = Some(std::time::Instant::now());
                let accepted = intake.volume(v, m);
                let index = accepted.volume.index;
                let volume = Arc::new(accepted.volume);
                let recording = match record.as_mut() {
                    Some(r) => {
                        let markers = accepted
                            .events
                            .iter()
                            .map(|e| serde_json::to_value(e).unwrap_or_default())
                            .collect();
                        let item = RecordItem { seq, volume: volume.clone(), flags: accepted.flags, markers };
                        let pushed = r.push(item).is_ok();
                        if !pushed {
                            m.count(RECORD_CLOSED);
                        }
                        pushed
                    }
                    None => false,
                };
                let tr = volume.tr;
                // A waiting sender hears back once the volume is written to the session (the
                // flush to disk is not waited for), or after one TR (counted) so that a slow disk
                // never stalls it.
                let await_record = |source: &dyn crate::ingest::Source| {
                    if recording
                        && source.answers_sender()
                        && !m.record_attempts.wait_for(seq + 1, one_tr(tr))
                    {
                        m.count(ACK_BEFORE_RECORDED);
                    }
                };
                if accepted.flags.implausible_index {
                    m.count(crate::ingest::IMPLAUSIBLE_INDEX);
                    let text = format!(
                        "volume index {index} is implausible for run {:?} (before its first, or over {} past the \
                         expected one): recorded, set aside",
                        volume.run,
                        crate::ingest::intake::MAX_INDEX_LEAD
                    );
                    tracing::warn!("ingest: {text}");
                    await_record(source.as_ref());
                    source.acknowledge(Ack::Rejected { reason: &text });
                    seq += 1;
                    set_aside += 1;
                    continue;
                }
                let mut stamps = Stamps::new(n_stages);
                stamps.set(Boundary::RECEIVED, volume.recv_time);
                stamps.set(Boundary::INGESTED, clock::now());
                let mut frame = Frame::new(seq, volume, accepted.flags, stamps);
                if !accepted.events.is_empty() {
                    frame.outputs.insert(LiveEvents(accepted.events));
                }
                let closed = out.push(frame) == Err(PushError::Closed);
                // The volume path has the frame; the sender hears back once it is recorded.
                await_record(source.as_ref());
                // The last volume's answer tells the sender the run is over.
                let last = closed
                    || stop.load(Ordering::Acquire)
                    || stop_after.is_some_and(|n| seq - set_aside + 1 >= n);
                source.acknowledge(Ack::Accepted { index, last });
                if closed {
                    break;
                }
                seq += 1;
            }
        }
    }
    tracing::info!("ingest: stopped after {seq} volumes");
    (source, intake.last_tr())
}

/// How long a waiting sender's answer may wait on the recorder: one TR (1 s when unknown).
fn one_tr(tr: Option<f64>) -> Duration {
    Duration::from_secs_f64(tr.filter(|t| t.is_finite()).unwrap_or(1.0).clamp(0.01, 10.0))
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

/// Where a stage thread reads its frames: an edge of the volume path, or a worker's hand-off.
trait FrameInput {
    fn recv(&mut self, timeout: Duration) -> Recv<Frame>;
}

impl FrameInput for EdgeRx<Frame> {
    fn recv(&mut self, timeout: Duration) -> Recv<Frame> {
        self.recv_timeout(timeout)
    }
}

impl FrameInput for HandoffRx<Frame> {
    fn recv(&mut self, timeout: Duration) -> Recv<Frame> {
        self.recv_timeout(timeout)
    }
}

/// Where a stage thread sends its frames: the next edge of the volume path, or publish's
/// results queue (a worker's).
trait FrameOutput {
    /// Sends `frame`; false once nobody reads.
    fn send(&mut self, frame: Frame) -> bool;
}

impl FrameOutput for EdgeTx<Frame> {
    fn send(&mut self, frame: Frame) -> bool {
        self.push(frame) != Err(PushError::Closed)
    }
}

/// Publish's queue of the workers' frames: a worker waits for room; the volume path never
/// does, as publish serves it between its own frames ([`RESULTS_QUEUE`]).
#[derive(Clone)]
struct Results {
    tx: crossbeam_channel::Sender<Frame>,
    waker: Waker,
}

impl FrameOutput for Results {
    fn send(&mut self, frame: Frame) -> bool {
        let sent = self.tx.send(frame).is_ok();
        if sent {
            self.waker.wake();
        }
        sent
    }
}

/// A stage's hand-off to its worker: where the frames go and what a dropped one counts as.
struct HandOff {
    tx: HandoffTx<Frame>,
    dropped: Reason,
    worker: &'static str,
}

impl HandOff {
    /// Hands the worker what `stage` gives of `frame`, never waiting: a frame whose work is
    /// dropped says so in its stage errors.
    fn give(&self, stage: &dyn Stage, frame: &mut Frame, m: &Metrics) {
        for work in stage.hand_off(frame) {
            match self.tx.push(work) {
                Handed::Queued => {}
                Handed::Replaced => m.count(self.dropped),
                Handed::Dropped => {
                    m.count(self.dropped);
                    let e = format!(
                        "{}: the {} worker is a full queue behind: this frame's work is not done",
                        stage.name(),
                        self.worker
                    );
                    tracing::warn!("volume {}: {e}", frame.volume.index);
                    frame.stage_errors.push(e);
                }
                Handed::Closed => m.count(WORKER_STOPPED),
            }
        }
    }
}

/// Counts what the stage tallied in `frame` (taken out, so a later stage does not count it
/// again).
fn count_tally(frame: &mut Frame, m: &Metrics) {
    for (reason, n) in frame.outputs.take::<Tally>().map(|t| t.0).unwrap_or_default() {
        (0..n).for_each(|_| m.count_error(reason));
    }
}

/// One stage thread: `warm_up`, then each frame from `input` through `process`, its tally
/// counted, its work handed off, stamped at `boundary` and sent on; after each, `after` (once
/// a volume has passed); `idle` when nothing comes for [`POLL`]; `flush` when the input ends.
/// The path's stages and the workers beside it run this same loop.
fn stage_loop(
    mut stage: Box<dyn Stage>,
    mut input: impl FrameInput,
    mut output: impl FrameOutput,
    boundary: Boundary,
    hand_off: Option<HandOff>,
    m: &Metrics,
) {
    if let Err(e) = stage.warm_up() {
        m.count_error(e.reason);
        tracing::warn!("{e}");
    }
    // What a frame the stage makes itself follows: the last volume's frame (path stages), else
    // the last frame seen (workers, which see results frames only).
    let (mut last_volume, mut last_seen): (Option<Frame>, Option<Frame>) = (None, None);
    let send = |stage: &dyn Stage, mut f: Frame, stamp: bool, output: &mut dyn FrameOutput| {
        count_tally(&mut f, m);
        if let Some(h) = &hand_off {
            h.give(stage, &mut f, m);
        }
        if stamp {
            f.stamps.set(boundary, clock::now());
        }
        output.send(f)
    };
    loop {
        match input.recv(POLL) {
            Recv::Msg(mut frame) => {
                if let Err(e) = stage.process(&mut frame) {
                    m.count_error(e.reason);
                    tracing::warn!("volume {}: {e}", frame.volume.index);
                    frame.stage_errors.push(e.to_string());
                }
                let template = Frame::results_after(&frame);
                if frame.kind == FrameKind::Volume {
                    last_volume = Some(template.clone());
                }
                last_seen = Some(template);
                if !send(&*stage, frame, true, &mut output) {
                    return;
                }
                let Some(l) = &last_volume else { continue };
                match stage.after(l) {
                    Ok(Some(f)) => {
                        if !send(&*stage, f, true, &mut output) {
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
            Recv::Timeout => {
                if let Some(f) = last_seen.as_ref().and_then(|l| stage.idle(l)) {
                    if !send(&*stage, f, false, &mut output) {
                        return;
                    }
                }
            }
            Recv::Closed => break,
        }
    }
    let last = last_volume.or(last_seen);
    if let Some(f) = last.and_then(|l| stage.flush(&Frame::end_of_run_after(&l))) {
        send(&*stage, f, true, &mut output);
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

/// The publish thread's loop: each frame of the path (its results, then, for a volume, its own
/// messages, stamped and timed) and, between them, the workers' frames from `results`; a
/// `status` every `status_interval_s`, and a last one once the recorder is done.
fn publish_loop(
    mut publisher: Publisher,
    mut rx: EdgeRx<Frame>,
    results: crossbeam_channel::Receiver<Frame>,
    m: &Metrics,
    status_interval_s: f64,
    recorded_all: &AtomicBool,
) {
    let mut next_status = clock::now() + status_interval_s;
    let mut reported_errors = 0;
    let stage_names = m.stage_names();
    loop {
        for f in results.try_iter() {
            publisher.publish_results(&f, m);
        }
        let wait = Duration::from_secs_f64((next_status - clock::now()).clamp(0.0, POLL.as_secs_f64()));
        match rx.recv_timeout(wait) {
            Recv::Msg(mut frame) => {
                frame.stamps.set_published(clock::now());
                publisher.publish_results(&frame, m);
                if frame.kind != FrameKind::Volume {
                    continue;
                }
                publisher.publish_volume(&frame, &stage_names);
                let done = clock::now();
                frame.stamps.set_published(done);
                let acq = frame.volume.acq_time;
                m.record_latency(&frame.stamps, acq.map(|a| (done - a) * 1e3));
                m.published.fetch_add(1, Ordering::Relaxed);
                publisher.push_feedback(&frame, done);
            }
            Recv::Timeout => {}
            Recv::Closed => {
                // The workers end after the volume path; publish what they still send.
                for f in results.iter() {
                    publisher.publish_results(&f, m);
                }
                break;
            }
        }
        (0..publisher.newly_refused()).for_each(|_| m.count(crate::publish::SUBSCRIBER_REFUSED));
        if publisher.send_errors() > reported_errors {
            for _ in reported_errors..publisher.send_errors() {
                m.count(crate::publish::PUBLISH);
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
    use crate::frame::IngestFlags;
    use crate::queue::{edge, handoff, WhenFull};
    use crate::stage::StageError;
    use crate::volume::Volume;

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

    fn frame(i: u64) -> Frame {
        Frame::new(i, Arc::new(volume("r", i, [2, 2, 2])), IngestFlags::default(), Stamps::new(1))
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

        fn process(&mut self, _frame: &mut Frame) -> Result<(), StageError> {
            Ok(())
        }

        fn after(&mut self, _last: &Frame) -> Result<Option<Frame>, StageError> {
            self.seen.lock().unwrap().push(self.out.pushed.load(Ordering::Acquire));
            Ok(None)
        }
    }

    #[test]
    fn a_stage_s_deferred_work_runs_once_its_frame_has_gone_on() {
        let (mut in_tx, in_rx) = edge::<Frame>("in", 8, 1 << 20, WhenFull::Block);
        let (out_tx, _out_rx) = edge::<Frame>("out", 8, 1 << 20, WhenFull::Block);
        let seen = Arc::default();
        let stage = Box::new(Deferring { out: out_tx.stats(), seen: Arc::clone(&seen) });
        for i in 0..3 {
            in_tx.push(frame(i)).unwrap();
        }
        drop(in_tx);
        stage_loop(stage, in_rx, out_tx, Boundary::after_stage(0), None, &Metrics::new(0.0));
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
    }

    /// Hands every frame to its worker and tallies one `probe_seen` per frame.
    struct Handing;

    impl Stage for Handing {
        fn name(&self) -> &'static str {
            "handing"
        }

        fn process(&mut self, frame: &mut Frame) -> Result<(), StageError> {
            frame.outputs.update::<Tally>(|t| t.0.push(("probe_seen", 1)));
            Ok(())
        }

        fn hand_off(&self, frame: &Frame) -> Vec<Frame> {
            vec![Frame::results_after(frame)]
        }
    }

    /// Runs five frames through [`Handing`] with a hand-off of two that nobody reads.
    fn hand_five(when_full: WhenFull) -> (Vec<Frame>, HandoffRx<Frame>, MetricsSnapshot) {
        let (mut in_tx, in_rx) = edge::<Frame>("in", 8, 1 << 20, WhenFull::Block);
        let (out_tx, mut out_rx) = edge::<Frame>("out", 8, 1 << 20, WhenFull::Block);
        let (tx, work) = handoff::<Frame>("handing hand-off", 2, when_full);
        let dropped = Reason::new("probe_dropped", "test");
        let m = Metrics::new(0.0);
        (0..5).for_each(|i| in_tx.push(frame(i)).unwrap());
        drop(in_tx);
        let hand = HandOff { tx, dropped, worker: "probe" };
        stage_loop(Box::new(Handing), in_rx, out_tx, Boundary::after_stage(0), Some(hand), &m);
        let mut out = Vec::new();
        while let Recv::Msg(f) = out_rx.recv_timeout(Duration::ZERO) {
            out.push(f);
        }
        (out, work, m.snapshot())
    }

    #[test]
    fn a_full_hand_off_never_holds_the_path_and_counts_each_dropped_frame() {
        let (out, work, snap) = hand_five(WhenFull::DropNewest);
        // Every frame went on; the worker has the first two, the rest were dropped and said so.
        assert_eq!(out.iter().map(|f| f.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert!(out[..2].iter().all(|f| f.stage_errors.is_empty()));
        assert!(out[2..].iter().all(|f| f.stage_errors[0].contains("probe worker is a full queue behind")));
        let waiting: Vec<u64> = std::iter::from_fn(|| match work.recv_timeout(Duration::ZERO) {
            Recv::Msg(f) => Some(f.seq),
            _ => None,
        })
        .collect();
        assert_eq!(waiting, [0, 1]);
        assert_eq!(snap.errors.get("probe_dropped"), Some(&3));
        // The stage's tally was counted once per frame, and taken out of the frames.
        assert_eq!(snap.errors.get("probe_seen"), Some(&5));
        assert!(out.iter().all(|f| f.outputs.get::<Tally>().is_none()));
    }

    #[test]
    fn a_hand_off_that_keeps_the_newest_replaces_the_waiting_work_and_counts_it() {
        let (out, work, snap) = hand_five(WhenFull::DropOldest);
        assert!(out.iter().all(|f| f.stage_errors.is_empty()), "the frame's own work was handed over");
        let waiting: Vec<u64> = std::iter::from_fn(|| match work.recv_timeout(Duration::ZERO) {
            Recv::Msg(f) => Some(f.seq),
            _ => None,
        })
        .collect();
        assert_eq!(waiting, [3, 4]);
        assert_eq!(snap.errors.get("probe_dropped"), Some(&3));
    }
}
