//! Philips PAR/REC (V4, V4.1, V4.2): a text header (`.par`) describing every 2-D image and a raw
//! file (`.rec`) holding them as little-endian unsigned 8- or 16-bit pixels.
//!
//! [`read_par`] gives one [`ScannedVolume`] per dynamic. Voxels keep nibabel's order (x fastest
//! in a REC image, then y, then z = slice number), values are Philips' display values
//! `PV × RS + RI`, and the affine is nibabel's `get_affine(origin='scanner')`, ported: it uses the general
//! info's midslice angulation and off-centre and ignores the per-image ones, as nibabel does.
//!
//! Real-time exports (Philips XTC, as Pyneal reads them) write one PAR/REC pair per volume, each
//! saying dynamic 1 and counting volumes in "Acquisition nr" instead; see [`read_par`] for how
//! the index and the series are then chosen.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{ScannedVolume, ScannerError};
use crate::volume::Affine;

/// Most voxels one volume may have (guards the allocation against corrupt headers).
const MAX_VOXELS: usize = 1 << 26;
/// Most voxels all the dynamics of one PAR together may have (1 GiB of f32).
const MAX_TOTAL_VOXELS: usize = 1 << 28;
/// Largest PAR text accepted (a header of a long multi-dynamic series is a few MiB).
const MAX_PAR_BYTES: u64 = 64 << 20;
/// The first line of every PAR file contains this.
const MAGIC: &str = "# === DATA DESCRIPTION FILE";
/// The last line of a whole PAR file contains this.
const TRAILER: &str = "END OF DATA DESCRIPTION FILE";

/// Reads a Philips PAR header and its REC file (same stem, `.rec` or `.REC`) into one volume per
/// dynamic, in dynamic order, scaled to display values with nibabel's scanner-space RAS+ affine.
///
/// Only the lowest image type is read (type 0, magnitude, when present; in XTC exports, which
/// write types 16 and 17, type 16 is the magnitude and 17 the phase, and 16 is also what
/// nibabel's `strict_sort` puts first).
///
/// `index` is the dynamic number − 1, except in a one-volume-per-file export (the header's
/// "Max. number of dynamics" is 1 or absent and its only dynamic is 1): there it is the number
/// ending the file name (`Dump-0007.par` → 7), else "Acquisition nr" − 1 (Pyneal's rule), else
/// 0. `series` is `philips:<exam>:<protocol>:acq<nr>`, or `philips:<exam>:<protocol>:dir=<folder>`
/// in such an export, whose acquisition number changes with every file. `scanner_time` is the
/// image lines' dynamic scan begin time (seconds from the scan's start, not from midnight).
///
/// A missing or short REC, or a PAR cut off before its trailer, is
/// [`ScannerError::Incomplete`]; anything malformed is [`ScannerError::Invalid`]. All sizes are
/// checked before anything is allocated.
pub fn read_par(par: &Path) -> Result<Vec<ScannedVolume>, ScannerError> {
    read(par).map_err(|f| f.at(par))
}

fn read(par: &Path) -> Res<Vec<ScannedVolume>> {
    let text = read_text(par)?;
    let header = parse_header(&text)?;
    let plan = Plan::new(&header)?;
    let affine = affine(&plan, &header.general)?;
    let rec = find_rec(par)?;
    let data = read_rec(&rec, &plan)?;
    let tr = tr_seconds(&header.general);
    let per_file = header.general.max_dynamics.is_none_or(|m| m <= 1) && plan.dynamics == [1];
    let series = series_name(par, &header.general, per_file);
    let file_index = if per_file { Some(file_index(par, &header.general)) } else { None };
    let volumes = data
        .into_iter()
        .zip(&plan.dynamics)
        .zip(&plan.scan_times)
        .map(|((data, &dynamic), &time)| {
            let index = file_index.unwrap_or(dynamic.unsigned_abs() - 1);
            ScannedVolume::new(plan.dims, affine, data, index, tr, Some(time), series.clone())
        })
        .collect();
    Ok(volumes)
}

/// Why reading failed, before the path is attached.
#[derive(Debug)]
enum Fail {
    Incomplete(String),
    Invalid(String),
}

impl Fail {
    fn at(self, path: &Path) -> ScannerError {
        let path = path.to_path_buf();
        match self {
            Fail::Incomplete(reason) => ScannerError::Incomplete { path, reason },
            Fail::Invalid(reason) => ScannerError::Invalid { path, reason },
        }
    }
}

type Res<T> = Result<T, Fail>;

fn invalid<T>(reason: impl Into<String>) -> Res<T> {
    Err(Fail::Invalid(reason.into()))
}

fn incomplete<T>(reason: impl Into<String>) -> Res<T> {
    Err(Fail::Incomplete(reason.into()))
}

/// An I/O error on a file the scanner may still be writing or moving: "not there yet" and
/// "locked" are worth retrying, anything else is not.
fn io_fail(what: &str, e: std::io::Error) -> Fail {
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::UnexpectedEof => {
            Fail::Incomplete(format!("{what}: {e}"))
        }
        _ => Fail::Invalid(format!("{what}: {e}")),
    }
}

