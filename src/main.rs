//! `mirage`: command-line entry point. Parses arguments and hands them to `mirage_rt::commands`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mirage_rt::commands::bench::Transport;
use mirage_rt::commands::decode::{Renorm, RunStatsFrom, TrainArgs};
use mirage_rt::commands::glm::{DesignSource, GlmOptions};
use mirage_rt::commands::realign::{RealignOutputs, ReferenceChoice};
use mirage_rt::commands::scanner::ScannerArgs;
use mirage_rt::commands::{self, run::RunOptions, simulate::SimTarget};
use mirage_rt::decode::train::TrainOptions;
use mirage_rt::decode::WeightDtype;
use mirage_rt::ingest::Speed;
use mirage_rt::scanner::watch::WatchConfig;
use mirage_rt::scanner::Vendor;

#[derive(Parser)]
#[command(name = "mirage", version, about = "Real-time fMRI decoding daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: ingest → motion → glm → decode → publish, recording every volume.
    Run {
        /// TOML configuration (default: built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        opts: RunOptions,
    },
    /// Simulate a run with exact ground truth: write it to a folder or stream it to a daemon.
    Simulate(SimulateCmd),
    /// Watch a scanner's export folder and send each volume, once its files are whole, to a daemon.
    Scanner(ScannerCmd),
    /// Read a folder of scanner files (DICOM or PAR/REC) into one 4-D NIfTI.
    Convert {
        /// The folder.
        dir: PathBuf,
        /// siemens, ge, philips or auto.
        #[arg(long, default_value = "auto", value_parser = Vendor::parse)]
        vendor: Vendor,
        /// Output .nii or .nii.gz.
        #[arg(long)]
        out: PathBuf,
    },
    /// Smooth a 4-D NIfTI offline with the smoothing stage's code (a Gaussian of FWHM mm).
    Smooth {
        /// Input series (.nii or .nii.gz).
        input: PathBuf,
        /// Full width at half maximum, mm.
        #[arg(long, default_value_t = 5.0)]
        fwhm: f64,
        /// Smoothed series.
        #[arg(long)]
        out: PathBuf,
    },
    /// Realign a 4-D NIfTI offline with the online motion stage's code.
    Realign {
        /// Input series (.nii or .nii.gz).
        input: PathBuf,
        /// Resliced series.
        #[arg(long)]
        out: Option<PathBuf>,
        /// fMRIPrep-style confounds TSV (six parameters and framewise_displacement).
        #[arg(long)]
        params: Option<PathBuf>,
        /// Matrices TSV: per volume the 12 numbers (row-major 3x4) of M, reference(p) = moving(M p).
        #[arg(long)]
        matrices: Option<PathBuf>,
        /// Reference: a volume index K of the input (default 0) or a NIfTI file.
        #[arg(long, default_value = "0")]
        reference: String,
        /// TOML configuration whose [motion] section sets the optimiser.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Fit the GLM offline over a 4-D NIfTI with the online stage's code.
    Glm {
        /// Input series (.nii or .nii.gz).
        input: PathBuf,
        /// Repetition time in seconds (default: the header's).
        #[arg(long)]
        tr: Option<f64>,
        /// BIDS events.tsv: one HRF-convolved regressor per trial (or per condition, see --config).
        #[arg(long, conflicts_with = "design", required_unless_present = "design")]
        events: Option<PathBuf>,
        /// A design matrix: plain TSV (optional header) or FSL design.mat (VEST).
        #[arg(long)]
        design: Option<PathBuf>,
        /// Output folder: betas.nii.gz, tstats.nii.gz, design.tsv.
        #[arg(long)]
        out: PathBuf,
        /// Mask NIfTI (default: the first volume's brain mask).
        #[arg(long)]
        mask: Option<PathBuf>,
        /// AR(1) prewhitening.
        #[arg(long)]
        ar1: bool,
        /// DCT high-pass with this cut-off in seconds (default: the configured drift).
        #[arg(long)]
        highpass: Option<f64>,
        /// Motion parameters per volume (`mirage realign --params`, an fMRIPrep confounds TSV):
        /// nuisance regressors, as the live GLM has them.
        #[arg(long)]
        motion: Option<PathBuf>,
        /// TOML configuration whose [glm] section sets the model.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Train the MIRAGE heads: closed-form ridge per target array, written as a model folder.
    Train {
        /// Betas, trials × voxels (.npy; `mirage glm` writes trial_betas.npy).
        #[arg(long)]
        betas: PathBuf,
        /// Targets: a folder of HEAD.npy (or an .npz), one row per trial.
        #[arg(long)]
        targets: PathBuf,
        /// Model folder to write.
        #[arg(long)]
        out: PathBuf,
        /// Ridge penalty.
        #[arg(long, default_value_t = 1e5)]
        alpha: f64,
        /// Choose the penalty per head by 5-fold cross-validation among these (comma-separated).
        #[arg(long, value_delimiter = ',')]
        cv: Vec<f64>,
        /// Low-rank heads of this rank (heads with fewer outputs stay full).
        #[arg(long)]
        rank: Option<usize>,
        /// Mask NIfTI of the betas' voxels (recorded to check live masks).
        #[arg(long)]
        mask: Option<PathBuf>,
        /// Do not z-score the betas.
        #[arg(long)]
        no_zscore: bool,
        /// A head's own input (repeatable): `l2` scales each z-scored trial to unit norm
        /// (MIRAGE's retrieval head), `none` reads the betas as given; default `zscore`.
        #[arg(long = "head-input", value_name = "HEAD=zscore|l2|none", value_parser = parse_head_input)]
        head_input: Vec<(String, mirage_rt::decode::model::HeadInput)>,
    },
    /// Decode betas (trials × voxels) into HEAD.npy per head.
    Decode(DecodeCmd),
    /// Fit the alignment on a few imagery trials of one run (the file's other rows are the
    /// rest of that run).
    Calibrate(CalibrateCmd),
    /// Measure the whole pipeline: per-stage and trigger-to-feedback latency, throughput, CPU.
    Bench(BenchCmd),
    /// Time per-trial decode of random MIRAGE-shaped heads on a device; compare with the CPU.
    BenchDecode(BenchDecodeCmd),
    /// Print a calibration protocol's cue schedule as events.tsv.
    Protocol {
        /// Protocol TOML (calibration/*.toml).
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// PixCorr, SSIM, 2-way identification and top-1 retrieval per head and condition.
    Eval {
        /// Predictions folder (HEAD.npy).
        #[arg(long)]
        pred: PathBuf,
        /// Truth folder (HEAD.npy, same shapes).
        #[arg(long)]
        truth: PathBuf,
        /// TSV with a condition or trial_type column, one row per sample (e.g. events.tsv).
        #[arg(long)]
        conditions: Option<PathBuf>,
        /// Report JSON.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a configuration file without starting anything.
    Check {
        /// TOML configuration.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Export a session folder as BIDS: raw BOLD per run with sidecar and events, and
    /// derivatives/mirage-rt/ (motion confounds, latency summary).
    Export {
        /// The session folder.
        #[arg(value_name = "SESSION")]
        dir: PathBuf,
        /// The BIDS dataset to write (made, or added to).
        #[arg(long)]
        bids: PathBuf,
        /// Participant label.
        #[arg(long, default_value = "01")]
        subject: String,
        /// BIDS session label (none: no ses- level).
        #[arg(long)]
        session: Option<String>,
        /// Task label.
        #[arg(long, default_value = "rt")]
        task: String,
        /// The first run's number.
        #[arg(long, default_value_t = 1)]
        run: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Make a CURVE key pair: PREFIX.key (public, for peers and `clients` lists) and
    /// PREFIX.key_secret (owner-only), ZeroMQ certificates as pyzmq's zmq.auth reads them.
    Keygen {
        /// Path prefix of the two files (e.g. keys/scanner).
        prefix: PathBuf,
    },
}

/// CURVE keys of a sender to a daemon whose ingest has `ingest.curve`.
#[derive(clap::Args)]
struct CurveArgs {
    /// The daemon's public certificate (its NAME.key).
    #[arg(long, requires = "curve_key")]
    curve_server: Option<PathBuf>,
    /// This sender's secret certificate (NAME.key_secret, made by `mirage keygen`).
    #[arg(long, requires = "curve_server")]
    curve_key: Option<PathBuf>,
}

impl CurveArgs {
    fn load(&self) -> anyhow::Result<Option<mirage_rt::curve::ClientCurve>> {
        match (&self.curve_server, &self.curve_key) {
            (Some(server), Some(own)) => {
                Ok(Some(mirage_rt::curve::ClientCurve::load(server, own).map_err(anyhow::Error::msg)?))
            }
            _ => Ok(None),
        }
    }
}

/// `mirage simulate`'s arguments.
#[derive(clap::Args)]
struct SimulateCmd {
    /// TOML configuration whose [sim] section gives the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Number of volumes.
    #[arg(long)]
    volumes: Option<usize>,
    /// Repetition time, seconds.
    #[arg(long)]
    tr: Option<f64>,
    /// Grid X,Y,Z.
    #[arg(long, value_parser = parse_shape)]
    shape: Option<[usize; 3]>,
    /// A NIfTI whose first volume is the head image.
    #[arg(long)]
    anatomy: Option<PathBuf>,
    /// seen, imagery or mixed.
    #[arg(long)]
    condition: Option<String>,
    /// Any other simulator parameter, KEY=VALUE (repeatable), e.g. --set noise_pct=0.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write bold.nii.gz, events.tsv and truth/ here.
    #[arg(long, conflicts_with = "stream", required_unless_present = "stream")]
    out: Option<PathBuf>,
    /// Send live to a daemon: pyneal://HOST:PORT, zmq://HOST:PORT or lsl://NAME.
    #[arg(long)]
    stream: Option<String>,
    /// Streaming pace: tr (one volume per TR), max, or a speed-up factor.
    #[arg(long, default_value = "tr", value_parser = Speed::parse)]
    speed: Speed,
    /// Seconds to wait for the daemon.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    #[command(flatten)]
    curve: CurveArgs,
}

/// `mirage scanner`'s arguments.
#[derive(clap::Args)]
struct ScannerCmd {
    /// The export folder.
    #[arg(long)]
    watch: PathBuf,
    /// siemens (mosaic or XA enhanced DICOM), ge (single-slice DICOM), philips (PAR/REC) or auto.
    #[arg(long, default_value = "auto", value_parser = Vendor::parse)]
    vendor: Vendor,
    /// The daemon: pyneal://HOST:PORT, zmq://HOST:PORT or lsl://NAME.
    #[arg(long)]
    to: String,
    /// TR in seconds, sent when the files carry none.
    #[arg(long)]
    tr: Option<f64>,
    /// Seconds between looks at the folder (change events wake it sooner where they work).
    #[arg(long, default_value_t = 0.1)]
    poll: f64,
    /// Seconds a file's size must hold still before it is read, when no close event came.
    #[arg(long, default_value_t = 0.2)]
    settle: f64,
    /// Seconds a volume waits for a missing earlier one before it is sent anyway.
    #[arg(long, default_value_t = 2.0)]
    reorder: f64,
    /// Seconds a file may stay unreadable after its size held still before it is skipped.
    #[arg(long, default_value_t = 10.0)]
    give_up: f64,
    /// Seconds to wait for the daemon.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Stop after this many volumes.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Stop when no volume has come for this many seconds (after the first).
    #[arg(long)]
    idle_exit: Option<f64>,
    /// Only poll the folder (a network share whose change events never come).
    #[arg(long)]
    no_events: bool,
    #[command(flatten)]
    curve: CurveArgs,
}

/// `mirage decode`'s arguments.
#[derive(clap::Args)]
struct DecodeCmd {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Betas .npy.
    #[arg(long)]
    betas: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// stored (the live stage's statistics), batch (MIRAGE's normalize_preds) or none.
    #[arg(long, value_enum, default_value = "stored")]
    renorm: Renorm,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// none, zscore-run (z-score with this file's own statistics, MIRAGE's imagery
    /// baseline) or an alignment file (`mirage calibrate`).
    #[arg(long, default_value = "none")]
    align: String,
    /// Per-run statistics (zscore-run and calibrated alignments) from every row of the
    /// file (all), or from the rows so far at each row, as the live stage has them
    /// (running).
    #[arg(long, value_enum, default_value = "all")]
    run_stats: RunStatsFrom,
}

/// `mirage calibrate`'s arguments.
#[derive(clap::Args)]
struct CalibrateCmd {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Betas .npy (trials × voxels) of one run.
    #[arg(long)]
    betas: PathBuf,
    /// Targets: a folder of HEAD.npy (or an .npz), one row per betas row.
    #[arg(long)]
    targets: PathBuf,
    /// Rows used for calibration, e.g. 0,3,5-9.
    #[arg(long)]
    trials: String,
    /// Alignment file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// TOML configuration whose [calibrate] section sets the fit.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a [calibrate] key, e.g. --set rank=4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Write the fit report (JSON) here.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// `mirage bench`'s arguments.
#[derive(clap::Args)]
struct BenchCmd {
    /// TOML configuration for the stages and queues.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Grid X,Y,Z.
    #[arg(long, default_value = "64,64,36", value_parser = parse_shape)]
    shape: [usize; 3],
    /// Voxels decoded per trial through random low-rank heads of MIRAGE's output shapes (0: none).
    #[arg(long, default_value_t = 0)]
    voxels_decoded: usize,
    /// Rank of those heads.
    #[arg(long, default_value_t = 512)]
    rank: usize,
    /// Volumes to send.
    #[arg(long, default_value_t = 500)]
    volumes: usize,
    /// Transport: inproc, pyneal, zmq or lsl.
    #[arg(long, value_enum, default_value = "pyneal")]
    ingest: Transport,
    /// Volumes per second, or max.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    rate: Rate,
    /// Trigger-to-feedback deadline, ms (default one TR: 1000).
    #[arg(long)]
    deadline_ms: Option<f64>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write latency plots (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Keep the bench's session folder (volumes, messages, report.html) here (default: a scratch
    /// folder, removed at the end).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Override a configuration key, SECTION.KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

/// `mirage bench-decode`'s arguments.
#[derive(clap::Args)]
struct BenchDecodeCmd {
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Input voxels (15,724: NSD subj01 nsdgeneral).
    #[arg(long, default_value_t = 15_724)]
    voxels: usize,
    /// Rank of the heads, or full.
    #[arg(long, default_value = "512", value_parser = parse_rank)]
    rank: Rank,
    /// Precision of the weight matrices: f32, bf16 or q8_0 (CPU).
    #[arg(long, default_value = "f32", value_parser = WeightDtype::parse)]
    dtype: WeightDtype,
    /// Heads decoded only to their latents (comma-separated, or all).
    #[arg(long, value_delimiter = ',')]
    latent_heads: Vec<String>,
    /// Gallery items ranked per trial (made from the heads' outputs; 0: none).
    #[arg(long, default_value_t = 0)]
    gallery: usize,
    /// Timed trials.
    #[arg(long, default_value_t = 100)]
    trials: usize,
    /// Trials also decoded on the CPU and compared with the device's outputs (0: none).
    #[arg(long, default_value_t = 0)]
    compare_cpu: usize,
    /// Exit with an error when an output differs from the CPU's by more than this.
    #[arg(long)]
    tolerance: Option<f64>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Time a MindEye2 network of this width (h: 4096 or 1024) instead of MIRAGE's heads:
    /// random weights at the published shapes (4 mixer blocks, 256 × 1664 CLIP tokens).
    #[arg(long)]
    mindeye2: Option<usize>,
    /// With --mindeye2: SD-VAE pictures (224 × 224) timed after the trials.
    #[arg(long, default_value_t = 3)]
    pictures: usize,
}

/// A volume rate: `max`, or volumes per second.
#[derive(Clone, Copy, Debug)]
struct Rate(Option<f64>);

fn parse_rate(s: &str) -> Result<Rate, String> {
    match s {
        "max" => Ok(Rate(None)),
        r => match r.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(Rate(Some(v))),
            _ => Err(format!("{r:?}: use max or a positive number")),
        },
    }
}

/// A head rank: `full`, or a number.
#[derive(Clone, Copy, Debug)]
struct Rank(Option<usize>);

fn parse_rank(s: &str) -> Result<Rank, String> {
    match s {
        "full" => Ok(Rank(None)),
        r => r.parse().map(|n| Rank(Some(n))).map_err(|_| format!("{r:?}: use a number or full")),
    }
}

/// A grid `X,Y,Z`.
fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?}: want X,Y,Z"))?;
    parts.try_into().map_err(|_| format!("{s:?}: want X,Y,Z"))
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, opts } => {
            let cfg = commands::load_config(config.as_deref())?;
            commands::run::run(cfg, &opts).map(|_| ())
        }
        Command::Simulate(a) => simulate(a),
        Command::Scanner(a) => scanner(a),
        Command::Convert { dir, vendor, out } => commands::scanner::convert(&dir, vendor, &out).map(|_| ()),
        Command::Smooth { input, fwhm, out } => {
            let done = commands::smooth::smooth(
                &input,
                &out,
                fwhm,
                mirage_rt::ingest::IngestConfig::default().max_voxels,
            )?;
            eprintln!(
                "mirage: smoothed {} volumes (FWHM {fwhm} mm); smoothing stage {}",
                done.seconds.len(),
                commands::per_volume_times(&done.seconds)
            );
            Ok(())
        }
        Command::Realign { input, out, params, matrices, reference, config } => {
            let cfg = commands::load_config(config.as_deref())?;
            let outputs = RealignOutputs { out, params, matrices };
            let done = commands::realign::realign(
                &input,
                &ReferenceChoice::parse(&reference),
                &cfg.motion,
                &outputs,
                cfg.ingest.max_voxels,
            )?;
            let failed = done.estimates.iter().filter(|e| e.is_none()).count();
            eprintln!(
                "mirage: realigned {} volumes ({failed} without an estimate); motion stage {}",
                done.estimates.len(),
                commands::per_volume_times(&done.seconds)
            );
            Ok(())
        }
        Command::Glm { input, tr, events, design, out, mask, ar1, highpass, motion, config } => {
            let cfg = commands::load_config(config.as_deref())?;
            let design = match (events, design) {
                (Some(e), _) => DesignSource::Events(e),
                (None, Some(d)) => DesignSource::Matrix(d),
                (None, None) => anyhow::bail!("give --events FILE or --design FILE"),
            };
            let opts = GlmOptions { tr, design, out, mask, ar1, highpass, motion };
            let fitted = commands::glm::glm(&input, &opts, &cfg.glm, cfg.ingest.max_voxels)?;
            eprintln!(
                "mirage: fitted {} regressors on {} voxels; wrote {}; GLM stage {}",
                fitted.fit.names.len(),
                fitted.fit.mask.len(),
                opts.out.display(),
                commands::per_volume_times(&fitted.seconds)
            );
            Ok(())
        }
        Command::Train { betas, targets, out, alpha, cv, rank, mask, no_zscore, head_input } => {
            let opts = TrainOptions {
                alpha,
                cv_alphas: cv,
                rank,
                zscore: !no_zscore,
                head_inputs: head_input.into_iter().collect(),
                progress: true,
                ..TrainOptions::default()
            };
            commands::decode::train(&TrainArgs { betas, targets, out, mask, opts })
        }
        Command::Decode(a) => decode(a),
        Command::Calibrate(a) => calibrate(a),
        Command::Bench(a) => bench(a),
        Command::BenchDecode(a) => bench_decode(a),
        Command::Protocol { file, out } => commands::calibrate::protocol(&file, out.as_deref()),
        Command::Eval { pred, truth, conditions, out } => {
            commands::decode::eval(&pred, &truth, conditions.as_deref(), &out).map(|_| ())
        }
        Command::Check { config } => commands::check(config.as_deref()),
        Command::Keygen { prefix } => commands::keygen(&prefix),
        Command::Export { dir, bids, subject, session, task, run, force } => {
            let opts = mirage_rt::bids::ExportOptions { subject, session, task, first_run: run, force };
            commands::export(&dir, &bids, &opts)
        }
    }
}

fn simulate(a: SimulateCmd) -> anyhow::Result<()> {
    let SimulateCmd {
        config,
        seed,
        volumes,
        tr,
        shape,
        anatomy,
        condition,
        set,
        out,
        stream,
        speed,
        timeout,
        curve,
    } = a;
    let mut sim = commands::load_config(config.as_deref())?.sim;
    // The typed flags first, then --set (which wins).
    sim.seed = seed.unwrap_or(sim.seed);
    sim.volumes = volumes.unwrap_or(sim.volumes);
    sim.tr = tr.unwrap_or(sim.tr);
    sim.shape = shape.or(sim.shape);
    sim.anatomy = anatomy.or(sim.anatomy);
    let condition = condition.map(|c| format!("condition={c}"));
    for kv in condition.iter().chain(&set) {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {kv:?}: write KEY=VALUE"))?;
        sim.set(k, v).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let target = match (out, stream) {
        (Some(dir), _) => SimTarget::Folder(dir),
        (None, Some(uri)) => SimTarget::Stream { uri, speed, timeout, curve: curve.load()? },
        (None, None) => anyhow::bail!("give --out DIR or --stream URI"),
    };
    commands::simulate::simulate(&sim, &target)
}

fn scanner(a: ScannerCmd) -> anyhow::Result<()> {
    let ScannerCmd {
        watch,
        vendor,
        to,
        tr,
        poll,
        settle,
        reorder,
        give_up,
        timeout,
        stop_after,
        idle_exit,
        no_events,
        curve,
    } = a;
    let watch_cfg = WatchConfig { vendor, settle_s: settle, reorder_s: reorder, give_up_s: give_up };
    let args = ScannerArgs {
        watch,
        to,
        watch_cfg,
        tr,
        poll_s: poll,
        timeout_s: timeout,
        stop_after,
        idle_exit_s: idle_exit,
        no_events,
        curve: curve.load()?,
    };
    commands::scanner::scanner(&args, &commands::scanner::stop_on_signal()).map(|_| ())
}

fn decode(a: DecodeCmd) -> anyhow::Result<()> {
    let DecodeCmd { model, betas, out, renorm, device, align, run_stats } = a;
    commands::decode::decode(&model, &betas, &out, renorm, &device, &align, run_stats)
}

fn calibrate(a: CalibrateCmd) -> anyhow::Result<()> {
    let CalibrateCmd { model, betas, targets, trials, out, config, set, device, report } = a;
    let mut cfg = match &config {
        Some(path) => mirage_rt::config::Config::load(path)?,
        None => mirage_rt::config::Config::default(),
    };
    for s in &set {
        cfg.set(&format!("calibrate.{s}"))?;
    }
    let problems = cfg.calibrate.validate();
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    let trials = commands::calibrate::parse_trials(&trials)?;
    let args = commands::calibrate::CalibrateArgs {
        model,
        betas,
        targets,
        trials,
        out,
        device,
        cfg: cfg.calibrate,
        progress: true,
    };
    let r = commands::calibrate::calibrate(&args)?;
    eprintln!("{}", commands::calibrate::summary(&r, &args.out));
    if let Some(path) = report {
        std::fs::write(&path, serde_json::to_string_pretty(&r)?)?;
    }
    Ok(())
}

fn bench(a: BenchCmd) -> anyhow::Result<()> {
    let BenchCmd {
        config,
        shape,
        voxels_decoded,
        rank,
        volumes,
        ingest,
        rate,
        deadline_ms,
        json,
        plot,
        record,
        set,
    } = a;
    let mut cfg = commands::load_config(config.as_deref())?;
    for s in &set {
        cfg.set(s)?;
    }
    let args = commands::bench::BenchArgs {
        config: cfg,
        shape,
        voxels_decoded,
        rank,
        volumes,
        ingest,
        rate: rate.0,
        deadline_ms,
        json,
        plot,
        record,
    };
    let report = commands::bench::bench(&args, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
    print!("{}", report.table());
    Ok(())
}

fn bench_decode(a: BenchDecodeCmd) -> anyhow::Result<()> {
    let BenchDecodeCmd {
        device,
        voxels,
        rank,
        dtype,
        latent_heads,
        gallery,
        trials,
        compare_cpu,
        tolerance,
        json,
        mindeye2,
        pictures,
    } = a;
    if let Some(hidden) = mindeye2 {
        let report = commands::bench_decode::bench_mindeye2(
            &device,
            voxels,
            hidden,
            dtype,
            trials,
            pictures,
            json.as_deref(),
        )?;
        print!("{report}");
        return Ok(());
    }
    let args = commands::bench_decode::DecodeBenchArgs {
        device,
        voxels,
        rank: rank.0,
        weight_dtype: dtype,
        latent_heads: match latent_heads.as_slice() {
            [all] if all == "all" => {
                mirage_rt::decode::synthetic::MIRAGE_HEADS.iter().map(|(n, _)| n.to_string()).collect()
            }
            _ => latent_heads,
        },
        gallery,
        trials,
        compare_cpu,
        tolerance,
        json,
    };
    print!("{}", commands::bench_decode::bench_decode(&args)?.table());
    Ok(())
}

/// `HEAD=zscore|l2|none` of `mirage train --head-input`.
fn parse_head_input(s: &str) -> Result<(String, mirage_rt::decode::model::HeadInput), String> {
    let (head, kind) = s.split_once('=').ok_or_else(|| format!("{s:?}: want HEAD=zscore|l2|none"))?;
    let kind = mirage_rt::decode::model::HeadInput::parse(kind)
        .ok_or_else(|| format!("{s:?}: the input is one of zscore, l2, none"))?;
    Ok((head.to_string(), kind))
}

fn main() -> ExitCode {
    mirage_rt::init_logging();
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirage: {e:#}");
            ExitCode::from(2)
        }
    }
}
