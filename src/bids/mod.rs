//! A session folder exported as BIDS: each run's BOLD series as received, with its sidecar and
//! events, and `derivatives/mirage-rt/` with what the daemon computed live (the realigned series,
//! motion confounds under fMRIPrep's column names, trial betas and the GLM mask, ROI time
//! series, decode results, the latency summary).
//!
//! ```text
//! OUT/dataset_description.json, participants.tsv, README
//! OUT/sub-S[/ses-SES]/func/sub-S[_ses-SES]_task-T_run-R_bold.nii.gz (+ .json, _events.tsv)
//! OUT/derivatives/mirage-rt/dataset_description.json
//! OUT/derivatives/mirage-rt/sub-S[/ses-SES]/func/…_desc-realigned_bold.nii.gz (+ .json)
//! OUT/derivatives/mirage-rt/sub-S[/ses-SES]/func/…_desc-confounds_timeseries.tsv (+ .json)
//! OUT/derivatives/mirage-rt/sub-S[/ses-SES]/func/…_desc-latency_summary.json
//! OUT/derivatives/mirage-rt/sub-S[/ses-SES]/func/…_desc-trials_betas.nii.gz (+ .tsv), …_desc-glm_mask.nii.gz
//! OUT/derivatives/mirage-rt/sub-S[/ses-SES]/func/…_desc-glm_design.tsv
//! OUT/derivatives/mirage-rt/sub-S[/ses-SES]/func/…_desc-roi_timeseries.tsv
//! OUT/derivatives/mirage-rt/sub-S[/ses-SES]/func/…_desc-decode_results.tsv, …_desc-HEAD_decoding.npy
//! ```

mod trials;

pub use trials::TrialFiles;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::io::nifti::NiftiWriter;
use crate::io::session::{read_messages, IndexEntry, LoggedMessage, SessionReader};
use crate::io::tsv;
use crate::topic::{BetasHeader, MotionHeader, Topic};
use crate::volume::Dtype;

/// What to call the exported data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOptions {
    /// Participant label (`sub-…`).
    pub subject: String,
    /// Session label (`ses-…`), if any.
    pub session: Option<String>,
    /// Task label (`task-…`).
    pub task: String,
    /// The first run's number; later runs of the session count up from it.
    pub first_run: u32,
    /// Replace files that exist.
    pub force: bool,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The session folder could not be read.
    #[error("{0}")]
    Session(#[from] crate::io::session::SessionError),
    /// A label is not BIDS (letters and digits only).
    #[error("--{what} {label:?}: a BIDS label is letters and digits only")]
    Label {
        /// Which option.
        what: &'static str,
        /// The label.
        label: String,
    },
    /// The session holds nothing to export.
    #[error("{0}: the session holds no volumes")]
    Empty(PathBuf),
    /// A run cannot be one BIDS series.
    #[error("run {run:?}: {reason}")]
    Run {
        /// The run id.
        run: String,
        /// Why.
        reason: String,
    },
    /// An output exists and `--force` was not given.
    #[error("{0} exists; give --force to replace it")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("{path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One run as exported.
#[derive(Clone, Debug, PartialEq)]
pub struct RunExport {
    /// The run id in the session.
    pub run: String,
    /// Its BIDS run number.
    pub number: u32,
    /// Volumes in the series.
    pub volumes: usize,
    /// Sender indices missing from the series (never received).
    pub missing: Vec<u64>,
    /// Trials in the events file.
    pub trials: usize,
    /// The raw BOLD file.
    pub bold: PathBuf,
    /// The trial-level derivatives written.
    pub trial_files: TrialFiles,
}

/// The run ids in order of their first volume, each with its entries (sender index order, the
/// first arrival of a resent index kept).
fn runs(reader: &SessionReader) -> Vec<(String, Vec<usize>)> {
    let mut order: Vec<String> = Vec::new();
    let mut by_run: BTreeMap<String, BTreeMap<u64, usize>> = BTreeMap::new();
    for (i, e) in reader.entries.iter().enumerate() {
        if !by_run.contains_key(&e.run) {
            order.push(e.run.clone());
        }
        by_run.entry(e.run.clone()).or_default().entry(e.index).or_insert(i);
    }
    order.into_iter().map(|r| (r.clone(), by_run[&r].values().copied().collect())).collect()
}

fn check_label(what: &'static str, label: &str) -> Result<(), ExportError> {
    if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ExportError::Label { what, label: label.to_string() });
    }
    Ok(())
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> ExportError {
    ExportError::Write { path: path.to_path_buf(), reason: e.to_string() }
}

