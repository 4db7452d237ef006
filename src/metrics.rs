//! Counters and latency histograms shared by the stage threads, the status topic and the
//! summary printed at exit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::frame::Stamps;
use crate::queue::EdgeStats;

/// Latency histograms, in microseconds.
#[derive(Debug)]
struct LatencyBook {
    /// Ingest, the volume path's stages and publish, in path order.
    names: Vec<&'static str>,
    stages: Vec<Histogram<u64>>,
    total: Histogram<u64>,
    acquisition: Histogram<u64>,
    trial_decode: Histogram<u64>,
    /// The last [`ROLLING`] volumes: per-stage latencies then end to end, ms.
    recent: std::collections::VecDeque<Vec<f64>>,
}

/// Volumes the rolling percentiles of the status topic cover.
pub const ROLLING: usize = 256;

impl RollingSummary {
    /// Nearest-rank median, 99th percentile and largest of `v` (non-finite values dropped).
    pub fn of(mut v: Vec<f64>) -> RollingSummary {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return RollingSummary::default();
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        RollingSummary { count: v.len(), p50: q(0.5), p99: q(0.99), max: v[v.len() - 1] }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits; `new_with_bounds` only fails for invalid bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("3 sigfig is valid"))
}

impl LatencySummary {
    /// Percentiles of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1e3;
        LatencySummary {
            count: h.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / 1e3,
        }
    }
}

pub use crate::reason::Reason;

/// A point-in-time copy of every counter: the `status` topic's header.
pub use crate::topic::StatusHeader as MetricsSnapshot;
pub use crate::topic::{LatencySummary, QueueSnapshot, RollingSummary};

/// A count that another thread can wait on without polling (the recorder's, which a held
/// acknowledgement waits for).
#[derive(Debug, Default)]
pub struct Progress {
    count: Mutex<u64>,
    moved: Condvar,
}

impl Progress {
    /// Adds one and wakes whoever waits.
    pub fn advance(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c += 1;
        }
        self.moved.notify_all();
    }

    /// Waits until the count reaches `n`, for at most `timeout`; whether it has.
    pub fn wait_for(&self, n: u64, timeout: Duration) -> bool {
        let Ok(count) = self.count.lock() else { return false };
        self.moved.wait_timeout_while(count, timeout, |c| *c < n).is_ok_and(|(c, _)| *c >= n)
    }
}

/// The shared counters of one pipeline.
#[derive(Debug)]
pub struct Metrics {
    started: f64,
    /// Volumes accepted by ingest.
    pub received: AtomicU64,
    /// Messages refused by ingest.
    pub rejected: AtomicU64,
    /// Volumes written to the session folder.
    pub recorded: AtomicU64,
    /// Volumes the recorder has finished with, written or not (acknowledgements wait on it).
    pub record_attempts: Progress,
    /// Volume messages published.
    pub published: AtomicU64,
    /// Volumes whose index repeated.
    pub duplicates: AtomicU64,
    /// Indices missing between received volumes.
    pub missing: AtomicU64,
    /// Volumes that arrived after a higher index.
    pub out_of_order: AtomicU64,
    /// Trials decoded and published.
    pub decoded: AtomicU64,
    /// Calibration mode's progress, for the status line.
    pub calibration: Mutex<Option<String>>,
    errors: Mutex<BTreeMap<String, u64>>,
    reasons: Mutex<BTreeMap<&'static str, &'static str>>,
    latency: Mutex<LatencyBook>,
    edges: Mutex<Vec<Arc<EdgeStats>>>,
}

impl Metrics {
    /// Fresh counters for a path with no stages (ingest, publish); `started` is the
    /// pipeline's start on [`crate::clock::now`].
    pub fn new(started: f64) -> Metrics {
        Metrics::with_stages(started, crate::frame::latency_keys([]))
    }

    /// Fresh counters for a path whose stages (ingest … publish) are `names`.
    pub fn with_stages(started: f64, names: Vec<&'static str>) -> Metrics {
        Metrics {
            started,
            received: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            record_attempts: Progress::default(),
            published: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            decoded: AtomicU64::new(0),
            calibration: Mutex::new(None),
            errors: Mutex::new(BTreeMap::new()),
            reasons: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(LatencyBook {
                stages: names.iter().map(|_| histogram()).collect(),
                names,
                total: histogram(),
                acquisition: histogram(),
                trial_decode: histogram(),
                recent: std::collections::VecDeque::with_capacity(ROLLING),
            }),
            edges: Mutex::new(Vec::new()),
        }
    }

