//! DICOM as scanners export it: Siemens classic mosaic (the slices tiled in one image, unpacked
//! with the CSA header), enhanced multi-frame DICOM (Siemens XA: one frame per slice, geometry
//! in the functional groups) and single-slice files (GE), which [`super::assemble`] groups into
//! volumes.

use std::path::Path;

use dicom_core::Tag;
use dicom_object::InMemDicomObject;

use super::csa;
use super::geometry::{stack, SliceImage};
use super::{ScannedVolume, ScannerError};

const ACQUISITION_DATE_TIME: Tag = Tag(0x0008, 0x002A);
const ACQUISITION_TIME: Tag = Tag(0x0008, 0x0032);
const IMAGE_TYPE: Tag = Tag(0x0008, 0x0008);
const MANUFACTURER: Tag = Tag(0x0008, 0x0070);
const SOP_CLASS: Tag = Tag(0x0008, 0x0016);
const SLICE_THICKNESS: Tag = Tag(0x0018, 0x0050);
const REPETITION_TIME: Tag = Tag(0x0018, 0x0080);
const SLICE_SPACING: Tag = Tag(0x0018, 0x0088);
const FRAME_ACQUISITION_DATE_TIME: Tag = Tag(0x0018, 0x9074);
const MR_TIMING_SEQUENCE: Tag = Tag(0x0018, 0x9112);
const SIEMENS_MOSAIC_COUNT: Tag = Tag(0x0019, 0x100A);
const SERIES_UID: Tag = Tag(0x0020, 0x000E);
const SERIES_NUMBER: Tag = Tag(0x0020, 0x0011);
const ACQUISITION_NUMBER: Tag = Tag(0x0020, 0x0012);
const INSTANCE_NUMBER: Tag = Tag(0x0020, 0x0013);
const IMAGE_POSITION: Tag = Tag(0x0020, 0x0032);
const IMAGE_ORIENTATION: Tag = Tag(0x0020, 0x0037);
const IMAGES_IN_ACQUISITION: Tag = Tag(0x0020, 0x1002);
const FRAME_CONTENT_SEQUENCE: Tag = Tag(0x0020, 0x9111);
const PLANE_POSITION_SEQUENCE: Tag = Tag(0x0020, 0x9113);
const PLANE_ORIENTATION_SEQUENCE: Tag = Tag(0x0020, 0x9116);
const TEMPORAL_POSITION_INDEX: Tag = Tag(0x0020, 0x9128);
const GE_LOCATIONS_IN_ACQUISITION: Tag = Tag(0x0021, 0x104F);
const NUMBER_OF_FRAMES: Tag = Tag(0x0028, 0x0008);
const ROWS: Tag = Tag(0x0028, 0x0010);
const COLUMNS: Tag = Tag(0x0028, 0x0011);
const PIXEL_SPACING: Tag = Tag(0x0028, 0x0030);
const BITS_ALLOCATED: Tag = Tag(0x0028, 0x0100);
const PIXEL_REPRESENTATION: Tag = Tag(0x0028, 0x0103);
const RESCALE_INTERCEPT: Tag = Tag(0x0028, 0x1052);
const RESCALE_SLOPE: Tag = Tag(0x0028, 0x1053);
const PIXEL_MEASURES_SEQUENCE: Tag = Tag(0x0028, 0x9110);
const PIXEL_TRANSFORMATION_SEQUENCE: Tag = Tag(0x0028, 0x9145);
const CSA_IMAGE_HEADER: Tag = Tag(0x0029, 0x1010);
const SHARED_GROUPS: Tag = Tag(0x5200, 0x9229);
const PER_FRAME_GROUPS: Tag = Tag(0x5200, 0x9230);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);

/// Enhanced MR Image Storage.
const ENHANCED_MR: &str = "1.2.840.10008.5.1.4.1.1.4.1";
/// Largest voxel count of one file.
const MAX_VOXELS: usize = 1 << 26;

/// What one DICOM file holds.
#[derive(Debug)]
pub enum DicomContent {
    /// Whole volumes (a mosaic, or an enhanced file's frames).
    Volumes(Vec<ScannedVolume>),
    /// One slice, to be grouped with the rest of its volume.
    Slice(Slice),
}