/// Makes `path`'s folder, refusing an existing `path` unless `force`.
fn prepare_output(path: &Path, force: bool) -> Result<(), ExportError> {
    if path.exists() && !force {
        return Err(ExportError::Exists(path.to_path_buf()));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| write_error(parent, e))?;
    }
    Ok(())
}

/// Writes `text` to `path` (making its folder), refusing to replace it unless `force`.
fn write_file(path: &Path, text: &str, force: bool) -> Result<(), ExportError> {
    prepare_output(path, force)?;
    std::fs::write(path, text).map_err(|e| write_error(path, e))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// A TSV cell: the number, or `n/a`.
fn cell(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite()).map_or_else(|| "n/a".to_string(), |x| format!("{x}"))
}

/// A stimulus number as a TSV cell, or `n/a`.
fn stim_cell(stim: Option<u64>) -> String {
    stim.map_or_else(|| "n/a".to_string(), |s| s.to_string())
}

/// Each trial once — its live estimate, else its end-of-run one — by onset (the events file's
/// rows and the trial betas' volumes alike).
fn one_per_trial<X>(
    items: impl IntoIterator<Item = X>,
    trial: impl Fn(&X) -> &crate::topic::TrialHeader,
) -> Vec<X> {
    let mut chosen: BTreeMap<u64, X> = BTreeMap::new();
    for x in items {
        let (id, at_run_end) = (trial(&x).trial, trial(&x).at_run_end);
        if chosen.get(&id).is_none_or(|kept| trial(kept).at_run_end && !at_run_end) {
            chosen.insert(id, x);
        }
    }
    let mut rows: Vec<X> = chosen.into_values().collect();
    rows.sort_by(|a, b| trial(a).onset.total_cmp(&trial(b).onset));
    rows
}

/// The motion confounds of a run's volumes in fMRIPrep's layout: the six parameters, their
/// backward differences (`_derivative1`, `n/a` first) and `framewise_displacement` (`n/a`
/// first); a volume without a motion message has `n/a`.
pub fn confounds_tsv(motion: &[Option<&MotionHeader>]) -> String {
    const PARAMS: [&str; 6] = crate::motion::rigid::PARAM_NAMES;
    let value = |m: &MotionHeader, k: usize| m.params()[k];
    let mut header: Vec<String> = PARAMS.iter().map(|p| p.to_string()).collect();
    header.extend(PARAMS.iter().map(|p| format!("{p}_derivative1")));
    header.push("framewise_displacement".into());
    let mut out = header.join("\t") + "\n";
    for (i, m) in motion.iter().enumerate() {
        let prev = if i == 0 { None } else { motion[i - 1] };
        let mut row: Vec<String> = (0..6).map(|k| cell(m.map(|m| value(m, k)))).collect();
        row.extend((0..6).map(|k| cell(m.zip(prev).map(|(m, p)| value(m, k) - value(p, k)))));
        row.push(cell(m.filter(|_| i > 0).map(|m| m.framewise_displacement)));
        out += &(row.join("\t") + "\n");
    }
    out
}

/// The confounds file's column descriptions (units as the live `motion` topic).
fn confounds_json() -> Value {
    let mut cols = serde_json::Map::new();
    for axis in ["x", "y", "z"] {
        cols.insert(format!("trans_{axis}"), json!({"Description": format!("translation along {axis}, live online realignment"), "Units": "mm"}));
        cols.insert(
            format!("rot_{axis}"),
            json!({"Description": format!("rotation about {axis}, live online realignment"), "Units": "rad"}),
        );
    }
    cols.insert(
        "framewise_displacement".into(),
        json!({"Description": "framewise displacement (Power et al. 2012, 50 mm sphere), live", "Units": "mm"}),
    );
    Value::Object(cols)
}

/// A recorded marker that no trial of the live GLM accounts for (its condition was not
/// modelled, or the run ended before it could be estimated).
#[derive(Clone, Debug, PartialEq)]
pub struct UnestimatedMarker {
    /// Onset, s from the run's first volume.
    pub onset: f64,
    /// Duration, s (the live GLM's default where the marker gave none).
    pub duration: f64,
    /// Its condition.
    pub condition: String,
    /// Its stimulus.
    pub stim: Option<u64>,
}

