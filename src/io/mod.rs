//! File formats: NIfTI-1 images, NumPy arrays, the session folder and tab-separated tables.

pub mod nifti;
pub mod npy;
pub mod session;
pub mod tsv;
