//! `mirage bench`'s measurements: what a subscriber sees, CPU time per thread, and the report
//! (JSON for machines, a table and an SVG plot for people).

pub mod plot;

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::message::Received;
use crate::metrics::{LatencySummary, MetricsSnapshot};

/// One `volume` message as the subscriber received it.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeSeen {
    /// Volume index.
    pub index: u64,
    /// Acquisition time (the sender's stamp, on this machine's monotonic clock), s.
    pub acq_time: Option<f64>,
    /// Receipt at the subscriber, s.
    pub recv_time: f64,
    /// Per-stage latency the daemon stamped, ms, in the report's `stages` order (NaN where
    /// absent).
    pub stage_ms: Vec<f64>,
    /// The same, by latency key, as the `volume` message had it.
    #[serde(skip)]
    latency_ms: BTreeMap<String, f64>,
}

impl VolumeSeen {
    /// Reads a received `volume` message.
    pub fn from_message(m: &Received, recv_time: f64) -> Option<VolumeSeen> {
        let h = crate::topic::read::<crate::topic::VolumeHeader>(&m.topic, &m.header).ok()?;
        Some(VolumeSeen {
            index: h.index,
            acq_time: h.acq_time,
            recv_time,
            stage_ms: Vec::new(),
            latency_ms: h.latency_ms,
        })
    }

    /// Trigger-to-feedback: acquisition to receipt at the subscriber, ms.
    pub fn trigger_to_feedback_ms(&self) -> Option<f64> {
        self.acq_time.map(|a| (self.recv_time - a) * 1e3)
    }
}

/// Percentiles of a set of latencies (ms), from an HDR histogram at 1 µs resolution.
pub fn summarise(ms: &[f64]) -> LatencySummary {
    let mut h = match Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) {
        Ok(h) => h,
        Err(_) => return LatencySummary::default(),
    };
    for v in ms.iter().filter(|v| v.is_finite() && **v >= 0.0) {
        h.saturating_record((v * 1e3).round().max(1.0) as u64);
    }
    LatencySummary::of(&h)
}

/// Population standard deviation (ms); 0 for fewer than two values.
pub fn std_dev(ms: &[f64]) -> f64 {
    let v: Vec<f64> = ms.iter().copied().filter(|x| x.is_finite()).collect();
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// Process CPU time (user + system) so far, ms, including threads that have exited.
pub fn process_cpu_ms() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// What was benchmarked.
#[derive(Clone, Debug, Serialize)]
pub struct BenchSetup {
    /// Grid.
    pub shape: [usize; 3],
    /// Volumes sent.
    pub volumes: usize,
    /// `inproc`, `pyneal`, `zmq` or `lsl`.
    pub ingest: String,
    /// Volumes per second asked for (`None`: as fast as the pipeline takes them).
    pub rate_hz: Option<f64>,
    /// Voxels decoded per trial (0: no decoding).
    pub voxels_decoded: usize,
    /// Rank of the low-rank heads.
    pub rank: usize,
    /// Stages on.
    pub motion: bool,
    /// GLM on.
    pub glm: bool,
    /// Deadline for trigger-to-feedback, ms.
    pub deadline_ms: f64,
    /// UTC date of the run.
    pub date: String,
    /// Machine: CPU model and cores.
    pub machine: String,
}

/// The bench's findings.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// What ran.
    pub setup: BenchSetup,
    /// The path's latency keys in order (ingest, each stage, publish), as the daemon's status
    /// names them.
    pub stages: Vec<String>,
    /// Per stage, as the daemon measured (queue wait included), ms.
    pub stages_ms: BTreeMap<String, LatencySummary>,
    /// Receipt at ingest to publish, ms.
    pub ingest_to_publish_ms: LatencySummary,
    /// Acquisition stamp to receipt at the subscriber, ms.
    pub trigger_to_feedback_ms: LatencySummary,
    /// Standard deviation of trigger-to-feedback, ms.
    pub jitter_ms: f64,
    /// Trial closed to decode received, ms (decoding is off the volume path).
    pub trial_decode_ms: LatencySummary,
    /// Decode compute time per trial, ms (from the `decode` messages).
    pub decode_compute_ms: LatencySummary,
    /// Volumes the subscriber received per second, first acquisition to last receipt.
    pub throughput_vps: f64,
    /// Volumes whose trigger-to-feedback exceeded the deadline.
    pub deadline_misses: usize,
    /// Volumes sent, received by the daemon, recorded, published, received by the subscriber.
    pub counts: BTreeMap<String, u64>,
    /// Largest queue depth and drops per edge.
    pub queues: Vec<crate::metrics::QueueSnapshot>,
    /// Errors by reason.
    pub errors: BTreeMap<String, u64>,
    /// CPU time per volume, ms: the whole process and each named thread.
    pub cpu_ms_per_volume: BTreeMap<String, f64>,
    /// Every volume the subscriber saw (for plots).
    pub volumes: Vec<VolumeSeen>,
}

