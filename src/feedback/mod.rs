//! Neurofeedback signals from the ROI means: recipes a lab can trust and compare, starting with
//! OpenNFT's own continuous PSC ([`opennft`]).

pub mod opennft;
