//! `mirage bench`: drives the whole pipeline (simulator → a real transport → motion → GLM →
//! decode → publish → a ZMQ subscriber thread) and reports per-stage and trigger-to-feedback
//! latency, jitter, throughput, deadline misses, drops and CPU time per volume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::bench::{machine, plot, process_cpu_ms, BenchReport, BenchSetup, VolumeSeen};
use crate::clock;
use crate::config::Config;
use crate::decode::model::{FusionConfig, HeadConfig, ModelConfig, FORMAT};
use crate::decode::synthetic::MIRAGE_HEADS;
use crate::decode::train::{write_model, NamedTensor};
use crate::ingest::Speed;
use crate::message::Received;
use crate::metrics::thread_cpu_ms;
use crate::pipeline::resolve::Topology;
use crate::pipeline::{Pipeline, PipelineHandle};
use crate::rng::Rng;
use crate::sim::Simulator;

/// How volumes reach the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// The daemon's own simulator source (no network).
    Inproc,
    /// pyneal-scanner's protocol over ZMQ PAIR.
    Pyneal,
    /// The native ZMQ PUSH protocol.
    Zmq,
    /// Lab Streaming Layer.
    Lsl,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Inproc => "inproc",
            Transport::Pyneal => "pyneal",
            Transport::Zmq => "zmq",
            Transport::Lsl => "lsl",
        }
    }
}

/// `mirage bench` options.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// Base configuration (stages, queues); ingest, publish and recording are the bench's.
    pub config: Config,
    /// Grid.
    pub shape: [usize; 3],
    /// Voxels decoded per trial through random low-rank MIRAGE-shaped heads (0: no decode).
    pub voxels_decoded: usize,
    /// Rank of those heads.
    pub rank: usize,
    /// Volumes to send.
    pub volumes: usize,
    /// Transport.
    pub ingest: Transport,
    /// Volumes per second (`None`: as fast as the pipeline takes them).
    pub rate: Option<f64>,
    /// Trigger-to-feedback deadline, ms (default: one TR, 1000 ms).
    pub deadline_ms: Option<f64>,
    /// JSON report path.
    pub json: Option<PathBuf>,
    /// SVG plot path.
    pub plot: Option<PathBuf>,
    /// Where to keep the session folder (`None`: a scratch folder, removed at the end).
    pub record: Option<PathBuf>,
}

/// Seconds without a published volume, after the sender finished, before the bench stops.
const IDLE_S: f64 = 10.0;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes the GLM mask: the visual ROI, or `n` brain voxels (the ROI first) when `n` is given;
/// returns its path and voxels.
fn write_mask(dir: &Path, sim: &Simulator, n: Option<usize>) -> anyhow::Result<(PathBuf, Vec<usize>)> {
    let anat = sim.anatomy();
    let mut voxels: Vec<usize> = anat.roi.clone();
    if let Some(n) = n {
        voxels.extend(anat.brain.iter().filter(|v| anat.roi.binary_search(v).is_err()));
        if voxels.len() < n {
            anyhow::bail!("--voxels-decoded {n}: this grid's brain has only {} voxels", voxels.len());
        }
        voxels.truncate(n);
        voxels.sort_unstable();
    }
    let mut mask = vec![0f32; anat.dims.iter().product()];
    voxels.iter().for_each(|&v| mask[v] = 1.0);
    let path = dir.join("mask.nii.gz");
    crate::io::nifti::write_nifti(&path, anat.dims, &anat.affine, None, &[&mask])?;
    Ok((path, voxels))
}