    /// Counts one `reason`.
    pub fn count(&self, reason: Reason) {
        self.count_error(reason.name);
    }

    /// Registers counters up front: Prometheus exports each at 0 before it first happens,
    /// with what it counts.
    pub fn register(&self, reasons: &[Reason]) {
        if let Ok(mut r) = self.reasons.lock() {
            r.extend(reasons.iter().map(|x| (x.name, x.help)));
        }
    }

    /// Counts one error under `reason` (e.g. `bad_header`, `stage_motion`): the typed errors'
    /// own reasons; counters of the runner and sinks go through [`Metrics::count`].
    pub fn count_error(&self, reason: &str) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(reason.to_string()).or_insert(0) += 1;
        }
    }

    /// Ingest, the volume path's stages and publish, in path order.
    pub fn stage_names(&self) -> Vec<&'static str> {
        self.latency.lock().map(|b| b.names.clone()).unwrap_or_default()
    }

    /// Registers an edge so its state appears in snapshots.
    pub fn add_edge(&self, stats: Arc<EdgeStats>) {
        if let Ok(mut e) = self.edges.lock() {
            e.push(stats);
        }
    }

    /// Records one published frame's latencies.
    pub fn record_latency(&self, stamps: &Stamps, acq_to_publish_ms: Option<f64>) {
        let Ok(mut book) = self.latency.lock() else {
            return;
        };
        let us = |ms: f64| (ms * 1e3).round().max(1.0) as u64;
        for (h, ms) in book.stages.iter_mut().zip(stamps.stage_ms()) {
            if let Some(ms) = ms {
                h.saturating_record(us(ms));
            }
        }
        if let Some(ms) = stamps.total_ms() {
            book.total.saturating_record(us(ms));
        }
        let n = book.names.len();
        let mut row: Vec<f64> = stamps.stage_ms().into_iter().map(|ms| ms.unwrap_or(f64::NAN)).collect();
        row.resize(n, f64::NAN);
        row.push(stamps.total_ms().unwrap_or(f64::NAN));
        if book.recent.len() == ROLLING {
            book.recent.pop_front();
        }
        book.recent.push_back(row);
        if let Some(ms) = acq_to_publish_ms.filter(|m| *m >= 0.0) {
            book.acquisition.saturating_record(us(ms));
        }
    }

    /// Records one decoded trial: from the GLM closing it to its decode being published.
    pub fn record_trial_decode(&self, ms: f64) {
        if let Ok(mut book) = self.latency.lock() {
            book.trial_decode.saturating_record((ms * 1e3).round().max(1.0) as u64);
        }
    }

    /// Copies every counter now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let queues = self
            .edges
            .lock()
            .map(|edges| {
                edges
                    .iter()
                    .map(|s| QueueSnapshot {
                        name: s.name.clone(),
                        policy: s.policy,
                        depth: s.depth.load(Ordering::Relaxed),
                        capacity: s.capacity,
                        max_depth: s.max_depth.load(Ordering::Relaxed),
                        pushed: get(&s.pushed),
                        dropped: get(&s.dropped),
                        blocked: get(&s.blocked),
                        blocked_ms: get(&s.blocked_ns) as f64 / 1e6,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (stages, stage_latency_ms, end_to_end_ms, acquisition_to_publish_ms, trial_decode_ms, rolling_ms) =
            match self.latency.lock() {
                Ok(book) => (
                    book.names.iter().map(|n| n.to_string()).collect(),
                    book.names
                        .iter()
                        .zip(&book.stages)
                        .map(|(n, h)| (n.to_string(), LatencySummary::of(h)))
                        .collect(),
                    LatencySummary::of(&book.total),
                    LatencySummary::of(&book.acquisition),
                    LatencySummary::of(&book.trial_decode),
                    book.names
                        .iter()
                        .copied()
                        .chain(["end_to_end"])
                        .enumerate()
                        .map(|(k, n)| {
                            (n.to_string(), RollingSummary::of(book.recent.iter().map(|r| r[k]).collect()))
                        })
                        .collect(),
                ),
                Err(_) => Default::default(),
            };
        MetricsSnapshot {
            uptime_s: crate::clock::now() - self.started,
            received: get(&self.received),
            rejected: get(&self.rejected),
            recorded: get(&self.recorded),
            published: get(&self.published),
            duplicates: get(&self.duplicates),
            missing: get(&self.missing),
            out_of_order: get(&self.out_of_order),
            decoded: get(&self.decoded),
            calibration: self.calibration.lock().ok().and_then(|c| c.clone()),
            errors,
            stages,
            queues,
            stage_latency_ms,
            end_to_end_ms,
            acquisition_to_publish_ms,
            trial_decode_ms,
            rolling_ms,
        }
    }

    /// Prometheus text exposition: counters, queue gauges, and latency histograms (seconds).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let snap = self.snapshot();
        let mut s = String::new();
        for (name, help, v) in [
            ("received", "Volumes accepted by ingest", snap.received),
            ("rejected", "Messages refused by ingest", snap.rejected),
            ("recorded", "Volumes written to the session folder", snap.recorded),
            ("published", "Volume messages published", snap.published),
            ("duplicates", "Volumes whose index repeated", snap.duplicates),
            ("missing", "Indices missing between received volumes", snap.missing),
            ("out_of_order", "Volumes that arrived after a higher index", snap.out_of_order),
        ] {
            let _ = writeln!(s, "# HELP mirage_{name}_total {help}.\n# TYPE mirage_{name}_total counter");
            let _ = writeln!(s, "mirage_{name}_total {v}");
        }
        let _ =
            writeln!(s, "# HELP mirage_errors_total Errors by reason.\n# TYPE mirage_errors_total counter");
        let registered = self.reasons.lock().map(|r| r.clone()).unwrap_or_default();
        for (reason, help) in &registered {
            let _ = writeln!(s, "# reason {reason}: {help}.");
        }
        let mut errors: BTreeMap<&str, u64> = registered.keys().map(|r| (*r, 0)).collect();
        errors.extend(snap.errors.iter().map(|(k, v)| (k.as_str(), *v)));
        for (reason, v) in &errors {
            let _ = writeln!(s, "mirage_errors_total{{reason=\"{reason}\"}} {v}");
        }
        for (name, help, f) in [
            (
                "queue_depth",
                "Messages queued on an edge",
                (|q: &QueueSnapshot| q.depth as u64) as fn(&QueueSnapshot) -> u64,
            ),
            ("queue_dropped", "Messages an edge dropped", |q| q.dropped),
            ("queue_blocked", "Pushes that waited for room", |q| q.blocked),
        ] {
            let kind = if name == "queue_depth" { "gauge" } else { "counter" };
            let metric =
                if kind == "counter" { format!("mirage_{name}_total") } else { format!("mirage_{name}") };
            let _ = writeln!(s, "# HELP {metric} {help}.\n# TYPE {metric} {kind}");
            for q in &snap.queues {
                let _ = writeln!(s, "{metric}{{edge=\"{}\"}} {}", q.name, f(q));
            }
        }
        let Ok(book) = self.latency.lock() else { return s };
        let _ = writeln!(
            s,
            "# HELP mirage_latency_seconds Latency per stage (queue wait included), end to end, and trial decode.\n# TYPE mirage_latency_seconds histogram"
        );
        let all = book
            .names
            .iter()
            .copied()
            .zip(&book.stages)
            .chain([("end_to_end", &book.total), ("trial_decode", &book.trial_decode)]);
        for (name, h) in all {
            for le in PROMETHEUS_BUCKETS_MS {
                let n = if h.is_empty() { 0 } else { h.count_between(0, (le * 1e3) as u64) };
                let _ =
                    writeln!(s, "mirage_latency_seconds_bucket{{stage=\"{name}\",le=\"{}\"}} {n}", le / 1e3);
            }
            let _ = writeln!(s, "mirage_latency_seconds_bucket{{stage=\"{name}\",le=\"+Inf\"}} {}", h.len());
            let _ = writeln!(
                s,
                "mirage_latency_seconds_sum{{stage=\"{name}\"}} {}",
                h.mean() * h.len() as f64 / 1e6
            );
            let _ = writeln!(s, "mirage_latency_seconds_count{{stage=\"{name}\"}} {}", h.len());
        }
        s
    }
}

/// Upper bounds (ms) of the Prometheus latency buckets.
const PROMETHEUS_BUCKETS_MS: [f64; 14] =
    [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

impl MetricsSnapshot {
    /// One status line: counts, end-to-end latency and the fullest queue.
    pub fn status_line(&self) -> String {
        let errors: u64 = self.errors.values().sum();
        let fullest = self
            .queues
            .iter()
            .max_by_key(|q| q.depth)
            .map(|q| format!(" queue {}={}/{}", q.name, q.depth, q.capacity))
            .unwrap_or_default();
        let recent = self.rolling_ms.get("end_to_end").copied().unwrap_or_default();
        let mut decoding = String::new();
        if let Some(c) = &self.calibration {
            decoding.push_str(&format!(" | calibration {c}"));
        }
        if self.decoded > 0 {
            decoding.push_str(&format!(" | decoded {}", self.decoded));
        }
        format!(
            "[{:>6.1}s] in {} rec {} out {}{decoding} | e2e (last {}) p50 {:.2} ms p99 {:.2} ms | rejected {} errors {} dup {} missing {}{}",
            self.uptime_s,
            self.received,
            self.recorded,
            self.published,
            recent.count,
            recent.p50,
            recent.p99,
            self.rejected,
            errors,
            self.duplicates,
            self.missing,
            fullest
        )
    }

    /// The end-of-run table: latency per stage and every count.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{:<22} {:>8} {:>10} {:>10} {:>10}", "latency (ms)", "n", "p50", "p99", "max");
        let row = |s: &mut String, name: &str, l: &LatencySummary| {
            let _ =
                writeln!(s, "{:<22} {:>8} {:>10.3} {:>10.3} {:>10.3}", name, l.count, l.p50, l.p99, l.max);
        };
        for name in &self.stages {
            if let Some(l) = self.stage_latency_ms.get(name) {
                row(&mut s, name, l);
            }
        }
        row(&mut s, "end to end", &self.end_to_end_ms);
        if self.acquisition_to_publish_ms.count > 0 {
            row(&mut s, "acquisition to publish", &self.acquisition_to_publish_ms);
        }
        if self.trial_decode_ms.count > 0 {
            row(&mut s, "trial close to decode", &self.trial_decode_ms);
        }
        let _ = writeln!(
            s,
            "volumes: received {} recorded {} published {} | rejected {} duplicates {} missing {} out-of-order {}",
            self.received, self.recorded, self.published, self.rejected, self.duplicates, self.missing, self.out_of_order
        );
        if self.decoded > 0 || self.calibration.is_some() {
            let calibration =
                self.calibration.as_deref().map(|c| format!(" | calibration {c}")).unwrap_or_default();
            let _ = writeln!(s, "trials decoded: {}{calibration}", self.decoded);
        }
        if !self.errors.is_empty() {
            let list: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "errors: {}", list.join(" "));
        }
        for q in &self.queues {
            if q.dropped > 0 || q.blocked > 0 {
                let _ = writeln!(
                    s,
                    "queue {}: blocked {} ({:.1} ms) dropped {} max depth {}/{}",
                    q.name, q.blocked, q.blocked_ms, q.dropped, q.max_depth, q.capacity
                );
            }
        }
        s
    }
}

