//! The GLM stage: haemodynamic modelling of the series.

pub mod hrf;
