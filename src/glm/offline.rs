//! The online GLM run offline over a 4-D NIfTI, volume by volume, so that its numbers are the
//! online stage's (`mirage glm`, the session export's design).

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::design::read_design;
use super::{Drift, FullFit, GlmConfig, GlmEstimator};
use crate::io::nifti::NiftiReader;
use crate::io::tsv;
use crate::motion::rigid::{RigidParams, PARAM_NAMES};
use crate::motion::MotionEstimate;
use crate::volume::{run_id_of_file, Affine};

/// Where the regressors come from.
#[derive(Clone, Debug)]
pub enum DesignSource {
    /// A BIDS events file: HRF-convolved trial (or condition) regressors.
    Events(PathBuf),
    /// A design matrix file (plain TSV or FSL VEST).
    Matrix(PathBuf),
}

/// What to fit a series with.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// Repetition time, s (overrides the header).
    pub tr: Option<f64>,
    /// Events or design matrix.
    pub design: DesignSource,
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

/// A fitted series: the fit, and the grid it is on.
pub struct SeriesFit {
    /// The end-of-run fit.
    pub fit: FullFit,
    /// The series' grid.
    pub dims: [usize; 3],
    /// Its voxel-to-world matrix.
    pub affine: Affine,
    /// Seconds the online estimator took on each volume (trial betas included where a trial
    /// closed).
    pub seconds: Vec<f64>,
}

/// Reads the six motion parameters of every volume from a TSV whose header names them
/// (`trans_x` … `rot_z`, in any column order, other columns ignored); `n/a` rows are `None`.
pub fn read_motion_tsv(path: &Path) -> anyhow::Result<Vec<Option<MotionEstimate>>> {
    let table = tsv::read(path).map_err(|e| anyhow::anyhow!("--motion {e}"))?;
    let cols: Vec<usize> = PARAM_NAMES
        .iter()
        .map(|name| {
            table.column(name).with_context(|| {
                format!(
                    "--motion {}: no {name} column (want a header naming trans_x … rot_z)",
                    path.display()
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    table
        .rows
        .iter()
        .map(|row| {
            let values: Vec<Option<f64>> = cols
                .iter()
                .map(|&c| match row.get(c) {
                    Some("n/a") => Ok(None),
                    Some(v) => v.parse::<f64>().ok().filter(|x| x.is_finite()).map(Some).with_context(|| {
                        format!("--motion {}: line {}: {v:?} is not a number", path.display(), row.line)
                    }),
                    None => anyhow::bail!(
                        "--motion {}: line {} has {} columns",
                        path.display(),
                        row.line,
                        row.cells.len()
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

/// Fits the 4-D series `input` volume by volume with the online estimator (settings `base`,
/// overridden by `opts`).
pub fn fit_series(
    input: &Path,
    opts: &FitOptions,
    base: &GlmConfig,
    max_voxels: usize,
) -> anyhow::Result<SeriesFit> {
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
    let run = run_id_of_file(input);
    let (dims, affine) = (h.volume_dims(), h.affine());
    let mut seconds = Vec::with_capacity(n);
    let mut index = 0u64;
    while let Some(mut v) = reader.next_volume(index, &run)? {
        v.tr = Some(tr);
        let m = motion.as_ref().and_then(|m| m.get(index as usize)).and_then(Option::as_ref);
        let start = std::time::Instant::now();
        let out = est.process(&v, m, index == 0).with_context(|| format!("volume {index}"))?;
        seconds.push(start.elapsed().as_secs_f64());
        if out.new_nan_voxels > 0 {
            tracing::warn!("glm: volume {index}: {} voxels are NaN and masked out", out.new_nan_voxels);
        }
        index += 1;
    }
    let fit = est.full_fit().context("the series has no volume")?;
    Ok(SeriesFit { fit, dims, affine, seconds })
}

/// A fit's unwhitened design as TSV: a header of regressor names, a row per volume.
pub fn design_tsv(fit: &FullFit) -> String {
    let mut tsv = fit.names.join("\t") + "\n";
    for row in &fit.design {
        tsv += &(row.iter().map(|v| format!("{v:.10e}")).collect::<Vec<_>>().join("\t") + "\n");
    }
    tsv
}