fn read_text(par: &Path) -> Res<String> {
    let file = File::open(par).map_err(|e| io_fail("cannot open PAR", e))?;
    let mut bytes = Vec::new();
    file.take(MAX_PAR_BYTES + 1).read_to_end(&mut bytes).map_err(|e| io_fail("cannot read PAR", e))?;
    if bytes.len() as u64 > MAX_PAR_BYTES {
        return invalid(format!("PAR text over {} MiB: not a PAR header", MAX_PAR_BYTES >> 20));
    }
    // Patient names may be Latin-1: keep the text, mark the odd bytes.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The PAR layout version, which fixes the number of fields per image line.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    V4,
    V41,
    V42,
}

impl Version {
    fn parse(s: &str) -> Option<Version> {
        match s.to_ascii_uppercase().as_str() {
            "V4" => Some(Version::V4),
            "V4.1" => Some(Version::V41),
            "V4.2" => Some(Version::V42),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Version::V4 => "V4",
            Version::V41 => "V4.1",
            Version::V42 => "V4.2",
        }
    }

    fn fields(self) -> usize {
        match self {
            Version::V4 => 41,
            Version::V41 => 48,
            Version::V42 => 49,
        }
    }
}

/// The general-information fields this reader uses.
#[derive(Debug, Default)]
struct General {
    exam: String,
    protocol: String,
    acq_nr: Option<i64>,
    max_slices: Option<i64>,
    max_dynamics: Option<i64>,
    scan_mode: String,
    tr_ms: Option<f64>,
    angulation: Option<[f64; 3]>,
    off_centre: Option<[f64; 3]>,
}

/// The image-line fields this reader uses (one line per 2-D image in the REC).
#[derive(Clone, Debug)]
struct ImageLine {
    slice: i64,
    dynamic: i64,
    image_type: i64,
    rec_index: i64,
    bits: i64,
    res: [i64; 2],
    intercept: f64,
    slope: f64,
    thickness: f64,
    gap: f64,
    orientation: i64,
    spacing: [f64; 2],
    scan_time: f64,
}

#[derive(Debug)]
struct Header {
    general: General,
    lines: Vec<ImageLine>,
}

/// Splits the PAR text into general info and image lines, after checking it is a whole PAR.
fn parse_header(text: &str) -> Res<Header> {
    let text = text.trim_start_matches('\u{feff}');
    check_start(text)?;
    let Some(end) = text.find(TRAILER) else {
        return incomplete(
            "PAR text ends before its END OF DATA DESCRIPTION FILE line (still being written?)",
        );
    };
    let mut version = None;
    let mut general = General::default();
    let mut lines = Vec::new();
    for (n, raw) in text[..end].lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            if line.to_ascii_lowercase().contains("image export tool") {
                version = line.split_whitespace().last().map(str::to_string);
            }
        } else if let Some(entry) = line.strip_prefix('.') {
            read_general(entry, &mut general)?;
        } else {
            let Some(v) = version.as_deref() else {
                return invalid(format!("line {}: image line before the version line", n + 1));
            };
            let Some(v) = Version::parse(v) else {
                return invalid(format!("unsupported PAR version {v:?} (V4, V4.1 and V4.2 are read)"));
            };
            lines.push(parse_image_line(line, v, n + 1)?);
        }
    }
    match version.as_deref().map(Version::parse) {
        None => invalid("no \"image export tool\" version line: not a PAR V4 header"),
        Some(None) => invalid(format!("unsupported PAR version {:?}", version.unwrap_or_default())),
        Some(Some(_)) if lines.is_empty() => invalid("the PAR has no image lines"),
        Some(Some(_)) => Ok(Header { general, lines }),
    }
}

/// A PAR starts with the DATA DESCRIPTION FILE line; a file that is only the start of that
/// line (or empty) is still being written.
fn check_start(text: &str) -> Res<()> {
    let head = text.trim_start();
    let first = head.lines().next().unwrap_or("");
    if first.to_ascii_uppercase().starts_with(MAGIC) {
        Ok(())
    } else if MAGIC.starts_with(head) {
        incomplete("the PAR is empty or has only part of its first line")
    } else {
        invalid("not a PAR file: it does not start with \"# === DATA DESCRIPTION FILE\"")
    }
}

fn read_general(entry: &str, g: &mut General) -> Res<()> {
    let Some((key, value)) = entry.split_once(':') else {
        return invalid(format!("general info line without ':': {:?}", entry.trim()));
    };
    let key = key.trim().to_ascii_lowercase();
    let value = value.trim();
    let int = || value.parse::<i64>().ok();
    if key.starts_with("examination name") {
        g.exam = value.to_string();
    } else if key.starts_with("protocol name") {
        g.protocol = value.to_string();
    } else if key.starts_with("acquisition nr") {
        g.acq_nr = int();
    } else if key.starts_with("max. number of slices") {
        g.max_slices = int();
    } else if key.starts_with("max. number of dynamics") {
        g.max_dynamics = int();
    } else if key.starts_with("scan mode") {
        g.scan_mode = value.to_string();
    } else if key.starts_with("repetition time") {
        g.tr_ms =
            value.split_whitespace().next().and_then(|t| t.parse().ok()).filter(|t: &f64| t.is_finite());
    } else if key.starts_with("angulation midslice") {
        g.angulation = Some(three_floats(&key, value)?);
    } else if key.starts_with("off centre midslice") {
        g.off_centre = Some(three_floats(&key, value)?);
    }
    Ok(())
}