/// Writes a model of random low-rank heads with MIRAGE's output shapes over `voxels`.
fn write_random_model(dir: &Path, voxels: &[usize], rank: usize) -> anyhow::Result<PathBuf> {
    let n = voxels.len();
    let mut rng = Rng::new(7, 99);
    let mut random =
        |len: usize, scale: f64| -> Vec<f32> { (0..len).map(|_| (rng.normal() * scale) as f32).collect() };
    let mut tensors = vec![
        NamedTensor { name: "input.mean".into(), shape: vec![n], values: vec![0.0; n] },
        NamedTensor { name: "input.std".into(), shape: vec![n], values: vec![1.0; n] },
        NamedTensor {
            name: "input.voxels".into(),
            shape: vec![n],
            values: voxels.iter().map(|&v| v as f32).collect(),
        },
    ];
    let mut heads = Vec::new();
    for (name, shape) in MIRAGE_HEADS {
        let out: usize = shape.iter().product();
        let r = rank.min(out);
        tensors.push(NamedTensor {
            name: format!("heads.{name}.down"),
            shape: vec![r, n],
            values: random(r * n, 1.0 / (n as f64).sqrt()),
        });
        tensors.push(NamedTensor {
            name: format!("heads.{name}.up"),
            shape: vec![out, r],
            values: random(out * r, 1.0 / (r as f64).sqrt()),
        });
        tensors.push(NamedTensor {
            name: format!("heads.{name}.bias"),
            shape: vec![out],
            values: vec![0.0; out],
        });
        heads.push(HeadConfig {
            name: name.into(),
            shape: shape.to_vec(),
            rank: Some(r),
            renorm: false,
            input: Default::default(),
        });
    }
    let cfg = ModelConfig {
        format: FORMAT.into(),
        n_voxels: n,
        zscore_input: true,
        heads,
        fusion: FusionConfig {
            image_head: Some("image".into()),
            text_head: Some("text".into()),
            ..FusionConfig::default()
        },
        provenance: serde_json::json!({"bench": "random low-rank heads of MIRAGE's output shapes"}),
    };
    let model = dir.join("model");
    write_model(&model, &cfg, tensors)?;
    Ok(model)
}

/// The bench's configuration: the simulator's run, a mask, a random model when decoding, a
/// free publish port and the transport's URI (none: the daemon's own simulator).
struct Prepared {
    cfg: Config,
    speed: Speed,
    send_uri: Option<String>,
    pub_port: u16,
}

fn prepare(args: &BenchArgs, dir: &Path) -> anyhow::Result<Prepared> {
    let mut cfg = args.config.clone();
    cfg.sim.shape = Some(args.shape);
    cfg.sim.volumes = args.volumes;
    cfg.sim.tr = 1.0;
    cfg.sim.protocol = None;
    let speed = match args.rate {
        Some(r) if r.is_finite() && r > 0.0 => Speed::Factor(r),
        Some(r) => anyhow::bail!("--rate {r}: use max or a positive number of volumes per second"),
        None => Speed::Max,
    };
    let sim = Simulator::new(&cfg.sim)?;
    let (mask, voxels) = write_mask(dir, &sim, (args.voxels_decoded > 0).then_some(args.voxels_decoded))?;
    cfg.glm.mask = mask.display().to_string();
    cfg.decode.gallery = None;
    cfg.decode.model = None;
    if args.voxels_decoded > 0 {
        eprintln!(
            "mirage bench: writing a random model ({} voxels, rank {})…",
            args.voxels_decoded, args.rank
        );
        cfg.decode.model = Some(write_random_model(dir, &voxels, args.rank)?);
    }
    let pub_port = free_port()?;
    cfg.publish.uri = Some(format!("tcp://127.0.0.1:{pub_port}"));
    cfg.publish.lsl_feedback = None;
    let session = args.record.clone().unwrap_or_else(|| dir.join("session"));
    cfg.record.dir = Some(session.display().to_string());
    cfg.ingest.stop_after = Some(args.volumes as u64);
    let speed_q = match args.rate {
        Some(r) => r.to_string(),
        None => "max".into(),
    };
    let send_uri = match args.ingest {
        Transport::Inproc => {
            cfg.ingest.uri = format!("sim://?speed={speed_q}&delay=1");
            None
        }
        t => {
            // Events come from the simulator's events.tsv (pyneal and LSL carry no markers).
            let events = dir.join("events.tsv");
            std::fs::write(&events, sim.events_tsv())?;
            cfg.glm.events = Some(events.clone());
            let uri = match t {
                Transport::Pyneal => format!("pyneal://127.0.0.1:{}", free_port()?),
                Transport::Zmq => format!("zmq://127.0.0.1:{}", free_port()?),
                _ => format!("lsl://mirage-bench-{}", std::process::id()),
            };
            cfg.ingest.uri = uri.clone();
            Some(uri)
        }
    };
    let problems = cfg.validate();
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    Ok(Prepared { cfg, speed, send_uri, pub_port })
}

