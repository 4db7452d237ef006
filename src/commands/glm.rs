//! `mirage glm`: the online GLM run offline over a 4-D NIfTI, volume by volume, so that its
//! numbers are the online stage's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::glm::design::read_design;
use crate::glm::{Drift, FullFit, GlmConfig, GlmEstimator};
use crate::io::nifti::{NiftiReader, NiftiWriter};
use crate::motion::rigid::{RigidParams, PARAM_NAMES};
use crate::motion::MotionEstimate;
use crate::volume::{sanitize_run_id, Volume};

/// Where the regressors come from.
#[derive(Clone, Debug)]
pub enum DesignSource {
    /// A BIDS events file: HRF-convolved trial (or condition) regressors.
    Events(PathBuf),
    /// A design matrix file (plain TSV or FSL VEST).
    Matrix(PathBuf),
}

/// Offline fit options.
#[derive(Clone, Debug)]
pub struct GlmOptions {
    /// Repetition time, s (overrides the header).
    pub tr: Option<f64>,
    /// Events or design matrix.
    pub design: DesignSource,
    /// Output folder.
    pub out: PathBuf,
    /// Mask NIfTI (default: the first volume's brain mask).
    pub mask: Option<PathBuf>,
    /// AR(1) prewhitening.
    pub ar1: bool,
    /// DCT high-pass cut-off in seconds (else the configured drift).
    pub highpass: Option<f64>,
    /// Motion parameters per volume (`mirage realign --params`, or an fMRIPrep confounds TSV):
    /// nuisance regressors as the live GLM has them.
    pub motion: Option<PathBuf>,
}