fn three_floats(key: &str, value: &str) -> Res<[f64; 3]> {
    let v: Vec<f64> = value.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    match v[..] {
        [a, b, c] if v.iter().all(|x| x.is_finite()) => Ok([a, b, c]),
        _ => invalid(format!("general info {key:?}: want three finite numbers, got {value:?}")),
    }
}

/// Field positions in an image line (the same in V4, V4.1 and V4.2).
mod col {
    pub const SLICE: usize = 0;
    pub const DYNAMIC: usize = 2;
    pub const TYPE: usize = 4;
    pub const INDEX: usize = 6;
    pub const BITS: usize = 7;
    pub const RES: usize = 9;
    pub const INTERCEPT: usize = 11;
    pub const SLOPE: usize = 12;
    pub const THICKNESS: usize = 22;
    pub const GAP: usize = 23;
    pub const ORIENTATION: usize = 25;
    pub const SPACING: usize = 28;
    pub const SCAN_TIME: usize = 31;
    /// V4.1's two string fields (contrast type, diffusion anisotropy type).
    pub const STRINGS: [usize; 2] = [43, 44];
}

fn parse_image_line(line: &str, version: Version, n: usize) -> Res<ImageLine> {
    let t: Vec<&str> = line.split_whitespace().collect();
    if t.len() != version.fields() {
        let (got, want, v) = (t.len(), version.fields(), version.name());
        return invalid(format!("line {n}: {got} fields, a {v} image line has {want}"));
    }
    for (i, tok) in t.iter().enumerate() {
        let ok = col::STRINGS.contains(&i) || tok.parse::<f64>().is_ok_and(f64::is_finite);
        if !ok {
            return invalid(format!("line {n}: field {} is {tok:?}, not a finite number", i + 1));
        }
    }
    let int = |i: usize| {
        t[i].parse::<i64>().map_err(|_| Fail::Invalid(format!("line {n}: {:?} is not an integer", t[i])))
    };
    let float = |i: usize| t[i].parse::<f64>().map_err(|_| Fail::Invalid(format!("line {n}: bad number")));
    Ok(ImageLine {
        slice: int(col::SLICE)?,
        dynamic: int(col::DYNAMIC)?,
        image_type: int(col::TYPE)?,
        rec_index: int(col::INDEX)?,
        bits: int(col::BITS)?,
        res: [int(col::RES)?, int(col::RES + 1)?],
        intercept: float(col::INTERCEPT)?,
        slope: float(col::SLOPE)?,
        thickness: float(col::THICKNESS)?,
        gap: float(col::GAP)?,
        orientation: int(col::ORIENTATION)?,
        spacing: [float(col::SPACING)?, float(col::SPACING + 1)?],
        scan_time: float(col::SCAN_TIME)?,
    })
}

/// What to read from the REC, checked against the header before anything is allocated.
#[derive(Debug)]
struct Plan {
    dims: [usize; 3],
    /// Bytes per pixel (1 or 2).
    bytes: usize,
    /// Bytes the REC must have.
    rec_len: u64,
    /// Dynamic numbers, ascending.
    dynamics: Vec<i64>,
    /// Per dynamic, its image lines by slice (slice number − 1).
    images: Vec<Vec<ImageLine>>,
    /// Per dynamic, the scan begin time of its first slice.
    scan_times: Vec<f64>,
    zooms: [f64; 3],
    orientation: i64,
}

impl Plan {
    fn new(h: &Header) -> Res<Plan> {
        let first = &h.lines[0];
        let bits = unique(&h.lines, "image pixel size", |l| l.bits)?;
        let res = unique(&h.lines, "recon resolution", |l| l.res)?;
        let bytes = match bits {
            8 => 1,
            16 => 2,
            b => return invalid(format!("{b}-bit pixels: only 8 and 16 are read")),
        };
        let [nx, ny] = res.map(|r| usize::try_from(r).ok().filter(|&r| r > 0));
        let (Some(nx), Some(ny)) = (nx, ny) else {
            return invalid(format!("recon resolution {} × {}", first.res[0], first.res[1]));
        };
        let n_lines = h.lines.len();
        let image_px = nx.checked_mul(ny).filter(|&p| p <= MAX_VOXELS);
        let Some(image_px) = image_px else {
            return invalid(format!("recon resolution {nx} × {ny} is over {MAX_VOXELS} pixels"));
        };
        let rec_len = (image_px as u64 * bytes as u64).checked_mul(n_lines as u64);
        let Some(rec_len) = rec_len else { return invalid("REC size overflows") };
        check_rec_indices(&h.lines)?;
        let image_type = h.lines.iter().map(|l| l.image_type).min().unwrap_or(0);
        let chosen: Vec<&ImageLine> = h.lines.iter().filter(|l| l.image_type == image_type).collect();
        let (dynamics, images) = group_slices(&chosen, h.general.max_slices)?;
        let nz = images.first().map_or(0, Vec::len);
        let voxels = image_px.checked_mul(nz).filter(|&v| v <= MAX_VOXELS);
        let Some(voxels) = voxels else {
            return invalid(format!("{nx} × {ny} × {nz} voxels is over {MAX_VOXELS}"));
        };
        if voxels.checked_mul(dynamics.len()).is_none_or(|v| v > MAX_TOTAL_VOXELS) {
            return invalid(format!(
                "{} dynamics of {voxels} voxels is over {MAX_TOTAL_VOXELS}",
                dynamics.len()
            ));
        }
        let thickness = unique_f(&chosen, "slice thickness", |l| l.thickness)?;
        let gap = unique_f(&chosen, "slice gap", |l| l.gap)?;
        let spacing = [
            unique_f(&chosen, "pixel spacing x", |l| l.spacing[0])?,
            unique_f(&chosen, "pixel spacing y", |l| l.spacing[1])?,
        ];
        let orientation = unique(&h.lines, "slice orientation", |l| l.orientation)?;
        let zooms = [spacing[0], spacing[1], thickness + gap];
        if zooms.iter().any(|z| *z <= 0.0) {
            return invalid(format!("voxel size {zooms:?} mm is not positive"));
        }
        let scan_times = images.iter().map(|d| d.first().map_or(0.0, |l| l.scan_time)).collect();
        Ok(Plan { dims: [nx, ny, nz], bytes, rec_len, dynamics, images, scan_times, zooms, orientation })
    }
}