/// Waits for the pipeline to finish, sampling its threads' CPU time and showing its status
/// line; stops it when nothing is published for [`IDLE_S`] after the sender is done.
fn watch(
    handle: &PipelineHandle,
    sender_done: impl Fn() -> bool,
    progress: bool,
) -> BTreeMap<u64, (String, f64)> {
    let mut threads: BTreeMap<u64, (String, f64)> = BTreeMap::new();
    let mut ticks = 0;
    // Once the sender is done, a pipeline that publishes nothing for IDLE_S has lost volumes
    // on the way in (counted as missing); stop it rather than wait for ever.
    let (mut last_published, mut since) = (0, clock::now());
    while !handle.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        threads.extend(thread_cpu_ms());
        ticks += 1;
        let published = handle.metrics().published.load(Ordering::Relaxed);
        if published != last_published {
            (last_published, since) = (published, clock::now());
        }
        if sender_done() && clock::now() - since > IDLE_S {
            tracing::warn!("bench: nothing published for {IDLE_S} s after the sender finished; stopping");
            handle.request_stop();
            since = f64::INFINITY;
        }
        if progress && ticks % 20 == 0 {
            eprint!("\r\x1b[2K{}", handle.metrics().snapshot().status_line());
        }
    }
    if progress {
        eprintln!();
    }
    threads
}

/// CPU time per published volume, ms: the whole process, each pipeline thread and their sum.
fn cpu_per_volume(
    cpu_total: f64,
    threads: &BTreeMap<u64, (String, f64)>,
    published: u64,
) -> BTreeMap<String, f64> {
    let n = published.max(1) as f64;
    let mut cpu: BTreeMap<String, f64> =
        BTreeMap::from([("process (with simulator and subscriber)".to_string(), cpu_total / n)]);
    for (name, ms) in threads.values() {
        if name.starts_with("mirage/") {
            *cpu.entry(name.clone()).or_default() += ms / n;
            *cpu.entry("pipeline threads".to_string()).or_default() += ms / n;
        }
    }
    cpu
}

/// Runs the bench and returns its report (also written as JSON and SVG when asked).
pub fn bench(args: &BenchArgs, progress: bool) -> anyhow::Result<BenchReport> {
    bench_with(args, progress, &Topology::standard())
}