/// CPU time of threads that have ended (tid → name, ms), noted by [`note_thread_end`].
static ENDED: std::sync::Mutex<BTreeMap<u64, (String, f64)>> = std::sync::Mutex::new(BTreeMap::new());

/// Notes the calling thread's CPU time as it ends, so that [`thread_cpu_ms`] still reports a
/// thread that exits between two samples of a short run.
pub fn note_thread_end() {
    // SAFETY: gettid has no preconditions; clock_gettime writes into the zeroed struct we own.
    let tid = unsafe { libc::gettid() } as u64;
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return;
    }
    let name = std::thread::current().name().unwrap_or("").chars().take(15).collect();
    let ms = t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6;
    ENDED.lock().unwrap_or_else(|e| e.into_inner()).insert(tid, (name, ms));
}

/// CPU time (user + system, ms) of this process's threads by name, read from `/proc`, and of
/// the threads that noted their end.
pub fn thread_cpu_ms() -> BTreeMap<u64, (String, f64)> {
    let mut out = ENDED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u64>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state is field 3, utime field 14 and stime field 15 (1-based).
        let get = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        out.entry(tid).or_insert((name, (get(14) + get(15)) / ticks * 1e3));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_wakes_when_the_count_arrives_and_not_before() {
        let progress = Arc::new(Progress::default());
        assert!(!progress.wait_for(1, Duration::from_millis(20)));
        let p = Arc::clone(&progress);
        let advancer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            p.advance();
            p.advance();
        });
        assert!(progress.wait_for(2, Duration::from_secs(10)));
        assert!(!progress.wait_for(3, Duration::ZERO));
        advancer.join().unwrap();
    }
}