/// The one value a field takes on every line (nibabel refuses varying geometry too).
fn unique<T: PartialEq + Copy + std::fmt::Debug>(
    lines: &[ImageLine],
    what: &str,
    f: impl Fn(&ImageLine) -> T,
) -> Res<T> {
    let v = f(&lines[0]);
    match lines.iter().map(&f).find(|x| *x != v) {
        None => Ok(v),
        Some(w) => invalid(format!("{what} varies between images ({v:?} and {w:?})")),
    }
}

fn unique_f(lines: &[&ImageLine], what: &str, f: impl Fn(&ImageLine) -> f64) -> Res<f64> {
    let v = f(lines[0]);
    match lines.iter().map(|l| f(l)).find(|x| *x != v) {
        None => Ok(v),
        Some(w) => invalid(format!("{what} varies between images ({v} and {w})")),
    }
}

/// Every image line names its own place in the REC: all different, all inside it.
fn check_rec_indices(lines: &[ImageLine]) -> Res<()> {
    let mut seen = vec![false; lines.len()];
    for l in lines {
        let slot = usize::try_from(l.rec_index).ok().and_then(|i| seen.get_mut(i));
        match slot {
            Some(s) if !*s => *s = true,
            Some(_) => return invalid(format!("REC index {} is used twice", l.rec_index)),
            None => return invalid(format!("REC index {} is outside 0..{}", l.rec_index, lines.len())),
        }
    }
    Ok(())
}

/// Groups the chosen lines by dynamic, each dynamic needing exactly slices 1..=n once.
fn group_slices(lines: &[&ImageLine], max_slices: Option<i64>) -> Res<(Vec<i64>, Vec<Vec<ImageLine>>)> {
    if let Some(l) = lines.iter().find(|l| l.dynamic < 1 || l.slice < 1) {
        return invalid(format!("slice {} of dynamic {}: numbers start at 1", l.slice, l.dynamic));
    }
    let n = lines.iter().map(|l| l.slice).max().unwrap_or(0);
    if max_slices.is_some_and(|m| m != n) {
        return invalid(format!("{n} slices but the header says {}", max_slices.unwrap_or(0)));
    }
    let mut by_dyn: BTreeMap<i64, Vec<Option<ImageLine>>> =
        lines.iter().map(|l| (l.dynamic, Vec::new())).collect();
    let n_slices = usize::try_from(n).unwrap_or(usize::MAX);
    if n_slices.checked_mul(by_dyn.len()) != Some(lines.len()) {
        return invalid(format!(
            "{} images for {} dynamics of {n} slices: slices are missing or repeated \
             (several echoes, cardiac phases or labels per dynamic are not read)",
            lines.len(),
            by_dyn.len()
        ));
    }
    for l in lines {
        let slots = by_dyn.entry(l.dynamic).or_default();
        slots.resize(n_slices, None);
        let slot = &mut slots[(l.slice - 1) as usize];
        if slot.is_some() {
            return invalid(format!("slice {} of dynamic {} appears twice", l.slice, l.dynamic));
        }
        *slot = Some((*l).clone());
    }
    let mut dynamics = Vec::with_capacity(by_dyn.len());
    let mut images = Vec::with_capacity(by_dyn.len());
    for (d, slots) in by_dyn {
        let Some(full) = slots.into_iter().collect::<Option<Vec<_>>>() else {
            return invalid(format!("dynamic {d} lacks some of slices 1..{n_slices}"));
        };
        dynamics.push(d);
        images.push(full);
    }
    Ok((dynamics, images))
}

/// The REC beside the PAR: same stem, extension in the PAR's case first.
fn find_rec(par: &Path) -> Res<PathBuf> {
    let upper = par.extension().and_then(|e| e.to_str()).is_some_and(|e| e == "PAR");
    let exts = if upper { ["REC", "rec", "Rec"] } else { ["rec", "REC", "Rec"] };
    match exts.iter().map(|e| par.with_extension(e)).find(|p| p.is_file()) {
        Some(p) => Ok(p),
        None => incomplete("no REC file beside the PAR yet"),
    }
}

