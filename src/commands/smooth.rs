//! `mirage smooth`: a 4-D NIfTI smoothed offline with the smoothing stage's code, so that what
//! the daemon does to each volume can be checked against scipy and seen in a viewer.

use std::path::Path;

use anyhow::Context;

use crate::io::nifti::{NiftiReader, NiftiWriter};
use crate::smooth::GaussianSmoother;

/// What a smoothing run did: volumes written and each one's time, seconds.
pub struct Smoothed {
    /// Seconds each volume took.
    pub seconds: Vec<f64>,
}

/// Smooths every volume of `input` with a Gaussian of `fwhm_mm` into `out`.
pub fn smooth(input: &Path, out: &Path, fwhm_mm: f64, max_voxels: usize) -> anyhow::Result<Smoothed> {
    let errors = crate::smooth::SmoothConfig { enabled: true, fwhm_mm }.validate();
    anyhow::ensure!(errors.is_empty(), "{}", errors.join("\n"));
    let mut reader = NiftiReader::open(input, max_voxels)?;
    let h = reader.header().clone();
    let mut writer = NiftiWriter::create(out, h.volume_dims(), h.n_volumes(), &h.affine(), h.tr_seconds())?;
    let mut smoother = GaussianSmoother::new(fwhm_mm);
    let mut seconds = Vec::with_capacity(h.n_volumes());
    let mut index = 0u64;
    while let Some(v) = reader.next_volume(index, "run")? {
        let start = std::time::Instant::now();
        let s = smoother.process(&v);
        seconds.push(start.elapsed().as_secs_f64());
        writer.write_volume(&s.data).with_context(|| format!("volume {index}"))?;
        index += 1;
    }
    writer.finish()?;
    Ok(Smoothed { seconds })
}
