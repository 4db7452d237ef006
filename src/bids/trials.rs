//! One run's trial-level derivatives from the session's recorded messages: the live trial betas
//! as a 4-D NIfTI with a TSV of trials, the GLM mask, the ROI time series and the decode
//! results (a TSV of top matches per trial and each head's outputs as `.npy`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{cell, one_per_trial, prepare_output, stim_cell, write_error, write_file, ExportError};
use crate::io::nifti::NiftiWriter;
use crate::io::session::{read_payload, LoggedMessage};
use crate::topic::{BetasHeader, DecodeHeader, RoiHeader, Topic};
use crate::volume::{f32_from_le_bytes, u32_from_le_bytes, Affine, Dtype};

/// What the trial-level export of one run wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrialFiles {
    /// Trials in the betas file (0: none recorded with their payloads).
    pub betas: usize,
    /// Voxels in the GLM mask.
    pub mask_voxels: usize,
    /// Decoded trials in the results file.
    pub decodes: usize,
    /// Heads written as arrays.
    pub heads: Vec<String>,
}

/// Where and how to write one run's files.
pub(super) struct RunFiles<'a> {
    /// The session folder (for `payloads.bin`).
    pub session: &'a Path,
    /// The run id in the session.
    pub run: &'a str,
    /// The derivative folder of the run (`derivatives/mirage-rt/sub-…/func`).
    pub dir: &'a Path,
    /// The file name stem (`sub-…_task-…_run-…`).
    pub stem: &'a str,
    /// The grid the GLM ran on (the realigned series').
    pub grid: ([usize; 3], Affine),
    /// The sender indices of the run's exported volumes, in series order.
    pub indices: &'a [u64],
    /// Replace existing files.
    pub force: bool,
}

impl RunFiles<'_> {
    fn path(&self, desc: &str, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}_desc-{desc}_{suffix}", self.stem))
    }

    fn run_error(&self, reason: String) -> ExportError {
        ExportError::Run { run: self.run.to_string(), reason }
    }
}

/// The run's messages of topic `T`, parsed, with their log lines.
fn of_run<'m, T: Topic + serde::de::DeserializeOwned>(
    messages: &'m [LoggedMessage],
    run_of: impl Fn(&T) -> &str,
    run: &str,
) -> Vec<(T, &'m LoggedMessage)> {
    messages
        .iter()
        .filter_map(|m| crate::topic::read::<T>(&m.topic, &m.header).ok().map(|h| (h, m)))
        .filter(|(h, _)| run_of(h) == run)
        .collect()
}

/// Writes the run's trial betas, mask, ROI time series and decode results.
pub(super) fn write(f: &RunFiles, messages: &[LoggedMessage]) -> Result<TrialFiles, ExportError> {
    let mut out = TrialFiles::default();
    write_betas(f, messages, &mut out)?;
    write_roi(f, messages)?;
    write_decodes(f, messages, &mut out)?;
    Ok(out)
}