/// Reads the six motion parameters of every volume from a TSV whose header names them
/// (`trans_x` … `rot_z`, in any column order, other columns ignored); `n/a` rows are `None`.
pub fn read_motion_tsv(path: &Path) -> anyhow::Result<Vec<Option<MotionEstimate>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--motion {}", path.display()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().map(|h| h.split('\t').map(str::trim).collect()).unwrap_or_default();
    let cols: Vec<usize> = PARAM_NAMES
        .iter()
        .map(|name| {
            header.iter().position(|h| h == name).with_context(|| {
                format!(
                    "--motion {}: no {name} column (want a header naming trans_x … rot_z)",
                    path.display()
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    lines
        .enumerate()
        .map(|(row, line)| {
            let cells: Vec<&str> = line.split('\t').map(str::trim).collect();
            let values: Vec<Option<f64>> = cols
                .iter()
                .map(|&c| match cells.get(c) {
                    Some(&"n/a") => Ok(None),
                    Some(v) => v.parse::<f64>().ok().filter(|x| x.is_finite()).map(Some).with_context(|| {
                        format!("--motion {}: row {}: {v:?} is not a number", path.display(), row + 1)
                    }),
                    None => anyhow::bail!(
                        "--motion {}: row {} has {} columns",
                        path.display(),
                        row + 1,
                        cells.len()
                    ),
                })
                .collect::<anyhow::Result<_>>()?;
            if values.iter().any(Option::is_none) {
                return Ok(None);
            }
            let v: Vec<f64> = values.into_iter().flatten().collect();
            let params = RigidParams { trans: [v[0], v[1], v[2]], rot: [v[3], v[4], v[5]] };
            Ok(Some(MotionEstimate {
                params,
                matrix: params.matrix(),
                framewise_displacement: 0.0,
                fd_exceeded: false,
                iterations: 0,
                cost: f64::NAN,
                converged: true,
                reference_index: None,
            }))
        })
        .collect()
}

/// Fits `input` and writes `betas.nii.gz`, `tstats.nii.gz` (one volume per regressor, zero
/// outside the mask), `design.tsv` (unwhitened), with trial regressors `trial_betas.npy`
/// (trials × mask voxels, the decoder's input) and `trials.tsv`, and with AR(1) `ar1.json`.
pub fn glm(input: &Path, opts: &GlmOptions, base: &GlmConfig, max_voxels: usize) -> anyhow::Result<FullFit> {
    let mut reader = NiftiReader::open(input, max_voxels)?;
    let h = reader.header().clone();
    let tr = opts.tr.or(h.tr_seconds()).context("no TR in the header: pass --tr SECONDS")?;
    let n = h.n_volumes();
    let mut cfg = base.clone();
    cfg.tr = Some(tr);
    cfg.ar1 = opts.ar1;
    let motion = opts.motion.as_deref().map(read_motion_tsv).transpose()?;
    if let Some(m) = &motion {
        if m.len() != n {
            anyhow::bail!("--motion has {} rows for {n} volumes", m.len());
        }
    }
    // Motion regressors as the live GLM adds them, when the parameters are given.
    cfg.motion_regressors = motion.is_some() && base.motion_regressors;
    cfg.events = None;
    if let Some(m) = &opts.mask {
        cfg.mask = m.display().to_string();
    }
    if let Some(cut) = opts.highpass {
        cfg.drift = Drift::Cosine;
        cfg.highpass_s = cut;
        cfg.run_length_s = Some(n as f64 * tr);
    }
    let mut est = match &opts.design {
        DesignSource::Events(p) => {
            cfg.events = Some(p.clone());
            GlmEstimator::new(&cfg)?
        }
        DesignSource::Matrix(p) => {
            if opts.highpass.is_none() {
                cfg.drift = Drift::None;
            }
            let columns = read_design(p).map_err(|e| anyhow::anyhow!("--design {e}"))?;
            GlmEstimator::new(&cfg)?.with_design(columns)
        }
    };
    let run = sanitize_run_id(
        &input
            .file_name()
            .map(|f| f.to_string_lossy().split('.').next().unwrap_or("run").to_string())
            .unwrap_or_default(),
    );
    let (dims, affine) = (h.volume_dims(), h.affine());
    let mut index = 0u64;
    while let Some(data) = reader.read_volume()? {
        let v = Volume {
            data,
            dims,
            affine,
            index,
            run: run.clone(),
            tr: Some(tr),
            acq_time: None,
            recv_time: 0.0,
        };
        let m = motion.as_ref().and_then(|m| m.get(index as usize)).and_then(Option::as_ref);
        let out = est.process(&v, m, index == 0).with_context(|| format!("volume {index}"))?;
        if out.new_nan_voxels > 0 {
            eprintln!("mirage: volume {index}: {} voxels are NaN and masked out", out.new_nan_voxels);
        }
        index += 1;
    }
    let fit = est.full_fit().context("the series has no volume")?;
    std::fs::create_dir_all(&opts.out).with_context(|| opts.out.display().to_string())?;
    let n_vox: usize = dims.iter().product();
    let write_maps = |name: &str, maps: &[Vec<f32>]| -> anyhow::Result<()> {
        let path = opts.out.join(name);
        let mut w = NiftiWriter::create(&path, dims, maps.len(), &affine, None)?;
        for m in maps {
            let mut full = vec![0f32; n_vox];
            fit.mask.iter().zip(m).for_each(|(&v, b)| full[v] = *b);
            w.write_volume(&full)?;
        }
        w.finish()?;
        Ok(())
    };
    write_maps("betas.nii.gz", &fit.betas)?;
    write_maps("tstats.nii.gz", &fit.tstats)?;
    let mut tsv = fit.names.join("\t");
    tsv.push('\n');
    for row in &fit.design {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:.10e}")).collect();
        let _ = writeln!(tsv, "{}", cells.join("\t"));
    }
    std::fs::write(opts.out.join("design.tsv"), tsv)?;
    // Trial betas as decoder input: one row per trial (trial-id order), mask voxels as columns.
    let trial_cols: Vec<(usize, u64)> = fit
        .names
        .iter()
        .enumerate()
        .filter_map(|(j, n)| n.strip_prefix("trial_").and_then(|id| id.parse().ok()).map(|id| (j, id)))
        .collect();
    if !trial_cols.is_empty() {
        let rows: Vec<f32> = trial_cols.iter().flat_map(|(j, _)| fit.betas[*j].iter().copied()).collect();
        crate::io::npy::write_npy(
            opts.out.join("trial_betas.npy"),
            &[trial_cols.len(), fit.mask.len()],
            &rows,
        )?;
        let mut ids = String::from("trial_id\tcolumn\n");
        for (j, id) in &trial_cols {
            let _ = writeln!(ids, "{id}\t{}", fit.names[*j]);
        }
        std::fs::write(opts.out.join("trials.tsv"), ids)?;
    }
    if let Some(rho) = fit.rho {
        let text =
            serde_json::json!({ "rho": rho, "warmup_volumes": cfg.ar1_warmup, "whitening": "Prais-Winsten" });
        std::fs::write(opts.out.join("ar1.json"), text.to_string())?;
    }
    Ok(fit)
}