/// Reads each chosen image from its place in the REC and scales it to display values.
fn read_rec(rec: &Path, plan: &Plan) -> Res<Vec<Vec<f32>>> {
    let mut file = File::open(rec).map_err(|e| io_fail("cannot open REC", e))?;
    let len = file.metadata().map_err(|e| io_fail("cannot stat REC", e))?.len();
    if len < plan.rec_len {
        return incomplete(format!("REC has {len} of {} bytes (still being written?)", plan.rec_len));
    }
    if len > plan.rec_len {
        return invalid(format!("REC has {len} bytes, the PAR describes {}", plan.rec_len));
    }
    let [nx, ny, nz] = plan.dims;
    let px = nx * ny;
    let mut buf = vec![0u8; px * plan.bytes];
    let mut out = Vec::with_capacity(plan.images.len());
    for images in &plan.images {
        let mut data = vec![0f32; px * nz];
        for (plane, line) in data.chunks_exact_mut(px).zip(images) {
            let at = line.rec_index as u64 * buf.len() as u64;
            file.seek(SeekFrom::Start(at)).map_err(|e| io_fail("cannot seek REC", e))?;
            file.read_exact(&mut buf).map_err(|e| io_fail("cannot read REC", e))?;
            scale_into(&buf, plan.bytes, line, plane);
        }
        out.push(data);
    }
    Ok(out)
}

/// Display value DV = PV × RS + RI, computed in f64 like nibabel, stored as f32.
fn scale_into(raw: &[u8], bytes: usize, line: &ImageLine, out: &mut [f32]) {
    let (rs, ri) = (line.slope, line.intercept);
    if bytes == 1 {
        out.iter_mut().zip(raw).for_each(|(o, &b)| *o = (f64::from(b) * rs + ri) as f32);
    } else {
        for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
            *o = (f64::from(u16::from_le_bytes([c[0], c[1]])) * rs + ri) as f32;
        }
    }
}

type M3 = [[f64; 3]; 3];

fn mul(a: &M3, b: &M3) -> M3 {
    let mut c = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

fn apply(a: &M3, v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| (0..3).map(|k| a[i][k] * v[k]).sum())
}