/// The trial betas (the live estimate of each trial, else its end-of-run one), by onset, as a
/// 4-D NIfTI on the GLM's grid (0 outside the mask), their TSV and the mask.
fn write_betas(f: &RunFiles, messages: &[LoggedMessage], out: &mut TrialFiles) -> Result<(), ExportError> {
    let recorded = of_run::<BetasHeader>(messages, |h| &h.trial.run, f.run)
        .into_iter()
        .filter(|(_, m)| !m.data.is_empty());
    let rows = one_per_trial(recorded, |(h, _)| &h.trial);
    if rows.is_empty() {
        return Ok(());
    }
    let (dims, affine) = f.grid;
    let n: usize = dims.iter().product();
    let mut maps = Vec::with_capacity(rows.len());
    let mut mask = vec![0.0f32; n];
    for (h, m) in &rows {
        let bad = |why: &str| f.run_error(format!("trial {}: recorded betas {why}", h.trial.trial));
        if h.shape != dims {
            return Err(bad(&format!("are on a {:?} grid, the series on {dims:?}", h.shape)));
        }
        let betas = read_payload(f.session, m, "betas")?
            .map(|b| f32_from_le_bytes(&b))
            .ok_or_else(|| bad("lack `betas`"))?;
        let voxels = read_payload(f.session, m, "voxels")?
            .map(|b| u32_from_le_bytes(&b))
            .ok_or_else(|| bad("lack `voxels`"))?;
        if betas.len() != voxels.len() {
            return Err(bad(&format!("hold {} values for {} voxels", betas.len(), voxels.len())));
        }
        let mut map = vec![0.0f32; n];
        for (&v, &b) in voxels.iter().zip(&betas) {
            let v = v as usize;
            if v >= n {
                return Err(bad(&format!("name voxel {v} of {n}")));
            }
            map[v] = b;
            mask[v] = 1.0;
        }
        maps.push(map);
    }
    let nifti = |path: &Path, volumes: &[Vec<f32>], dtype: Dtype| -> Result<(), ExportError> {
        prepare_output(path, f.force)?;
        let mut w = NiftiWriter::create_as(path, dims, volumes.len(), &affine, None, dtype)
            .map_err(|e| write_error(path, e))?;
        for v in volumes {
            w.write_volume(v).map_err(|e| write_error(path, e))?;
        }
        w.finish().map_err(|e| write_error(path, e))
    };
    nifti(&f.path("trials", "betas.nii.gz"), &maps, Dtype::F32)?;
    out.mask_voxels = mask.iter().filter(|&&m| m > 0.0).count();
    nifti(&f.path("glm", "mask.nii.gz"), &[mask], Dtype::U8)?;
    let mut tsv = "volume\ttrial\tonset\tduration\ttrial_type\tstimulus\testimate\tindex\n".to_string();
    for (k, (h, _)) in rows.iter().enumerate() {
        let t = &h.trial;
        let estimate = if t.at_run_end { "run_end" } else { "live" };
        tsv += &format!(
            "{k}\t{}\t{}\t{}\t{}\t{}\t{estimate}\t{}\n",
            t.trial,
            t.onset,
            t.duration,
            t.condition,
            stim_cell(t.stim),
            h.index
        );
    }
    write_file(&f.path("trials", "betas.tsv"), &tsv, f.force)?;
    out.betas = rows.len();
    Ok(())
}

/// Each ROI's mean signal and percent signal change per volume of the series, with a feedback
/// recipe each recipe ROI's own value (`NAME_feedback`) and the value shown (`feedback`); `n/a`
/// where the volume had no reading or no value.
fn write_roi(f: &RunFiles, messages: &[LoggedMessage]) -> Result<(), ExportError> {
    let readings: BTreeMap<u64, RoiHeader> =
        of_run::<RoiHeader>(messages, |h| &h.run, f.run).into_iter().map(|(h, _)| (h.index, h)).collect();
    let Some(first) = readings.values().next() else { return Ok(()) };
    let names: Vec<String> = first.rois.iter().map(|r| r.name.clone()).collect();
    let feedback = readings.values().any(|h| h.feedback.is_some());
    let own: Vec<bool> = names
        .iter()
        .map(|n| readings.values().any(|h| h.rois.iter().any(|r| &r.name == n && r.feedback.is_some())))
        .collect();
    let mut columns: Vec<String> = names
        .iter()
        .zip(&own)
        .flat_map(|(n, &own)| {
            let mut c = vec![format!("{n}_mean"), format!("{n}_psc")];
            c.extend(own.then(|| format!("{n}_feedback")));
            c
        })
        .collect();
    if feedback {
        columns.push("feedback".into());
    }
    let mut tsv = columns.join("\t");
    tsv.push('\n');
    for index in f.indices {
        let mut row: Vec<String> = names
            .iter()
            .zip(&own)
            .flat_map(|(name, &own)| {
                let r = readings.get(index).and_then(|h| h.rois.iter().find(|r| &r.name == name));
                let mut c = vec![cell(r.and_then(|r| r.mean)), cell(r.and_then(|r| r.psc))];
                c.extend(own.then(|| cell(r.and_then(|r| r.feedback))));
                c
            })
            .collect();
        if feedback {
            row.push(cell(readings.get(index).and_then(|h| h.feedback)));
        }
        tsv += &(row.join("\t") + "\n");
    }
    write_file(&f.path("roi", "timeseries.tsv"), &tsv, f.force)
}

/// A BIDS label from a head's name (letters and digits only).
fn label(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).collect()
}