/// The markers recorded with a run's volumes (arrival order) that match no trial of its `betas`
/// messages (by trial number, or by onset for an unnumbered marker).
fn unestimated_markers(reader: &SessionReader, run: &str, betas: &[&BetasHeader]) -> Vec<UnestimatedMarker> {
    // An unsized marker lasts what the live GLM gave it.
    let default_duration = reader.meta["config"]["glm"]["default_duration_s"].as_f64();
    let mut out = Vec::new();
    for (i, e) in reader.entries.iter().enumerate().filter(|(_, e)| e.run == run) {
        for m in &e.markers {
            // Replay reports a marker that does not parse; the export keeps what it can read.
            let Ok(ev) = serde_json::from_value::<crate::glm::events::Event>(m.clone()) else { continue };
            let onset = match ev.onset {
                crate::glm::events::Onset::Relative(t) => t,
                crate::glm::events::Onset::Absolute(t) => t - reader.run_start(i, None),
            };
            let estimated = betas.iter().any(|b| match ev.trial {
                Some(t) => b.trial.trial == t,
                None => (b.trial.onset - onset).abs() < 1e-6,
            });
            if !estimated {
                let duration = ev.duration.or(default_duration).unwrap_or(0.0);
                out.push(UnestimatedMarker { onset, duration, condition: ev.condition, stim: ev.stim });
            }
        }
    }
    out
}

/// The events of a run: one row per trial of its `betas` messages (its live estimate's, else
/// its end-of-run estimate's) and one per recorded marker no trial accounts for (`trial`
/// `n/a`), by onset; with the number of trials.
pub fn events_tsv(betas: &[&BetasHeader], markers: &[UnestimatedMarker]) -> (String, usize) {
    let rows = one_per_trial(betas.iter().copied(), |b| &b.trial);
    let mut lines: Vec<(f64, String)> = rows
        .iter()
        .map(|b| {
            let t = &b.trial;
            (
                t.onset,
                format!("{}\t{}\t{}\t{}\t{}\n", t.onset, t.duration, t.condition, stim_cell(t.stim), t.trial),
            )
        })
        .collect();
    lines.extend(markers.iter().map(|m| {
        let line = format!("{}\t{}\t{}\t{}\tn/a\n", m.onset, m.duration, m.condition, stim_cell(m.stim));
        (m.onset, line)
    }));
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let out =
        lines.into_iter().fold("onset\tduration\ttrial_type\tstimulus\ttrial\n".to_string(), |o, l| o + &l.1);
    (out, rows.len())
}

/// Exports the session folder `dir` into the BIDS dataset `out` (made or added to).
pub fn export(dir: &Path, out: &Path, opts: &ExportOptions) -> Result<Vec<RunExport>, ExportError> {
    check_label("subject", &opts.subject)?;
    check_label("task", &opts.task)?;
    if let Some(s) = &opts.session {
        check_label("session", s)?;
    }
    let reader = SessionReader::open(dir)?;
    if reader.entries.is_empty() {
        return Err(ExportError::Empty(dir.to_path_buf()));
    }
    let messages = read_messages(dir)?;
    let session = SessionExport::new(dir, out, opts, &reader, &messages);
    let mut exported = Vec::new();
    for (k, (run, idx)) in runs(&reader).into_iter().enumerate() {
        exported.push(session.export_run(run, &idx, opts.first_run + k as u32)?);
    }
    session.write_dataset_files()?;
    Ok(exported)
}

/// What every run of one export shares: the session read, the options and where files go.
struct SessionExport<'a> {
    dir: &'a Path,
    out: &'a Path,
    opts: &'a ExportOptions,
    reader: &'a SessionReader,
    messages: &'a [LoggedMessage],
    motion: Vec<MotionHeader>,
    betas: Vec<BetasHeader>,
    /// `sub-…`.
    sub: String,
    /// `ses-…`, if any.
    ses: Option<String>,
    /// `sub-…[/ses-…]/func`, below the dataset and below its derivatives.
    rel: PathBuf,
    /// `OUT/derivatives/mirage-rt`.
    deriv: PathBuf,
    /// The session's last status as a latency summary, written beside each run.
    latency: Option<Value>,
}

/// One run being exported: its volumes in sender index order, their motion and TR, and where
/// its files go.
struct PlannedRun<'a> {
    run: String,
    /// `sub-…[_ses-…]_task-…_run-…`.
    stem: String,
    entries: Vec<&'a IndexEntry>,
    /// Each volume's motion message, if it has one.
    motion: Vec<Option<&'a MotionHeader>>,
    tr: f64,
    /// The run's raw folder (`OUT/sub-…/func`) and derivatives folder.
    raw_dir: PathBuf,
    deriv_dir: PathBuf,
}

impl PlannedRun<'_> {
    fn raw_file(&self, suffix: &str) -> PathBuf {
        self.raw_dir.join(format!("{}_{suffix}", self.stem))
    }

    fn deriv_file(&self, suffix: &str) -> PathBuf {
        self.deriv_dir.join(format!("{}_{suffix}", self.stem))
    }
}

