//! `mirage glm`: the online GLM run offline over a 4-D NIfTI (`glm::offline`), its maps,
//! design and trial betas written as files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::glm::offline::{FitOptions, SeriesFit};
use crate::glm::GlmConfig;
use crate::io::nifti::NiftiWriter;

pub use crate::glm::offline::{read_motion_tsv, DesignSource};

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

/// Fits `input` and writes `betas.nii.gz`, `tstats.nii.gz` (one volume per regressor, zero
/// outside the mask), `design.tsv` (unwhitened), with trial regressors `trial_betas.npy`
/// (trials × mask voxels, the decoder's input) and `trials.tsv`, and with AR(1) `ar1.json`;
/// returns the fit with the estimator's time per volume.
pub fn glm(
    input: &Path,
    opts: &GlmOptions,
    base: &GlmConfig,
    max_voxels: usize,
) -> anyhow::Result<SeriesFit> {
    let fitted = crate::glm::offline::fit_series(
        input,
        &FitOptions {
            tr: opts.tr,
            design: opts.design.clone(),
            mask: opts.mask.clone(),
            ar1: opts.ar1,
            highpass: opts.highpass,
            motion: opts.motion.clone(),
        },
        base,
        max_voxels,
    )?;
    let SeriesFit { fit, dims, affine, .. } = &fitted;
    std::fs::create_dir_all(&opts.out).with_context(|| opts.out.display().to_string())?;
    let n_vox: usize = dims.iter().product();
    let write_maps = |name: &str, maps: &[Vec<f32>]| -> anyhow::Result<()> {
        let path = opts.out.join(name);
        let mut w = NiftiWriter::create(&path, *dims, maps.len(), affine, None)?;
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
    std::fs::write(opts.out.join("design.tsv"), crate::glm::offline::design_tsv(fit))?;
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
        let text = serde_json::json!({ "rho": rho, "warmup_volumes": base.ar1_warmup, "whitening": "Prais-Winsten" });
        std::fs::write(opts.out.join("ar1.json"), text.to_string())?;
    }
    Ok(fitted)
}
