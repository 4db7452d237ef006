//! File formats: NIfTI-1 images, NumPy arrays and the session folder.

pub mod nifti;
pub mod npy;
pub mod session;