/// The decoded trials in publishing order: a TSV of each trial's top matches and timing, and
/// each head's outputs stacked as `…_desc-HEAD_decoding.npy` (`[trials, shape…]`).
fn write_decodes(f: &RunFiles, messages: &[LoggedMessage], out: &mut TrialFiles) -> Result<(), ExportError> {
    let decodes = of_run::<DecodeHeader>(messages, |h| &h.trial.run, f.run);
    if decodes.is_empty() {
        return Ok(());
    }
    let k = decodes.iter().map(|(h, _)| h.top.len()).max().unwrap_or(0);
    let mut cols: Vec<String> = [
        "trial",
        "onset",
        "trial_type",
        "stimulus",
        "estimate",
        "alignment",
        "device",
        "latency_ms",
        "over_budget",
    ]
    .map(String::from)
    .to_vec();
    for r in 1..=k {
        cols.extend([format!("top{r}_id"), format!("top{r}_label"), format!("top{r}_score")]);
    }
    let mut tsv = cols.join("\t") + "\n";
    // Per head: its shape and, per decoded trial, its output (NaN where a trial lacks it).
    type Outputs = (Vec<usize>, Vec<Option<Vec<f32>>>);
    let mut heads: BTreeMap<String, Outputs> = BTreeMap::new();
    for (i, (h, m)) in decodes.iter().enumerate() {
        let t = &h.trial;
        let mut row = vec![
            t.trial.to_string(),
            t.onset.to_string(),
            t.condition.clone(),
            stim_cell(t.stim),
            if t.at_run_end { "run_end" } else { "live" }.to_string(),
            h.alignment.clone(),
            h.device.clone(),
            cell(Some(h.latency_ms)),
            h.over_budget.to_string(),
        ];
        for r in 0..k {
            match h.top.get(r) {
                Some(m) => row.extend([m.id.clone(), m.label.clone(), cell(Some(m.score))]),
                None => row.extend(["n/a".into(), "n/a".into(), "n/a".into()]),
            }
        }
        tsv += &(row.join("\t") + "\n");
        for head in &h.heads {
            let Some(bytes) = read_payload(f.session, m, &head.name)? else { continue };
            let values = f32_from_le_bytes(&bytes);
            if values.len() != head.shape.iter().product::<usize>() {
                return Err(f.run_error(format!(
                    "trial {}: head {:?} recorded {} values for shape {:?}",
                    t.trial,
                    head.name,
                    values.len(),
                    head.shape
                )));
            }
            let entry = heads.entry(head.name.clone()).or_insert_with(|| (head.shape.clone(), vec![None; i]));
            if entry.0 != head.shape {
                return Err(f.run_error(format!("head {:?} changes shape between trials", head.name)));
            }
            entry.1.resize(i, None);
            entry.1.push(Some(values));
        }
    }
    write_file(&f.path("decode", "results.tsv"), &tsv, f.force)?;
    for (name, (shape, rows)) in &heads {
        let size: usize = shape.iter().product();
        let mut values = Vec::with_capacity(size * decodes.len());
        for i in 0..decodes.len() {
            match rows.get(i).and_then(Option::as_ref) {
                Some(v) => values.extend_from_slice(v),
                None => values.extend(std::iter::repeat_n(f32::NAN, size)),
            }
        }
        let path = f.path(&label(name), "decoding.npy");
        prepare_output(&path, f.force)?;
        let mut full = vec![decodes.len()];
        full.extend(shape);
        crate::io::npy::write_npy(&path, &full, &values).map_err(|e| write_error(&path, e))?;
        out.heads.push(name.clone());
    }
    out.decodes = decodes.len();
    Ok(())
}

/// The run's GLM design as the live GLM built it: the online estimator run offline
/// (`glm::offline`, as `mirage glm`) over the exported `series`, `events` and motion `confounds`
/// (where motion ran) on the exported mask, with the session's GLM settings; its unwhitened
/// design written as `…_desc-glm_design.tsv` (a column per regressor, a row per volume).
pub(super) fn write_design(
    f: &RunFiles,
    (series, events, confounds): (&Path, &Path, Option<&Path>),
    glm: &crate::glm::GlmConfig,
    tr: f64,
) -> Result<(), ExportError> {
    use crate::glm::offline::{fit_series, DesignSource, FitOptions};
    let opts = FitOptions {
        tr: Some(tr),
        design: DesignSource::Events(events.to_path_buf()),
        mask: Some(f.path("glm", "mask.nii.gz")),
        ar1: false,
        highpass: None,
        motion: confounds.map(Path::to_path_buf),
    };
    let fitted = fit_series(series, &opts, glm, usize::MAX)
        .map_err(|e| f.run_error(format!("rebuilding the GLM design: {e:#}")))?;
    write_file(&f.path("glm", "design.tsv"), &crate::glm::offline::design_tsv(&fitted.fit), f.force)
}