/// As [`bench`], with the volume path `topology` builds.
pub fn bench_with(args: &BenchArgs, progress: bool, topology: &Topology) -> anyhow::Result<BenchReport> {
    let dir = tempfile_dir()?;
    let Prepared { cfg, speed, send_uri, pub_port } = prepare(args, &dir)?;

    let cpu_before = process_cpu_ms();
    let handle = Pipeline::build_with(&cfg, topology).map_err(|e| anyhow::anyhow!("{}", e.join("\n")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Seen>> = Arc::default();
    // With the volume path at SCHED_FIFO, the sender (a stand-in for the scanner, another
    // machine) and the subscriber (the experiment, which would ask for the same) run at it too.
    let priority = cfg.pipeline.realtime_priority;
    let subscriber = {
        let (stop, seen, m) = (stop.clone(), seen.clone(), handle.metrics().clone());
        let endpoint = format!("tcp://127.0.0.1:{pub_port}");
        std::thread::Builder::new().name("bench/subscriber".into()).spawn(move || {
            crate::pipeline::raise_priority(priority, &m);
            subscribe(&endpoint, &stop, &seen)
        })?
    };
    std::thread::sleep(Duration::from_millis(500));
    // Acquisition time of each volume the sender sent (pyneal's header carries none). The
    // volumes are made first, so the simulator's cost is not the daemon's latency.
    let acquired: Arc<Mutex<BTreeMap<u64, f64>>> = Arc::default();
    let sender = match &send_uri {
        Some(uri) => {
            let mut sim = Simulator::new(&cfg.sim)?;
            let volumes: Vec<_> = std::iter::from_fn(|| sim.next_volume()).collect();
            let (uri, acquired, m) = (uri.clone(), acquired.clone(), handle.metrics().clone());
            Some(std::thread::Builder::new().name("bench/sender".into()).spawn(move || {
                crate::pipeline::raise_priority(priority, &m);
                let record = &mut |index, acq| {
                    if let Ok(mut a) = acquired.lock() {
                        a.insert(index, acq);
                    }
                };
                crate::commands::simulate::stream(
                    volumes.into_iter(),
                    &[],
                    1.0,
                    &uri,
                    speed,
                    (30.0, None),
                    record,
                )
            })?)
        }
        None => None,
    };
    let threads = watch(&handle, || sender.as_ref().is_none_or(|t| t.is_finished()), progress);
    let sent = match sender {
        Some(t) => match t.join() {
            Ok(Ok((n, _))) => n as u64,
            Ok(Err(e)) => return Err(e.context("the bench's sender failed")),
            Err(_) => anyhow::bail!("the bench's sender panicked"),
        },
        None => args.volumes as u64,
    };
    let snap = handle.metrics().snapshot();
    drop(handle);
    let cpu_total = process_cpu_ms() - cpu_before;
    // Let the subscriber drain what is in flight.
    let deadline = clock::now() + 3.0;
    while clock::now() < deadline {
        let got = seen.lock().map(|s| s.volumes.len()).unwrap_or(0) as u64;
        if got >= snap.published {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = subscriber.join();
    let Seen { mut volumes, decodes } = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    let acquired = std::mem::take(&mut *acquired.lock().unwrap_or_else(|e| e.into_inner()));
    for v in &mut volumes {
        if let Some(a) = acquired.get(&v.index) {
            v.acq_time = Some(*a);
        }
    }

    let cpu = cpu_per_volume(cpu_total, &threads, snap.published);
    let setup = BenchSetup {
        shape: args.shape,
        volumes: args.volumes,
        ingest: args.ingest.name().into(),
        rate_hz: args.rate,
        voxels_decoded: args.voxels_decoded,
        rank: args.rank,
        motion: cfg.motion.enabled,
        glm: cfg.glm.enabled,
        deadline_ms: args.deadline_ms.unwrap_or(1000.0 * cfg.sim.tr),
        date: clock::utc_label(clock::unix_now()),
        machine: machine(),
    };
    let report = BenchReport::new(setup, &snap, volumes, &decodes, sent, cpu);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?).with_context(|| p.display().to_string())?;
    }
    if let Some(p) = &args.plot {
        std::fs::write(p, plot::svg(&report)).with_context(|| p.display().to_string())?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// A fresh scratch folder for the bench's model, mask, events and session.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mirage-bench-{}-{}", std::process::id(), clock::unix_now()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// What the subscriber collected.
#[derive(Default)]
struct Seen {
    volumes: Vec<VolumeSeen>,
    /// Per live decode: trial close to receipt, and decode compute time, ms.
    decodes: Vec<(f64, f64)>,
}

/// The subscriber: every `volume` and `decode` message, stamped on receipt.
fn subscribe(endpoint: &str, stop: &AtomicBool, seen: &Mutex<Seen>) {
    let ctx = zmq::Context::new();
    let Ok(sock) = ctx.socket(zmq::SUB) else { return };
    let ok = sock.set_rcvtimeo(100).is_ok()
        && sock.set_rcvhwm(100_000).is_ok()
        && sock.connect(endpoint).is_ok()
        && sock.set_subscribe(b"volume").is_ok()
        && sock.set_subscribe(b"decode").is_ok();
    if !ok {
        tracing::error!("bench: cannot subscribe to {endpoint}");
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let Ok(frames) = sock.recv_multipart(0) else { continue };
        let now = clock::now();
        let Ok(m) = Received::decode(&frames) else { continue };
        let Ok(mut s) = seen.lock() else { return };
        match m.topic.as_str() {
            "volume" => s.volumes.extend(VolumeSeen::from_message(&m, now)),
            "decode" => match crate::topic::read::<crate::topic::DecodeHeader>(&m.topic, &m.header) {
                Ok(d) if !d.trial.at_run_end => {
                    s.decodes.push((d.closed_time.map_or(f64::NAN, |c| (now - c) * 1e3), d.latency_ms));
                }
                _ => {}
            },
            _ => {}
        }
    }
}