impl<'a> SessionExport<'a> {
    fn new(
        dir: &'a Path,
        out: &'a Path,
        opts: &'a ExportOptions,
        reader: &'a SessionReader,
        messages: &'a [LoggedMessage],
    ) -> Self {
        let sub = format!("sub-{}", opts.subject);
        let ses = opts.session.as_ref().map(|s| format!("ses-{s}"));
        let rel: PathBuf =
            [Some(sub.clone()), ses.clone()].into_iter().flatten().collect::<PathBuf>().join("func");
        SessionExport {
            dir,
            out,
            opts,
            reader,
            messages,
            motion: typed(messages),
            betas: typed(messages),
            sub,
            ses,
            rel,
            deriv: out.join("derivatives").join("mirage-rt"),
            latency: latency_summary(messages),
        }
    }

    /// Exports one run as BIDS run `number`: its series, sidecars and events, and its
    /// derivatives.
    fn export_run(&self, run: String, idx: &[usize], number: u32) -> Result<RunExport, ExportError> {
        let r = self.plan_run(run, idx, number)?;
        let force = self.opts.force;
        let (first, last) = (r.entries[0].index, r.entries[r.entries.len() - 1].index);
        let present: std::collections::BTreeSet<u64> = r.entries.iter().map(|e| e.index).collect();
        let missing: Vec<u64> = (first..=last).filter(|i| !present.contains(i)).collect();

        // The series as received and, where motion ran, as it realigned them.
        let bold = r.raw_file("bold.nii.gz");
        let realigned =
            r.motion.iter().any(Option::is_some).then(|| r.deriv_file("desc-realigned_bold.nii.gz"));
        write_series(self.reader, idx, &r.motion, (&bold, realigned.as_deref()), r.tr, force)?;
        write_file(&r.raw_file("bold.json"), &pretty(&self.bold_sidecar(&r, &missing)), force)?;
        let run_betas: Vec<&BetasHeader> = self.betas.iter().filter(|b| b.trial.run == r.run).collect();
        let markers = unestimated_markers(self.reader, &r.run, &run_betas);
        let (events, trials) = events_tsv(&run_betas, &markers);
        let events_path = r.raw_file("events.tsv");
        write_file(&events_path, &events, force)?;

        // Derivatives: what ran live.
        if realigned.is_some() {
            write_file(
                &r.deriv_file("desc-realigned_bold.json"),
                &pretty(&self.realigned_sidecar(&r)),
                force,
            )?;
        }
        let confounds_path = r.deriv_file("desc-confounds_timeseries.tsv");
        write_file(&confounds_path, &confounds_tsv(&r.motion), force)?;
        write_file(&r.deriv_file("desc-confounds_timeseries.json"), &pretty(&confounds_json()), force)?;
        if let Some(summary) = &self.latency {
            write_file(&r.deriv_file("desc-latency_summary.json"), &pretty(summary), force)?;
        }
        // Without motion the live GLM had no motion regressors.
        let design_inputs = match realigned.as_deref() {
            Some(series) => (series, events_path.as_path(), Some(confounds_path.as_path())),
            None => (bold.as_path(), events_path.as_path(), None),
        };
        let trial_files = self.write_trial_files(&r, design_inputs)?;
        Ok(RunExport { run: r.run, number, volumes: idx.len(), missing, trials, bold, trial_files })
    }

