//! The scanner side: read the files an MRI scanner exports (Siemens mosaic and XA enhanced
//! DICOM, GE single-slice DICOM, Philips PAR/REC) into volumes with their RAS+ affine, and
//! watch an export folder for them (`mirage scanner`, `mirage convert`).

pub mod assemble;
pub mod csa;
pub mod dicom;
pub mod geometry;
pub mod parrec;
pub mod watch;

use std::path::PathBuf;

use crate::volume::Volume;

/// Which scanner wrote the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// Siemens: classic mosaic or XA enhanced (multi-frame) DICOM, one file per volume.
    Siemens,
    /// GE: one DICOM file per slice.
    Ge,
    /// Philips: PAR/REC pairs.
    Philips,
    /// Decided per file from its contents.
    Auto,
}

impl Vendor {
    /// Reads `siemens`, `ge`, `philips` or `auto`.
    pub fn parse(s: &str) -> Result<Vendor, String> {
        match s.to_ascii_lowercase().as_str() {
            "siemens" => Ok(Vendor::Siemens),
            "ge" => Ok(Vendor::Ge),
            "philips" => Ok(Vendor::Philips),
            "auto" => Ok(Vendor::Auto),
            other => Err(format!("vendor {other:?}: use siemens, ge, philips or auto")),
        }
    }
}

/// A volume read from a scanner's files.
#[derive(Clone, Debug)]
pub struct ScannedVolume {
    /// The volume: data x fastest, RAS+ affine of voxel centres, 0-based index in the series,
    /// TR when the files give it (`recv_time` and `acq_time` are left for the sender to set).
    pub volume: Volume,
    /// Acquisition time on the scanner's clock in seconds (DICOM: since midnight; PAR/REC: since
    /// the scan began), when the files give it; only differences between volumes are used.
    pub scanner_time: Option<f64>,
    /// Identifies the series (files of one series make one run).
    pub series: String,
}

impl ScannedVolume {
    /// A volume read from files: grid, RAS+ affine, data x fastest, 0-based index and TR; its
    /// run and clock stamps are the sender's to set.
    pub fn new(
        dims: [usize; 3],
        affine: crate::volume::Affine,
        data: Vec<f32>,
        index: u64,
        tr: Option<f64>,
        scanner_time: Option<f64>,
        series: String,
    ) -> ScannedVolume {
        let volume = Volume {
            data,
            dims,
            affine,
            index,
            run: "run".into(),
            tr,
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        };
        ScannedVolume { volume, scanner_time, series }
    }
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScannerError {
    /// The file (or its partner) is not whole yet: try again later.
    #[error("{path}: incomplete: {reason}")]
    Incomplete {
        /// The file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// The file is not something this reader takes (corrupt or foreign): skip it.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What one exported file gives.
#[derive(Debug)]
pub enum FileContent {
    /// Whole volumes (Siemens mosaic or enhanced DICOM, PAR/REC).
    Volumes(Vec<ScannedVolume>),
    /// One slice of a volume (GE), for an [`assemble::Assembler`].
    Slice(dicom::Slice),
}

/// Whether `path` is a file the readers look at: DICOM (any name but the partner files
/// below) or a PAR header; REC files are read with their PAR, and hidden or temporary files
/// (`.name`, `*.tmp`, `*.part`) are left alone.
pub fn is_candidate(path: &std::path::Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    !(name.is_empty()
        || name.starts_with('.')
        || [".rec", ".tmp", ".part", ".nii", ".nii.gz", ".json", ".txt", ".yaml"]
            .iter()
            .any(|s| lower.ends_with(s)))
}

/// Reads one exported file of `vendor` (PAR by its extension, everything else as DICOM).
pub fn read_file(path: &std::path::Path, vendor: Vendor) -> Result<FileContent, ScannerError> {
    let is_par = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("par"));
    match (vendor, is_par) {
        (Vendor::Philips | Vendor::Auto, true) => parrec::read_par(path).map(FileContent::Volumes),
        (Vendor::Philips, false) => {
            Err(ScannerError::Invalid { path: path.to_path_buf(), reason: "not a PAR file".into() })
        }
        (_, true) => Err(ScannerError::Invalid { path: path.to_path_buf(), reason: "a PAR file".into() }),
        _ => match dicom::read_dicom(path)? {
            dicom::DicomContent::Volumes(v) => Ok(FileContent::Volumes(v)),
            dicom::DicomContent::Slice(s) => Ok(FileContent::Slice(s)),
        },
    }
}
