//! Single-slice files (GE) grouped into volumes: a volume is complete when it holds as many
//! distinct slice positions as the files say a volume has.

use std::collections::BTreeMap;

use super::dicom::Slice;
use super::geometry::stack;
use super::ScannedVolume;

/// Volumes being filled, by series and volume index.
#[derive(Default)]
pub struct Assembler {
    pending: BTreeMap<(String, u64), Vec<Slice>>,
}

impl Assembler {
    /// Adds a slice; returns its volume once complete. A slice whose position the volume
    /// already has is a duplicate and is dropped (`Ok(None)`).
    pub fn process(&mut self, slice: Slice) -> Result<Option<ScannedVolume>, String> {
        let key = (slice.series.clone(), slice.volume);
        let slices = self.pending.entry(key.clone()).or_default();
        let at = |s: &Slice| s.image.position;
        let same = |a: [f64; 3], b: [f64; 3]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-3);
        if slices.iter().any(|s| same(at(s), at(&slice))) {
            return Ok(None);
        }
        let needed = slice.slices_per_volume;
        slices.push(slice);
        if slices.len() < needed {
            return Ok(None);
        }
        let slices = self.pending.remove(&key).unwrap_or_default();
        let first = &slices[0];
        let (series, index, tr, thickness) = (first.series.clone(), first.volume, first.tr, first.thickness);
        let scanner_time = slices.iter().filter_map(|s| s.scanner_time).min_by(f64::total_cmp);
        let (dims, affine, data) = stack(slices.into_iter().map(|s| s.image).collect(), None, thickness)?;
        Ok(Some(ScannedVolume::new(dims, affine, data, index, tr, scanner_time, series)))
    }

    /// Volumes still missing slices.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}