    /// Run `run`'s volumes (entries `idx`) with their motion, TR and file names; refuses a
    /// run whose grid changes or that has no repetition time.
    fn plan_run(&self, run: String, idx: &[usize], number: u32) -> Result<PlannedRun<'_>, ExportError> {
        let reader = self.reader;
        let stem = [
            Some(self.sub.clone()),
            self.ses.clone(),
            Some(format!("task-{}", self.opts.task)),
            Some(format!("run-{number}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("_");
        let entries: Vec<&IndexEntry> = idx.iter().map(|&i| &reader.entries[i]).collect();
        let first = entries[0];
        if let Some(e) = entries.iter().find(|e| e.dims != first.dims) {
            return Err(ExportError::Run {
                run,
                reason: format!("its grid changes from {:?} to {:?}", first.dims, e.dims),
            });
        }
        let tr = entries.iter().find_map(|e| e.tr).or_else(|| reader.meta["config"]["ingest"]["tr"].as_f64());
        let Some(tr) = tr.filter(|t| *t > 0.0) else {
            return Err(ExportError::Run {
                run,
                reason: "no repetition time in its headers or ingest.tr".into(),
            });
        };
        let by_index: BTreeMap<u64, &MotionHeader> =
            self.motion.iter().filter(|m| m.run == run).map(|m| (m.index, m)).collect();
        let motion = entries.iter().map(|e| by_index.get(&e.index).copied()).collect();
        let (raw_dir, deriv_dir) = (self.out.join(&self.rel), self.deriv.join(&self.rel));
        Ok(PlannedRun { run, stem, entries, motion, tr, raw_dir, deriv_dir })
    }

    /// The raw series' sidecar: TR and task, and what the daemon knew of the run's volumes.
    fn bold_sidecar(&self, r: &PlannedRun, missing: &[u64]) -> Value {
        let time = |e: &crate::io::session::IndexEntry| e.acq_time.unwrap_or(e.recv_time);
        let t0 = time(r.entries[0]);
        json!({
            "RepetitionTime": r.tr,
            "TaskName": self.opts.task,
            "MirageRunId": r.run,
            "MirageFirstVolumeIndex": r.entries[0].index,
            "MirageMissingVolumes": missing,
            "MirageReceivedDtype": received_dtypes(&r.entries),
            "MirageStoredPrecision": "float32: the daemon keeps samples as float32, so float64 and 32-bit integer \
                                      values are as received where float32 holds them (integers up to 2^24)",
            "MirageTimeSource": "seconds from the run's first volume: acquisition times from the sender's headers \
                                 where sent, else receive times (daemon clock)",
            "MirageVolumeTimes": r.entries.iter().map(|e| time(e) - t0).collect::<Vec<_>>(),
            "MirageFirstVolumeTime": t0,
        })
    }

    /// The realigned series' sidecar: how it was made, from which raw file.
    fn realigned_sidecar(&self, r: &PlannedRun) -> Value {
        json!({
            "RepetitionTime": r.tr,
            "TaskName": self.opts.task,
            "Description": "the live online realignment reproduced: each volume resliced (trilinear) onto its \
                            reference volume's grid through the matrix its motion message recorded; volumes \
                            before the reference, or without a message, as received",
            "Sources": [format!("bids:raw:{}", self.rel.join(format!("{}_bold.nii.gz", r.stem)).display())],
        })
    }

    /// The run's trial betas, mask, ROI time series and decode results and, where it has
    /// betas, the GLM's design over `(series, events, confounds)`.
    fn write_trial_files(
        &self,
        r: &PlannedRun,
        design_inputs: (&Path, &Path, Option<&Path>),
    ) -> Result<TrialFiles, ExportError> {
        let reference = r.motion.iter().flatten().find_map(|m| m.reference_index);
        let grid = r.entries.iter().find(|e| Some(e.index) == reference).unwrap_or(&r.entries[0]);
        let indices: Vec<u64> = r.entries.iter().map(|e| e.index).collect();
        let files = trials::RunFiles {
            session: self.dir,
            run: &r.run,
            dir: &r.deriv_dir,
            stem: &r.stem,
            grid: (grid.dims, grid.affine),
            indices: &indices,
            force: self.opts.force,
        };
        let trial_files = trials::write(&files, self.messages)?;
        if trial_files.betas > 0 {
            let glm: crate::glm::GlmConfig =
                serde_json::from_value(self.reader.meta["config"]["glm"].clone()).unwrap_or_default();
            trials::write_design(&files, design_inputs, &glm, r.tr)?;
        }
        Ok(trial_files)
    }

    /// The dataset's files: made when absent, added to (participants) when present; the
    /// derivatives' description always (it carries the configuration of this export's session).
    fn write_dataset_files(&self) -> Result<(), ExportError> {
        let (out, meta) = (self.out, &self.reader.meta);
        let version = meta["mirage_version"].as_str().unwrap_or("unknown");
        let commit = meta["mirage_commit"].as_str().unwrap_or("unknown");
        let generated = json!([{"Name": "mirage-rt", "Version": version, "CodeURL": "https://github.com/mirage-rt/mirage-rt", "Commit": commit}]);
        let raw = json!({
            "Name": "mirage-rt session export",
            "BIDSVersion": "1.8.0",
            "DatasetType": "raw",
            "GeneratedBy": generated,
        });
        write_if_absent(&out.join("dataset_description.json"), &pretty(&raw))?;
        write_if_absent(&out.join("README"), README)?;
        let columns = json!({
            "trial_type": {"Description": "the trial's condition as the live GLM modelled it (e.g. seen, imagery)"},
            "stimulus": {"Description": "the stimulus number the trial's event named (n/a: none)"},
            "trial": {"Description": "the trial's number in the run, as in the live betas and decode messages (n/a: a recorded marker the live GLM estimated no trial for)"},
        });
        write_if_absent(&out.join(format!("task-{}_events.json", self.opts.task)), &pretty(&columns))?;
        add_participant(&out.join("participants.tsv"), &self.sub)?;
        let mut gen = generated.clone();
        gen[0]["Configuration"] = meta["config"].clone();
        let derived = json!({
            "Name": "mirage-rt live derivatives",
            "BIDSVersion": "1.8.0",
            "DatasetType": "derivative",
            "GeneratedBy": gen,
            "SourceDatasets": [{"URL": "../../"}],
        });
        write_file(&self.deriv.join("dataset_description.json"), &pretty(&derived), true)
    }
}

/// The session's last status message as a latency summary: per-stage percentiles and counts,
/// read as the status topic's own type so that a field can only be one the daemon sends.
fn latency_summary(messages: &[LoggedMessage]) -> Option<Value> {
    let m = messages.iter().rev().find(|m| m.topic == crate::metrics::MetricsSnapshot::NAME)?;
    let s: crate::topic::StatusHeader = serde_json::from_value(m.header.clone())
        .map_err(|e| tracing::warn!("export: the last status message does not read: {e}"))
        .ok()?;
    Some(json!({
        "Description": "the session's last status message: per-stage latency percentiles (ms; \
                        stage_latency_ms includes queue wait, end_to_end_ms is receipt to publish, \
                        acquisition_to_publish_ms the sender's acquisition stamp to publish) and counts",
        "stages": s.stages,
        "stage_latency_ms": s.stage_latency_ms,
        "end_to_end_ms": s.end_to_end_ms,
        "acquisition_to_publish_ms": s.acquisition_to_publish_ms,
        "trial_decode_ms": s.trial_decode_ms,
        "received": s.received,
        "recorded": s.recorded,
        "published": s.published,
        "decoded": s.decoded,
        "errors": s.errors,
    }))
}

/// The dataset's README.
const README: &str = "Real-time fMRI sessions recorded by mirage-rt (a closed-loop decoding daemon) and \
exported with `mirage export`. Each run's BOLD series is as the daemon received it, in sender \
index order; its events are the trials the live GLM estimated. derivatives/mirage-rt/ holds what \
ran live: the realigned series, the online realignment's motion confounds (fMRIPrep's column \
names), the trial betas with their GLM mask, the ROI time series, the decode results and the \
latency summary, with the version, commit and configuration that made them in its dataset_description.\n";

/// Writes a run's series as received to `raw` and, when given, as the live motion stage
/// realigned it to `realigned` (each volume resliced onto its reference volume's grid through
/// the matrix its message recorded), reading each volume once.
fn write_series(
    reader: &SessionReader,
    idx: &[usize],
    motion: &[Option<&MotionHeader>],
    (raw, realigned): (&Path, Option<&Path>),
    tr: f64,
    force: bool,
) -> Result<(), ExportError> {
    let entries: Vec<&IndexEntry> = idx.iter().map(|&i| &reader.entries[i]).collect();
    let grid_of = |reference: Option<u64>| {
        let e = reference.and_then(|k| entries.iter().find(|e| e.index == k)).unwrap_or(&entries[0]);
        (e.dims, e.affine)
    };
    let open = |path: &Path, (dims, affine): ([usize; 3], crate::volume::Affine), dtype: Dtype| {
        prepare_output(path, force)?;
        NiftiWriter::create_as(path, dims, idx.len(), &affine, Some(tr), dtype)
            .map_err(|e| write_error(path, e))
    };
    let mut raw_out = open(raw, grid_of(None), raw_dtype(&entries))?;
    let mut realigned_out = match realigned {
        Some(path) => {
            let reference = motion.iter().flatten().find_map(|m| m.reference_index);
            Some((path, open(path, grid_of(reference), Dtype::F32)?))
        }
        None => None,
    };
    for (&i, m) in idx.iter().zip(motion) {
        let v = reader.volume(i)?;
        raw_out.write_volume(&v.data).map_err(|e| write_error(raw, e))?;
        let Some((path, out)) = realigned_out.as_mut() else { continue };
        let written = match m {
            Some(m) if m.reference_index != Some(v.index) => {
                let (dims, affine) = grid_of(m.reference_index);
                let moved = crate::motion::reslice_onto(&v, dims, &affine, &m.matrix)
                    .map_err(|e| write_error(path, e))?;
                out.write_volume(&moved.data)
            }
            _ => out.write_volume(&v.data),
        };
        written.map_err(|e| write_error(path, e))?;
    }
    raw_out.finish().map_err(|e| write_error(raw, e))?;
    match realigned_out {
        Some((path, out)) => out.finish().map_err(|e| write_error(path, e)),
        None => Ok(()),
    }
}

/// The sample type a run's raw series is written in: the one its volumes arrived in when they
/// all agree, else float32.
fn raw_dtype(entries: &[&IndexEntry]) -> Dtype {
    match entries.first().map(|e| e.dtype) {
        Some(d) if entries.iter().all(|e| e.dtype == d) => d,
        _ => Dtype::F32,
    }
}

/// The sample type(s) a run's volumes arrived in: one name, or the list when they differ.
fn received_dtypes(entries: &[&IndexEntry]) -> Value {
    let names: std::collections::BTreeSet<&str> = entries.iter().map(|e| e.dtype.name()).collect();
    match names.len() {
        1 => json!(names.into_iter().next()),
        _ => json!(names),
    }
}

/// Every message of topic `T` that parses as `T`.
fn typed<T: Topic + serde::de::DeserializeOwned>(messages: &[LoggedMessage]) -> Vec<T> {
    messages.iter().filter_map(|m| crate::topic::read::<T>(&m.topic, &m.header).ok()).collect()
}

fn write_if_absent(path: &Path, text: &str) -> Result<(), ExportError> {
    if path.exists() {
        return Ok(());
    }
    write_file(path, text, false)
}

/// Adds `sub` to `participants.tsv` (made with its header when absent).
fn add_participant(path: &Path, sub: &str) -> Result<(), ExportError> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| "participant_id\n".to_string());
    // Ragged: others add rows to this table by hand, and so did earlier exports of ours.
    let table = tsv::parse_as(&text, &path.display().to_string(), tsv::Shape::Ragged)
        .map_err(|e| write_error(path, e.detail()))?;
    if table.rows.iter().any(|r| r.get(0) == Some(sub)) {
        return Ok(());
    }
    write_file(path, &format!("{text}{sub}\n"), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::session::SessionWriter;
    use crate::volume::{Volume, IDENTITY_AFFINE};

    fn vol(run: &str, index: u64) -> Volume {
        Volume {
            data: (0..24).map(|i| (i * 7 + index as usize) as f32 * 0.5).collect(),
            dims: [2, 3, 4],
            affine: IDENTITY_AFFINE,
            index,
            run: run.into(),
            tr: Some(2.0),
            acq_time: None,
            recv_time: index as f64,
            dtype: Dtype::F32,
        }
    }

    fn opts() -> ExportOptions {
        ExportOptions {
            subject: "01".into(),
            session: None,
            task: "imagery".into(),
            first_run: 1,
            force: false,
        }
    }

    #[test]
    fn each_run_is_one_bids_run_in_index_order_and_nothing_is_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &json!({"mirage_version": "0.1.0"})).unwrap();
        // Run a: 0, 2, 1, a resend of 1, then 4 (3 never came); run b: 0, 1.
        for (seq, (run, i)) in
            [("a", 0), ("a", 2), ("a", 1), ("a", 1), ("b", 0), ("a", 4), ("b", 1)].into_iter().enumerate()
        {
            w.append(seq as u64, &vol(run, i), Value::Null, &[]).unwrap();
        }
        drop(w);
        let out = dir.path().join("bids");
        let runs = export(&s, &out, &opts()).unwrap();
        let summary: Vec<(&str, u32, usize, Vec<u64>)> =
            runs.iter().map(|r| (r.run.as_str(), r.number, r.volumes, r.missing.clone())).collect();
        assert_eq!(summary, [("a", 1, 4, vec![3]), ("b", 2, 2, vec![])]);
        let img = crate::io::nifti::read_nifti(&runs[0].bold, 1 << 20).unwrap();
        let expect: Vec<Vec<f32>> = [0, 1, 2, 4].iter().map(|&i| vol("a", i).data).collect();
        assert_eq!(img.volumes, expect);
        assert_eq!(img.header.tr_seconds(), Some(2.0));
        assert!(out.join("sub-01/func/sub-01_task-imagery_run-2_bold.json").exists());
        assert_eq!(
            std::fs::read_to_string(out.join("participants.tsv")).unwrap(),
            "participant_id\nsub-01\n"
        );

