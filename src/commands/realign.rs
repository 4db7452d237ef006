//! `mirage realign`: the online motion stage run offline over a 4-D NIfTI, so its numbers can
//! be compared with other tools.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::io::nifti::{NiftiReader, NiftiWriter};
use crate::motion::rigid::PARAM_NAMES;
use crate::motion::{MotionConfig, MotionCorrector, MotionEstimate};
use crate::volume::run_id_of_file;

/// Where the reference comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ReferenceChoice {
    /// Volume K of the input.
    Volume(u64),
    /// The first volume of another NIfTI.
    File(PathBuf),
}

impl ReferenceChoice {
    /// `K` (an integer) or a file path.
    pub fn parse(s: &str) -> ReferenceChoice {
        s.parse().map(ReferenceChoice::Volume).unwrap_or_else(|_| ReferenceChoice::File(PathBuf::from(s)))
    }
}

/// What to write.
#[derive(Clone, Debug, Default)]
pub struct RealignOutputs {
    /// Resliced 4-D NIfTI.
    pub out: Option<PathBuf>,
    /// fMRIPrep-style confounds TSV.
    pub params: Option<PathBuf>,
    /// One row of 12 numbers (row-major 3×4 of M) per volume.
    pub matrices: Option<PathBuf>,
}

/// What `realign` did.
pub struct Realigned {
    /// Each volume's estimate (`None` where it failed).
    pub estimates: Vec<Option<MotionEstimate>>,
    /// Seconds the motion stage took on each volume it registered (registration and reslice;
    /// not the reference's preparation).
    pub seconds: Vec<f64>,
}

/// Realigns every volume of `input`, timing the motion stage on each.
pub fn realign(
    input: &Path,
    reference: &ReferenceChoice,
    cfg: &MotionConfig,
    outputs: &RealignOutputs,
    max_voxels: usize,
) -> anyhow::Result<Realigned> {
    let mut cfg = cfg.clone();
    let run = run_id_of_file(input);
    let read = |index: u64, reader: &mut NiftiReader| reader.next_volume(index, &run);
    let mut corrector = match reference {
        ReferenceChoice::File(p) => {
            cfg.reference_file = Some(p.clone());
            MotionCorrector::new(&cfg)?
        }
        ReferenceChoice::Volume(0) => MotionCorrector::new(&cfg)?,
        ReferenceChoice::Volume(k) => {
            // Read ahead to volume K so that the volumes before it are realigned too.
            let mut ahead = NiftiReader::open(input, max_voxels)?;
            let mut found = None;
            for i in 0..=*k {
                found = read(i, &mut ahead)?;
            }
            let v = found.with_context(|| format!("{} has no volume {k}", input.display()))?;
            MotionCorrector::with_reference_volume(&cfg, &v)?
        }
    };
    let mut reader = NiftiReader::open(input, max_voxels)?;
    let n = reader.header().n_volumes();
    let tr = reader.header().tr_seconds();
    let mut writer: Option<NiftiWriter> = None;
    let mut estimates = Vec::with_capacity(n);
    let mut seconds = Vec::with_capacity(n);
    // With the first volume as reference, its own call prepares the reference.
    let prepares = matches!(reference, ReferenceChoice::Volume(0));
    let mut index = 0u64;
    while let Some(v) = read(index, &mut reader)? {
        let start = std::time::Instant::now();
        let processed = corrector.process(&v, index == 0);
        if !(prepares && index == 0) {
            seconds.push(start.elapsed().as_secs_f64());
        }
        // As in the daemon, the reference volume is prepared once its own realignment is out.
        let processed = processed.and_then(|r| corrector.prepare_reference().map(|()| r));
        let (data, estimate) = match processed {
            Ok(Some(r)) => (r.volume, Some(r.estimate)),
            Ok(None) => (v.clone(), None),
            Err(e) => {
                eprintln!("mirage: volume {index}: {e}; written unrealigned, parameters NaN");
                (v.clone(), None)
            }
        };
        if let Some(path) = &outputs.out {
            if writer.is_none() {
                writer = Some(NiftiWriter::create(path, data.dims, n, &data.affine, tr)?);
            }
            if let Some(w) = writer.as_mut() {
                w.write_volume(&data.data)
                    .with_context(|| format!("volume {index} has another grid than the reference"))?;
            }
        }
        estimates.push(estimate);
        index += 1;
    }
    if let Some(w) = writer {
        w.finish()?;
    }
    if let Some(path) = &outputs.params {
        std::fs::write(path, params_tsv(&estimates)).with_context(|| path.display().to_string())?;
    }
    if let Some(path) = &outputs.matrices {
        std::fs::write(path, matrices_tsv(&estimates)).with_context(|| path.display().to_string())?;
    }
    Ok(Realigned { estimates, seconds })
}

/// The confounds table: a header of fMRIPrep names, one row per volume (`n/a` where none).
pub fn params_tsv(estimates: &[Option<MotionEstimate>]) -> String {
    let mut out = format!("{}\tframewise_displacement\n", PARAM_NAMES.join("\t"));
    for e in estimates {
        match e {
            Some(e) => {
                let p: Vec<String> = e.params.to_array().iter().map(|v| format!("{v:.9}")).collect();
                let _ = writeln!(out, "{}\t{:.9}", p.join("\t"), e.framewise_displacement);
            }
            None => {
                let _ = writeln!(out, "{}", ["n/a"; 7].join("\t"));
            }
        }
    }
    out
}

/// One row per volume: the 12 numbers of the top three rows of `M`, row-major, no header.
pub fn matrices_tsv(estimates: &[Option<MotionEstimate>]) -> String {
    let mut out = String::new();
    for e in estimates {
        let row: Vec<String> = match e {
            Some(e) => e.matrix.iter().take(3).flatten().map(|v| format!("{v:.12}")).collect(),
            None => vec!["nan".to_string(); 12],
        };
        let _ = writeln!(out, "{}", row.join("\t"));
    }
    out
}