/// A single-slice file's image and where it belongs.
#[derive(Debug)]
pub struct Slice {
    /// Series identity.
    pub series: String,
    /// 0-based volume index.
    pub volume: u64,
    /// Slices per volume.
    pub slices_per_volume: usize,
    /// The image and its placement.
    pub image: SliceImage,
    /// Slice thickness (mm).
    pub thickness: f64,
    /// Repetition time (s).
    pub tr: Option<f64>,
    /// Acquisition time of day (s).
    pub scanner_time: Option<f64>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> ScannerError {
    ScannerError::Invalid { path: path.to_path_buf(), reason: reason.into() }
}

fn incomplete(path: &Path, reason: impl Into<String>) -> ScannerError {
    ScannerError::Incomplete { path: path.to_path_buf(), reason: reason.into() }
}

fn floats(o: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let v = o.element_opt(tag).ok()??.to_multi_float64().ok()?;
    v.iter().all(|x| x.is_finite()).then_some(v)
}

fn float(o: &InMemDicomObject, tag: Tag) -> Option<f64> {
    floats(o, tag)?.first().copied()
}

fn int(o: &InMemDicomObject, tag: Tag) -> Option<i64> {
    o.element_opt(tag).ok()??.to_int::<i64>().ok()
}

fn text(o: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = o.element_opt(tag).ok()??.to_str().ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn items(o: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    o.element_opt(tag).ok().flatten().and_then(|e| e.items()).unwrap_or_default()
}

/// `tag` inside sequence `seq` of the frame's group, else of the shared group.
fn grouped<T>(
    frame: Option<&InMemDicomObject>,
    shared: Option<&InMemDicomObject>,
    seq: Tag,
    get: impl Fn(&InMemDicomObject) -> Option<T>,
) -> Option<T> {
    [frame, shared].into_iter().flatten().find_map(|g| items(g, seq).first().and_then(&get))
}

/// Seconds since midnight of a DICOM TM (`HHMMSS.FFFFFF`) or the time part of a DT.
pub fn time_of_day(tm: &str) -> Option<f64> {
    let digits: String = tm.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.len() < 2 {
        return None;
    }
    let part = |a: usize| digits.get(a..a + 2).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let frac = tm[digits.len()..].strip_prefix('.').map_or(0.0, |f| {
        let f: String = f.chars().take_while(|c| c.is_ascii_digit()).collect();
        format!("0.{f}").parse::<f64>().unwrap_or(0.0)
    });
    Some(part(0) * 3600.0 + part(2) * 60.0 + part(4) + frac)
}

/// The pixel values of `n` pixels from `bytes` (little-endian), rescaled.
fn pixels(
    bytes: &[u8],
    n: usize,
    bits: i64,
    signed: bool,
    slope: f64,
    intercept: f64,
) -> Result<Vec<f32>, String> {
    let width = match bits {
        8 => 1,
        16 => 2,
        32 => 4,
        b => return Err(format!("{b} bits allocated per pixel")),
    };
    let bytes = bytes
        .get(..n * width)
        .ok_or_else(|| format!("pixel data has {} of {} bytes", bytes.len(), n * width))?;
    let raw = bytes.chunks_exact(width).map(|b| match (width, signed) {
        (1, false) => f64::from(b[0]),
        (1, true) => f64::from(b[0] as i8),
        (2, false) => f64::from(u16::from_le_bytes([b[0], b[1]])),
        (2, true) => f64::from(i16::from_le_bytes([b[0], b[1]])),
        (_, false) => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        (_, true) => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    });
    Ok(raw.map(|v| (v * slope + intercept) as f32).collect())
}

/// An image placed by DICOM's ImagePositionPatient (3 numbers), ImageOrientationPatient (6) and
/// PixelSpacing (2), whose lengths the caller has checked.
fn placed(
    position: &[f64],
    orientation: &[f64],
    spacing: &[f64],
    rows: usize,
    cols: usize,
    data: Vec<f32>,
) -> SliceImage {
    SliceImage {
        position: [position[0], position[1], position[2]],
        row_cos: [orientation[0], orientation[1], orientation[2]],
        col_cos: [orientation[3], orientation[4], orientation[5]],
        spacing: [spacing[0], spacing[1]],
        rows,
        cols,
        data,
    }
}

/// Reads one DICOM file.
pub fn read_dicom(path: &Path) -> Result<DicomContent, ScannerError> {
    let head = std::fs::read(path).map_err(|e| incomplete(path, e.to_string()))?;
    if head.len() < 132 {
        return Err(incomplete(path, format!("{} bytes", head.len())));
    }
    if &head[128..132] != b"DICM" {
        return Err(invalid(path, "not a DICOM file (no DICM marker)"));
    }
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(&head[128..])
        .map_err(|e| incomplete(path, format!("cannot parse: {e}")))?;
    let obj: &InMemDicomObject = &obj;
    let pixel_data = match obj.element_opt(PIXEL_DATA) {
        Ok(Some(e)) => e.to_bytes().map_err(|_| invalid(path, "compressed pixel data is not supported"))?,
        _ => return Err(incomplete(path, "no pixel data yet")),
    };
    let rows = int(obj, ROWS).ok_or_else(|| invalid(path, "no Rows"))?;
    let cols = int(obj, COLUMNS).ok_or_else(|| invalid(path, "no Columns"))?;
    let (rows, cols) = match (usize::try_from(rows), usize::try_from(cols)) {
        (Ok(r), Ok(c)) if r > 0 && c > 0 && r * c <= MAX_VOXELS => (r, c),
        _ => return Err(invalid(path, format!("image of {rows}×{cols}"))),
    };
    let bits = int(obj, BITS_ALLOCATED).unwrap_or(16);
    let signed = int(obj, PIXEL_REPRESENTATION) == Some(1);
    let series =
        text(obj, SERIES_NUMBER).or_else(|| text(obj, SERIES_UID)).unwrap_or_else(|| "series".into());
    let index = int(obj, ACQUISITION_NUMBER).filter(|n| *n > 0).or_else(|| int(obj, INSTANCE_NUMBER));
    let index = index.map_or(0, |n| (n.max(1) - 1) as u64);
    let tr = float(obj, REPETITION_TIME).map(|ms| ms / 1000.0);
    let scanner_time = text(obj, ACQUISITION_TIME)
        .as_deref()
        .and_then(time_of_day)
        .or_else(|| text(obj, ACQUISITION_DATE_TIME).and_then(|dt| dt.get(8..).and_then(time_of_day)));
    let enhanced =
        text(obj, SOP_CLASS).as_deref() == Some(ENHANCED_MR) || int(obj, NUMBER_OF_FRAMES).unwrap_or(1) > 1;
    if enhanced {
        let frames = read_enhanced(obj, path, rows, cols, &pixel_data, bits, signed)?;
        return Ok(DicomContent::Volumes(
            frames
                .into_iter()
                .map(|(t, dims, affine, data, frame_time)| {
                    let tr = tr.or(enhanced_tr(obj));
                    ScannedVolume::new(
                        dims,
                        affine,
                        data,
                        index + t,
                        tr,
                        frame_time.or(scanner_time),
                        series.clone(),
                    )
                })
                .collect(),
        ));
    }
    let slope = float(obj, RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = float(obj, RESCALE_INTERCEPT).unwrap_or(0.0);
    let data =
        pixels(&pixel_data, rows * cols, bits, signed, slope, intercept).map_err(|e| incomplete(path, e))?;
    let position = floats(obj, IMAGE_POSITION)
        .filter(|v| v.len() == 3)
        .ok_or_else(|| invalid(path, "no ImagePositionPatient"))?;
    let orientation = floats(obj, IMAGE_ORIENTATION)
        .filter(|v| v.len() == 6)
        .ok_or_else(|| invalid(path, "no ImageOrientationPatient"))?;
    let spacing = floats(obj, PIXEL_SPACING)
        .filter(|v| v.len() == 2)
        .ok_or_else(|| invalid(path, "no PixelSpacing"))?;
    let thickness = float(obj, SLICE_SPACING).or_else(|| float(obj, SLICE_THICKNESS)).unwrap_or(1.0);
    let image = placed(&position, &orientation, &spacing, rows, cols, data);
    let is_siemens = text(obj, MANUFACTURER).is_some_and(|m| m.to_ascii_uppercase().contains("SIEMENS"));
    let csa = obj
        .element_opt(CSA_IMAGE_HEADER)
        .ok()
        .flatten()
        .and_then(|e| e.to_bytes().ok())
        .and_then(|b| csa::parse(&b).ok());
    let mosaic_count = csa
        .as_ref()
        .and_then(|h| csa::numbers(h, "NumberOfImagesInMosaic"))
        .and_then(|v| v.first().copied())
        .map(|v| v as i64)
        .or_else(|| int(obj, SIEMENS_MOSAIC_COUNT));
    let mosaic = text(obj, IMAGE_TYPE).is_some_and(|t| t.to_ascii_uppercase().contains("MOSAIC"));
    if is_siemens && (mosaic || mosaic_count.is_some_and(|n| n > 1)) {
        let n = mosaic_count.ok_or_else(|| invalid(path, "a mosaic without NumberOfImagesInMosaic"))?;
        let normal = csa.as_ref().and_then(|h| csa::numbers(h, "SliceNormalVector")).filter(|v| v.len() == 3);
        let normal = normal.map(|v| [v[0], v[1], v[2]]);
        let (dims, affine, data) = unmosaic(image, n, normal, thickness).map_err(|e| invalid(path, e))?;
        return Ok(DicomContent::Volumes(vec![ScannedVolume::new(
            dims,
            affine,
            data,
            index,
            tr,
            scanner_time,
            series,
        )]));
    }
    let per_volume = int(obj, GE_LOCATIONS_IN_ACQUISITION)
        .or_else(|| int(obj, IMAGES_IN_ACQUISITION))
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            invalid(path, "a single slice without LocationsInAcquisition or ImagesInAcquisition")
        })?;
    let instance =
        int(obj, INSTANCE_NUMBER).filter(|n| *n > 0).ok_or_else(|| invalid(path, "no InstanceNumber"))?;
    Ok(DicomContent::Slice(Slice {
        series,
        volume: ((instance - 1) / per_volume) as u64,
        slices_per_volume: per_volume as usize,
        image,
        thickness,
        tr,
        scanner_time,
    }))
}

fn enhanced_tr(obj: &InMemDicomObject) -> Option<f64> {
    let shared = items(obj, SHARED_GROUPS).first();
    grouped(None, shared, MR_TIMING_SEQUENCE, |g| float(g, REPETITION_TIME)).map(|ms| ms / 1000.0)
}

/// A mosaic image's slices: `n` tiles of `floor(rows/m) × floor(cols/m)` (`m = ceil(sqrt(n))`),
/// row by row; Siemens pads a side that is not a multiple of `m` at its right and bottom, which
/// dcm2niix and nibabel skip too. DICOM places the mosaic's top-left corner; the first slice's
/// corner is moved in by half the difference between the mosaic and a tile.
fn unmosaic(
    image: SliceImage,
    n: i64,
    normal: Option<[f64; 3]>,
    thickness: f64,
) -> Result<([usize; 3], crate::volume::Affine, Vec<f32>), String> {
    let n = usize::try_from(n)
        .ok()
        .filter(|n| (1..=4096).contains(n))
        .ok_or(format!("{n} images in a mosaic"))?;
    let m = (1..=n).find(|m| m * m >= n).unwrap_or(n);
    if image.rows < m || image.cols < m {
        return Err(format!("a {}×{} mosaic is too small for {m}×{m} tiles", image.rows, image.cols));
    }
    let (tr, tc) = (image.rows / m, image.cols / m);
    let shift_c = (image.cols - tc) as f64 / 2.0 * image.spacing[1];
    let shift_r = (image.rows - tr) as f64 / 2.0 * image.spacing[0];
    let first: [f64; 3] =
        std::array::from_fn(|i| image.position[i] + image.row_cos[i] * shift_c + image.col_cos[i] * shift_r);
    let normal = normal.unwrap_or_else(|| super::geometry::cross(image.row_cos, image.col_cos));
    let slices = (0..n)
        .map(|s| {
            let (r0, c0) = (s / m * tr, s % m * tc);
            let mut data = Vec::with_capacity(tr * tc);
            for r in 0..tr {
                let start = (r0 + r) * image.cols + c0;
                data.extend_from_slice(&image.data[start..start + tc]);
            }
            SliceImage {
                position: std::array::from_fn(|i| first[i] + normal[i] * thickness * s as f64),
                rows: tr,
                cols: tc,
                data,
                ..image.clone()
            }
        })
        .collect();
    stack(slices, Some(normal), thickness)
}

/// Frames of an enhanced file grouped by temporal position: per volume its offset (0-based),
/// grid, affine, data and acquisition time of day.
#[allow(clippy::type_complexity)]
fn read_enhanced(
    obj: &InMemDicomObject,
    path: &Path,
    rows: usize,
    cols: usize,
    pixel_data: &[u8],
    bits: i64,
    signed: bool,
) -> Result<Vec<(u64, [usize; 3], crate::volume::Affine, Vec<f32>, Option<f64>)>, ScannerError> {
    let n_frames = int(obj, NUMBER_OF_FRAMES).unwrap_or(1);
    let n_frames = usize::try_from(n_frames).ok().filter(|n| *n >= 1 && n * rows * cols <= MAX_VOXELS);
    let n_frames = n_frames.ok_or_else(|| invalid(path, "NumberOfFrames out of range"))?;
    let shared = items(obj, SHARED_GROUPS).first();
    let per_frame = items(obj, PER_FRAME_GROUPS);
    if per_frame.len() != n_frames {
        return Err(invalid(path, format!("{} per-frame groups for {n_frames} frames", per_frame.len())));
    }
    let width = (bits / 8).max(1) as usize;
    if pixel_data.len() < n_frames * rows * cols * width {
        return Err(incomplete(path, format!("pixel data has {} bytes", pixel_data.len())));
    }
    let mut volumes: std::collections::BTreeMap<i64, (Vec<SliceImage>, Option<f64>, f64)> =
        Default::default();
    for (f, frame) in per_frame.iter().enumerate() {
        let fr = Some(frame);
        let position = grouped(fr, shared, PLANE_POSITION_SEQUENCE, |g| floats(g, IMAGE_POSITION))
            .filter(|v| v.len() == 3)
            .ok_or_else(|| invalid(path, format!("frame {f}: no ImagePositionPatient")))?;
        let orientation = grouped(fr, shared, PLANE_ORIENTATION_SEQUENCE, |g| floats(g, IMAGE_ORIENTATION))
            .filter(|v| v.len() == 6)
            .ok_or_else(|| invalid(path, format!("frame {f}: no ImageOrientationPatient")))?;
        let spacing = grouped(fr, shared, PIXEL_MEASURES_SEQUENCE, |g| floats(g, PIXEL_SPACING))
            .filter(|v| v.len() == 2)
            .ok_or_else(|| invalid(path, format!("frame {f}: no PixelSpacing")))?;
        let thickness = grouped(fr, shared, PIXEL_MEASURES_SEQUENCE, |g| {
            float(g, SLICE_SPACING).or_else(|| float(g, SLICE_THICKNESS))
        })
        .unwrap_or(1.0);
        let slope = grouped(fr, shared, PIXEL_TRANSFORMATION_SEQUENCE, |g| float(g, RESCALE_SLOPE))
            .or_else(|| float(obj, RESCALE_SLOPE))
            .unwrap_or(1.0);
        let intercept = grouped(fr, shared, PIXEL_TRANSFORMATION_SEQUENCE, |g| float(g, RESCALE_INTERCEPT))
            .or_else(|| float(obj, RESCALE_INTERCEPT))
            .unwrap_or(0.0);
        let temporal =
            grouped(fr, None, FRAME_CONTENT_SEQUENCE, |g| int(g, TEMPORAL_POSITION_INDEX)).unwrap_or(1);
        let time = grouped(fr, None, FRAME_CONTENT_SEQUENCE, |g| text(g, FRAME_ACQUISITION_DATE_TIME))
            .and_then(|dt| dt.get(8..).and_then(time_of_day));
        let bytes = &pixel_data[f * rows * cols * width..];
        let data =
            pixels(bytes, rows * cols, bits, signed, slope, intercept).map_err(|e| incomplete(path, e))?;
        let entry = volumes.entry(temporal).or_insert_with(|| (Vec::new(), None, thickness));
        entry.1 = match (entry.1, time) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        entry.0.push(placed(&position, &orientation, &spacing, rows, cols, data));
    }
    let first = volumes.keys().next().copied().unwrap_or(1);
    volumes
        .into_iter()
        .map(|(t, (slices, time, thickness))| {
            let (dims, affine, data) = stack(slices, None, thickness).map_err(|e| invalid(path, e))?;
            Ok(((t - first).max(0) as u64, dims, affine, data, time))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_day() {
        assert_eq!(time_of_day("101502.5"), Some(36902.5));
        assert_eq!(time_of_day("1015"), Some(36900.0));
        assert_eq!(time_of_day(""), None);
        assert_eq!(time_of_day("x"), None);
    }
}