        assert!(matches!(export(&s, &out, &opts()), Err(ExportError::Exists(p)) if p == runs[0].bold));
        export(&s, &out, &ExportOptions { force: true, ..opts() }).unwrap();
        export(&s, &out, &ExportOptions { subject: "02".into(), ..opts() }).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("participants.tsv")).unwrap(),
            "participant_id\nsub-01\nsub-02\n"
        );
        assert!(matches!(
            export(&s, &out, &ExportOptions { task: "a_b".into(), ..opts() }),
            Err(ExportError::Label { .. })
        ));
    }

    #[test]
    fn the_raw_series_keeps_the_integer_type_it_arrived_in() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &json!({})).unwrap();
        let int16 = |run: &str, i: u64, dtype: Dtype| Volume {
            data: (0..24).map(|k| (k as f32 - 12.0) * 1000.0 + i as f32).collect(),
            dtype,
            ..vol(run, i)
        };
        // Run a arrived as int16; run b mixed int16 and float64 volumes; run c float64.
        let sent = [
            ("a", 0, Dtype::I16),
            ("a", 1, Dtype::I16),
            ("b", 0, Dtype::I16),
            ("b", 1, Dtype::F64),
            ("c", 0, Dtype::F64),
        ];
        for (seq, &(run, i, dtype)) in sent.iter().enumerate() {
            w.append(seq as u64, &int16(run, i, dtype), Value::Null, &[]).unwrap();
        }
        drop(w);
        let runs = export(&s, &dir.path().join("bids"), &opts()).unwrap();
        let a = crate::io::nifti::read_nifti(&runs[0].bold, 1 << 20).unwrap();
        assert_eq!(a.header.dtype, Dtype::I16);
        assert_eq!(a.volumes, [int16("a", 0, Dtype::I16).data, int16("a", 1, Dtype::I16).data]);
        let b = crate::io::nifti::read_nifti(&runs[1].bold, 1 << 20).unwrap();
        assert_eq!(b.header.dtype, Dtype::F32);
        let sidecar: Value = serde_json::from_slice(
            &std::fs::read(runs[1].bold.with_extension("").with_extension("json")).unwrap(),
        )
        .unwrap();
        assert_eq!(sidecar["MirageReceivedDtype"], json!(["float64", "int16"]));
        let c = crate::io::nifti::read_nifti(&runs[2].bold, 1 << 20).unwrap();
        assert_eq!((c.header.dtype, &c.volumes[0]), (Dtype::F64, &int16("c", 0, Dtype::F64).data));
    }

    #[test]
    fn markers_no_trial_accounts_for_are_events_too() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let config = json!({"config": {"glm": {"default_duration_s": 1.5}}});
        let mut w = SessionWriter::create(&s, &config).unwrap();
        let marker = |onset: Value, duration: Value| json!({"trial": null, "stim": 3, "condition": "rest", "onset": onset, "duration": duration});
        // Volume 2 arrives at t = 2 s (TR 2 s, index 0 at t = 0): an absolute marker at 5 s is
        // 5 s into the run.
        w.append(0, &vol("a", 0), Value::Null, &[]).unwrap();
        w.append(1, &vol("a", 1), Value::Null, &[marker(json!({"Relative": 3.0}), json!(4.0))]).unwrap();
        w.append(2, &vol("a", 2), Value::Null, &[marker(json!({"Absolute": 5.0}), Value::Null)]).unwrap();
        drop(w);
        let out = dir.path().join("bids");
        let runs = export(&s, &out, &opts()).unwrap();
        assert_eq!(runs[0].trials, 0);
        let events =
            std::fs::read_to_string(out.join("sub-01/func/sub-01_task-imagery_run-1_events.tsv")).unwrap();
        assert_eq!(
            events,
            "onset\tduration\ttrial_type\tstimulus\ttrial\n3\t4\trest\t3\tn/a\n5\t1.5\trest\t3\tn/a\n"
        );
    }

    #[test]
    fn confounds_follow_fmripreps_columns_with_backward_differences() {
        let m = |x: f64, fd: f64| MotionHeader {
            trans_x: x,
            framewise_displacement: fd,
            ..crate::topic::MotionHeader::sample()
        };
        let (a, b) = (m(0.0, 0.0), m(0.5, 0.7));
        let tsv = confounds_tsv(&[Some(&a), Some(&b), None]);
        let table = crate::io::tsv::parse(&tsv, "confounds").unwrap();
        let lines: Vec<Vec<&str>> = std::iter::once(&table.header)
            .chain(table.rows.iter().map(|r| &r.cells))
            .map(|cells| cells.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(lines[0][..2], ["trans_x", "trans_y"]);
        assert_eq!(lines[0][6], "trans_x_derivative1");
        assert_eq!(lines[0][12], "framewise_displacement");
        assert_eq!((lines[1][0], lines[1][6], lines[1][12]), ("0", "n/a", "n/a"));
        assert_eq!((lines[2][0], lines[2][6], lines[2][12]), ("0.5", "0.5", "0.7"));
        assert!(lines[3].iter().all(|c| *c == "n/a"));
    }
}