impl BenchReport {
    /// Assembles the report from the daemon's snapshot and the subscriber's records.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        setup: BenchSetup,
        snap: &MetricsSnapshot,
        mut volumes: Vec<VolumeSeen>,
        decodes: &[(f64, f64)],
        sent: u64,
        cpu_ms_per_volume: BTreeMap<String, f64>,
    ) -> BenchReport {
        for v in &mut volumes {
            v.stage_ms =
                snap.stages.iter().map(|s| v.latency_ms.get(s).copied().unwrap_or(f64::NAN)).collect();
        }
        let t2f: Vec<f64> = volumes.iter().filter_map(VolumeSeen::trigger_to_feedback_ms).collect();
        let start = volumes.iter().filter_map(|v| v.acq_time).reduce(f64::min);
        let end = volumes.iter().map(|v| v.recv_time).reduce(f64::max);
        let throughput = match (start, end) {
            (Some(a), Some(b)) if b > a => volumes.len() as f64 / (b - a),
            _ => 0.0,
        };
        let counts = BTreeMap::from([
            ("sent".to_string(), sent),
            ("received".to_string(), snap.received),
            ("recorded".to_string(), snap.recorded),
            ("published".to_string(), snap.published),
            ("subscriber".to_string(), volumes.len() as u64),
            ("dropped".to_string(), snap.queues.iter().map(|q| q.dropped).sum()),
            ("rejected".to_string(), snap.rejected),
        ]);
        BenchReport {
            deadline_misses: t2f.iter().filter(|m| **m > setup.deadline_ms).count(),
            setup,
            stages: snap.stages.clone(),
            stages_ms: snap.stage_latency_ms.clone(),
            ingest_to_publish_ms: snap.end_to_end_ms,
            trigger_to_feedback_ms: summarise(&t2f),
            jitter_ms: std_dev(&t2f),
            trial_decode_ms: summarise(&decodes.iter().map(|d| d.0).collect::<Vec<_>>()),
            decode_compute_ms: summarise(&decodes.iter().map(|d| d.1).collect::<Vec<_>>()),
            throughput_vps: throughput,
            counts,
            queues: snap.queues.clone(),
            errors: snap.errors.clone(),
            cpu_ms_per_volume,
            volumes,
        }
    }

    /// The table printed at the end.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let s0 = &self.setup;
        let rate = s0.rate_hz.map_or("max".to_string(), |r| format!("{r} Hz"));
        let _ = writeln!(
            s,
            "mirage bench: {:?} × {} volumes over {} at {rate}; decode {} voxels (rank {}); {}",
            s0.shape, s0.volumes, s0.ingest, s0.voxels_decoded, s0.rank, s0.machine
        );
        let _ = writeln!(
            s,
            "{:<26} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "n", "p50", "p90", "p99", "p99.9", "max"
        );
        let mut row = |name: &str, l: &LatencySummary| {
            let _ = writeln!(
                s,
                "{:<26} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name, l.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        };
        for name in &self.stages {
            if let Some(l) = self.stages_ms.get(name) {
                row(name, l);
            }
        }
        row("ingest to publish", &self.ingest_to_publish_ms);
        row("trigger to feedback", &self.trigger_to_feedback_ms);
        if self.trial_decode_ms.count > 0 {
            row("trial close to decode", &self.trial_decode_ms);
            row("decode compute", &self.decode_compute_ms);
        }
        let counts: Vec<String> = self.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            s,
            "jitter (sd) {:.3} ms | throughput {:.1} volumes/s | deadline {} ms missed {} | {}",
            self.jitter_ms,
            self.throughput_vps,
            self.setup.deadline_ms,
            self.deadline_misses,
            counts.join(", ")
        );
        let cpu: Vec<String> = self.cpu_ms_per_volume.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        let _ = writeln!(s, "CPU ms per volume: {}", cpu.join(", "));
        if !self.errors.is_empty() {
            let e: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "errors: {}", e.join(" "));
        }
        s
    }
}

/// This machine in words: CPU model and online cores.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
        .and_then(|l| l.split(':').nth(1).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores")
}