/// Philips patient axes (P, S, L) — the order of the header's (ap, fh, rl) — to RAS+.
const PSL_TO_RAS: M3 = [[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];

/// Voxel axes to PSL for a slice orientation (1 transverse, 2 sagittal, 3 coronal), as found
/// by nibabel from datasets of known orientation.
fn voxel_to_psl(orientation: i64) -> Option<M3> {
    match orientation {
        1 => Some([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
        2 => Some([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]),
        3 => Some([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]),
        _ => None,
    }
}

/// The rotation of the midslice angulation (ap, fh, rl in degrees), composed as rl · ap · fh
/// (nibabel's order, found by matching scanner-converted NIfTI).
fn angulation_matrix([ap, fh, rl]: [f64; 3]) -> M3 {
    let (sx, cx) = ap.to_radians().sin_cos();
    let (sy, cy) = fh.to_radians().sin_cos();
    let (sz, cz) = rl.to_radians().sin_cos();
    let mx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
    let my = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let mz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
    mul(&mul(&mz, &mx), &my)
}

/// Voxel centres to scanner RAS+ mm: centre the grid, scale by the zooms, permute to PSL,
/// rotate by the angulation, shift by the off-centre, then PSL → RAS.
fn affine(plan: &Plan, g: &General) -> Res<Affine> {
    let Some(perm) = voxel_to_psl(plan.orientation) else {
        return invalid(format!("slice orientation {} (want 1 TRA, 2 SAG or 3 COR)", plan.orientation));
    };
    let (Some(angulation), Some(off_centre)) = (g.angulation, g.off_centre) else {
        return invalid("the general info lacks the midslice angulation or off-centre");
    };
    let [zx, zy, zz] = plan.zooms;
    let zoom = [[zx, 0.0, 0.0], [0.0, zy, 0.0], [0.0, 0.0, zz]];
    let psl = mul(&angulation_matrix(angulation), &mul(&perm, &zoom));
    let to_centre = plan.dims.map(|n| -(n as f64 - 1.0) / 2.0);
    let shift = apply(&psl, to_centre);
    let t = apply(&PSL_TO_RAS, [0, 1, 2].map(|i| shift[i] + off_centre[i]));
    let lin = mul(&PSL_TO_RAS, &psl);
    let mut a = [[0.0, 0.0, 0.0, 1.0]; 4];
    for r in 0..3 {
        a[r] = [lin[r][0], lin[r][1], lin[r][2], t[r]];
    }
    Ok(a)
}

/// TR in seconds from "Repetition time [ms]". Under 10 it cannot be a 2-D volume TR in ms:
/// XTC real-time exports write seconds there (Pyneal's Philips data says 1 for its 1000 ms TR,
/// its dynamics begin 1 s apart), so it is taken as seconds; 3-D scans keep milliseconds.
fn tr_seconds(g: &General) -> Option<f64> {
    let t = g.tr_ms.filter(|t| *t > 0.0)?;
    if t < 10.0 && !g.scan_mode.eq_ignore_ascii_case("3D") {
        Some(t)
    } else {
        Some(t / 1000.0)
    }
}

/// Exam, protocol and acquisition number; in a one-volume-per-file export the acquisition
/// number counts volumes, so the folder (one per series in XTC exports) stands in for it.
fn series_name(par: &Path, g: &General, per_file: bool) -> String {
    if per_file {
        let dir = par.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        format!("philips:{}:{}:dir={}", g.exam, g.protocol, dir.unwrap_or_default())
    } else {
        format!("philips:{}:{}:acq{}", g.exam, g.protocol, g.acq_nr.unwrap_or(0))
    }
}

/// The number ending the file stem (`Dump-0007` → 7), else "Acquisition nr" − 1, else 0.
fn file_index(par: &Path, g: &General) -> u64 {
    let stem = par.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default();
    let digits = &stem[stem.trim_end_matches(|c: char| c.is_ascii_digit()).len()..];
    let from_acq = g.acq_nr.filter(|&a| a >= 1).map(|a| a.unsigned_abs() - 1);
    digits.parse::<u64>().ok().or(from_acq).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real XTC export from Pyneal's test data (80 × 80 × 15, 3 × 3 × 4 mm, TR 1 s).
    fn dump(n: usize) -> PathBuf {
        let root = std::env::var_os("MIRAGE_SHARED_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
        root.join(format!("pyneal-scanner-formats/Philips_env/funcData/0001/Dump-{n:04}.par"))
    }

    fn par_text(n: usize) -> String {
        std::fs::read_to_string(dump(n)).unwrap()
    }

    fn rec_bytes(n: usize) -> Vec<u8> {
        std::fs::read(dump(n).with_extension("rec")).unwrap()
    }

    /// `text` with every image line's fields passed through `f`.
    fn map_image_lines(text: &str, f: impl Fn(&mut Vec<String>)) -> String {
        let mut out = String::new();
        for line in text.lines() {
            if line.trim().is_empty() || line.starts_with('#') || line.starts_with('.') {
                out.push_str(line);
            } else {
                let mut t: Vec<String> = line.split_whitespace().map(str::to_string).collect();
                f(&mut t);
                out.push_str(&t.join(" "));
            }
            out.push('\n');
        }
        out
    }

    /// `text` with the general-info line starting `key` set to `value`.
    fn set_general(text: &str, key: &str, value: &str) -> String {
        let map = |l: &str| match l.split_once(':') {
            Some((k, _)) if l.starts_with(&format!(".    {key}")) => format!("{k}:   {value}"),
            _ => l.to_string(),
        };
        text.lines().map(map).collect::<Vec<_>>().join("\n") + "\n"
    }

    fn write_pair(dir: &Path, name: &str, par: &str, rec: Option<&[u8]>) -> PathBuf {
        let p = dir.join(format!("{name}.par"));
        std::fs::write(&p, par).unwrap();
        if let Some(rec) = rec {
            std::fs::write(p.with_extension("rec"), rec).unwrap();
        }
        p
    }

    fn assert_affine(got: &Affine, want: &Affine) {
        for r in 0..4 {
            for c in 0..4 {
                assert!((got[r][c] - want[r][c]).abs() < 1e-4, "affine[{r}][{c}]: {got:?} vs {want:?}");
            }
        }
    }

    fn is_incomplete(r: Result<Vec<ScannedVolume>, ScannerError>) -> bool {
        matches!(r, Err(ScannerError::Incomplete { .. }))
    }

    fn is_invalid(r: Result<Vec<ScannedVolume>, ScannerError>) -> bool {
        matches!(r, Err(ScannerError::Invalid { .. }))
    }

    /// nibabel 5 `nib.load(par).affine` of every dump (the general info has no angulation).
    const NIBABEL_AFFINE: Affine =
        [[-3.0, 0.0, 0.0, 118.5], [0.0, -3.0, 0.0, 118.5], [0.0, 0.0, 4.0, -28.0], [0.0, 0.0, 0.0, 1.0]];

    /// nibabel's `get_fdata()` of image type 16 (the magnitude) per dump: the whole-volume sum
    /// and the values at (0,0,0), (40,40,7), (10,20,3), (79,0,14), (33,57,11).
    const NIBABEL_VALUES: [(f64, [f64; 5]); 4] = [
        (30536771.029548, [0.0, 1191.6854700854703, 1.367032967032968, 0.0, 1198.4908424908422]),
        (30090302.531868, [0.0, 1228.4498168498174, 3.602442002442, 0.0, 1168.6244200244205]),
        (29853670.903297, [0.0, 1185.0358974358974, 5.359706959706964, 0.0, 1149.350183150184]),
        (29816092.446886, [0.0, 1234.0393162393152, 2.2478632478632496, 0.0, 1161.3435897435902]),
    ];
    const POINTS: [[usize; 3]; 5] = [[0, 0, 0], [40, 40, 7], [10, 20, 3], [79, 0, 14], [33, 57, 11]];

    #[test]
    fn real_dumps_match_nibabel() {
        let mut series = Vec::new();
        for (n, (sum, values)) in NIBABEL_VALUES.iter().enumerate() {
            let vols = read_par(&dump(n)).unwrap();
            assert_eq!(vols.len(), 1);
            let v = &vols[0].volume;
            assert_eq!(v.dims, [80, 80, 15]);
            assert_eq!(v.data.len(), 80 * 80 * 15);
            assert_eq!(v.voxel_size(), [3.0, 3.0, 4.0]);
            assert_affine(&v.affine, &NIBABEL_AFFINE);
            let got_sum: f64 = v.data.iter().map(|&x| f64::from(x)).sum();
            assert!((got_sum - sum).abs() < 1e-6 * sum, "dump {n}: sum {got_sum} vs {sum}");
            for ([i, j, k], want) in POINTS.iter().zip(values) {
                let got = f64::from(v.data[i + 80 * (j + 80 * k)]);
                assert!((got - want).abs() <= 1e-6 * want.abs(), "dump {n} ({i},{j},{k}): {got} vs {want}");
            }
            assert_eq!(v.index, n as u64);
            assert_eq!(v.tr, Some(1.0));
            assert_eq!(v.run, "run");
            assert_eq!(vols[0].scanner_time, Some(n as f64));
            series.push(vols[0].series.clone());
        }
        assert!(series.iter().all(|s| *s == series[0]), "{series:?}");
        assert_eq!(series[0], "philips:::dir=0001");
    }

    #[test]
    fn angulated_tra_sag_cor_affines_match_nibabel() {
        // Dump-0000 with midslice angulation (-1.3, -3.9, -0.1)°, off-centre (-15.8, 42.3,
        // 1.1) mm, slice gap 0.5 mm and each slice orientation; nibabel's affines.
        let want: [(i64, Affine); 3] = [
            (
                1,
                [
                    [-2.99228245261, -0.203993352491, 0.102093001078, 124.43824329393],
                    [0.203927045761, -2.993056357401, -0.007851956106, 126.025571502501],
                    [0.068260411727, -0.000594610305, 4.498834889826, 8.135356615048],
                    [0.0, 0.0, 0.0, 1.0],
                ],
            ),
            (
                2,
                [
                    [-0.203993352491, -0.068062000718, 4.488423678915, -21.772779300654],
                    [-2.993056357401, 0.005234637404, -0.305890568642, 135.960191920377],
                    [-0.000594610305, -2.999223259884, -0.10239061759, 161.509540195593],
                    [0.0, 0.0, 0.0, 1.0],
                ],
            ),
            (
                3,
                [
                    [-2.99228245261, -0.068062000718, -0.305990028736, 121.925536107621],
                    [0.203927045761, 0.005234637404, -4.489584536101, 38.965205267676],
                    [0.068260411727, -2.999223259884, -0.000891915457, 158.07927591041],
                    [0.0, 0.0, 0.0, 1.0],
                ],
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let base = set_general(&par_text(0), "Angulation midslice", "-1.3  -3.9  -0.1");
        let base = set_general(&base, "Off Centre midslice", "-15.8  42.3  1.1");
        for (orient, affine) in want {
            let text = map_image_lines(&base, |t| {
                t[col::GAP] = "0.5".into();
                t[col::ORIENTATION] = orient.to_string();
            });
            let p = write_pair(dir.path(), &format!("o{orient}"), &text, Some(&rec_bytes(0)));
            let vols = read_par(&p).unwrap();
            assert_affine(&vols[0].volume.affine, &affine);
        }
    }

    #[test]
    fn non_square_images_keep_nibabels_axes() {
        // Dump-0000 relabelled 160 × 40 (same bytes per image): x is the REC's fastest axis.
        let text = map_image_lines(&par_text(0), |t| {
            t[col::RES] = "160".into();
            t[col::RES + 1] = "40".into();
        });
        let dir = tempfile::tempdir().unwrap();
        let p = write_pair(dir.path(), "rect", &text, Some(&rec_bytes(0)));
        let v = &read_par(&p).unwrap()[0].volume;
        assert_eq!(v.dims, [160, 40, 15]);
        let want = [
            ([150, 3, 7], 0.92991452991453),
            ([7, 30, 2], 5.734798534798536),
            ([100, 20, 12], 76.83223443223442),
        ];
        for ([i, j, k], want) in want {
            let got = f64::from(v.data[i + 160 * (j + 40 * k)]);
            assert!((got - want).abs() <= 1e-6 * want, "({i},{j},{k}): {got} vs nibabel {want}");
        }
        let affine =
            [[-3.0, 0.0, 0.0, 238.5], [0.0, -3.0, 0.0, 58.5], [0.0, 0.0, 4.0, -28.0], [0.0, 0.0, 0.0, 1.0]];
        assert_affine(&v.affine, &affine);
    }

    #[test]
    fn several_dynamics_come_out_in_dynamic_order() {
        // Dump-0001's images appended as dynamic 2, its lines listed first.
        let dyn2 = map_image_lines(&par_text(1), |t| {
            t[col::DYNAMIC] = "2".into();
            t[col::INDEX] = (t[col::INDEX].parse::<usize>().unwrap() + 30).to_string();
        });
        let lines = |s: &str| -> Vec<String> {
            s.lines().filter(|l| l.starts_with(|c: char| c.is_ascii_digit())).map(str::to_string).collect()
        };
        let text0 = set_general(&par_text(0), "Max. number of dynamics", "2");
        let first = text0.lines().position(|l| l.starts_with(|c: char| c.is_ascii_digit())).unwrap();
        let mut all: Vec<String> = text0.lines().map(str::to_string).collect();
        for (i, l) in lines(&dyn2).into_iter().enumerate() {
            all.insert(first + i, l);
        }
        let mut rec = rec_bytes(0);
        rec.extend(rec_bytes(1));
        let dir = tempfile::tempdir().unwrap();
        let p = write_pair(dir.path(), "multi", &(all.join("\n") + "\n"), Some(&rec));
        let vols = read_par(&p).unwrap();
        assert_eq!(vols.len(), 2);
        for (n, v) in vols.iter().enumerate() {
            assert_eq!(v.volume.index, n as u64);
            assert_eq!(v.series, "philips:::acq1");
            assert_eq!(v.volume.data, read_par(&dump(n)).unwrap()[0].volume.data);
        }
    }

    #[test]
    fn index_falls_back_to_file_name_then_acquisition_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_pair(dir.path(), "Dump-0007", &par_text(2), Some(&rec_bytes(2)));
        assert_eq!(read_par(&p).unwrap()[0].volume.index, 7);
        let p = write_pair(dir.path(), "volume", &par_text(2), Some(&rec_bytes(2)));
        assert_eq!(read_par(&p).unwrap()[0].volume.index, 2, "acquisition nr 3 - 1");
    }

    #[test]
    fn upper_case_extensions_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("Dump-0003.PAR");
        std::fs::write(&p, par_text(3)).unwrap();
        std::fs::write(dir.path().join("Dump-0003.REC"), rec_bytes(3)).unwrap();
        assert_eq!(read_par(&p).unwrap()[0].volume.index, 3);
    }

    #[test]
    fn rec_short_by_one_byte_or_missing_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let rec = rec_bytes(0);
        let p = write_pair(dir.path(), "short", &par_text(0), Some(&rec[..rec.len() - 1]));
        assert!(is_incomplete(read_par(&p)));
        let p = write_pair(dir.path(), "none", &par_text(0), None);
        assert!(is_incomplete(read_par(&p)));
        let mut long = rec.clone();
        long.push(0);
        let p = write_pair(dir.path(), "long", &par_text(0), Some(&long));
        assert!(is_invalid(read_par(&p)));
    }

    #[test]
    fn par_cut_off_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let text = par_text(0);
        let trailer = text.find("# === END OF DATA").unwrap();
        for cut in [0, 10, text.len() / 2, text.len() - 300, trailer] {
            let p = write_pair(dir.path(), &format!("cut{cut}"), &text[..cut], Some(&rec_bytes(0)));

            assert!(is_incomplete(read_par(&p)), "cut at {cut}");
        }
        assert!(is_incomplete(read_par(&dir.path().join("absent.par"))));
    }

    #[test]
    fn malformed_pars_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let rec = rec_bytes(0);
        let text = par_text(0);
        let check = |name: &str, par: &str| {
            let p = write_pair(dir.path(), name, par, Some(&rec));
            let r = read_par(&p);
            assert!(is_invalid(r), "{name}");
        };
        check(
            "random",
            "lorem ipsum dolor sit amet\nconsectetur 1 2 3\n# === END OF DATA DESCRIPTION FILE\n",
        );
        check("binary", "\u{0}\u{1}\u{2}garbage");
        check("version", &text.replace("V4.2", "V3"));
        check("nan", &map_image_lines(&text, |t| t[col::SLOPE] = "NaN".into()));
        check("inf", &map_image_lines(&text, |t| t[col::INTERCEPT] = "inf".into()));
        check("fields", &map_image_lines(&text, |t| t.truncate(40)));
        check("slices", &map_image_lines(&text, |t| t[col::SLICE] = "1".into()));
        check("index", &map_image_lines(&text, |t| t[col::INDEX] = "30".into()));
        check("bits", &map_image_lines(&text, |t| t[col::BITS] = "12".into()));
        check("orient", &map_image_lines(&text, |t| t[col::ORIENTATION] = "4".into()));
        check("max", &set_general(&text, "Max. number of slices", "16"));
        check(
            "twice",
            &map_image_lines(&text, |t| {
                if t[col::SLICE] == "2" {
                    t[col::SLICE] = "1".into();
                }
            }),
        );
        check("echoes", &map_image_lines(&text, |t| t[col::TYPE] = "0".into()));
    }

    #[test]
    fn huge_resolution_is_invalid_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        for res in ["100000", "4294967296", "9223372036854775807"] {
            let text = map_image_lines(&par_text(0), |t| {
                t[col::RES] = res.into();
                t[col::RES + 1] = res.into();
            });
            // No REC at all: the sizes are refused before it is looked for.
            let p = write_pair(dir.path(), &format!("huge{}", res.len()), &text, None);

            assert!(is_invalid(read_par(&p)), "{res}");
        }
        // 8192 × 8192 pixels per slice fits, but not 15 slices of them.
        let text = map_image_lines(&par_text(0), |t| {
            t[col::RES] = "8192".into();
            t[col::RES + 1] = "8192".into();
        });
        let p = write_pair(dir.path(), "big", &text, None);

        assert!(is_invalid(read_par(&p)));
    }
}
