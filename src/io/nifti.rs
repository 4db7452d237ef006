//! NIfTI-1 single-file images (`.nii`, `.nii.gz`): read any of the common sample types as f32,
//! write float32.
//!
//! Our own reader rather than a crate's, because a scanner daemon must refuse a header that
//! declares huge dimensions *before* allocating, read a 4-D series one volume at a time (file
//! replay), and report every defect as a value. The affine follows nibabel's rules: sform if its
//! code is set, else qform, else the centred pixdim diagonal with x flipped.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::volume::{affine_det3, voxel_size, Affine, Dtype, Endian, Volume};

/// Size of the NIfTI-1 header in bytes.
pub const HEADER_SIZE: usize = 348;

/// NIfTI-1 datatype codes of the sample types we read and write.
const NIFTI_TYPES: [(i16, Dtype); 8] = [
    (2, Dtype::U8),
    (4, Dtype::I16),
    (8, Dtype::I32),
    (16, Dtype::F32),
    (64, Dtype::F64),
    (256, Dtype::I8),
    (512, Dtype::U16),
    (768, Dtype::U32),
];

/// Why a NIfTI file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NiftiError {
    /// The file could not be opened, read or written.
    #[error("nifti: {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// The header is not a valid single-file NIfTI-1 header.
    #[error("nifti: {path}: bad header: {reason}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The header declares more voxels than the configured limit.
    #[error("nifti: {path}: {voxels} voxels per volume exceeds the limit of {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Voxels the header declares per volume.
        voxels: u128,
        /// The configured maximum.
        limit: usize,
    },
    /// The file ends before the data the header declares.
    #[error("nifti: {path}: truncated: volume {volume} of {n_volumes} is incomplete")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The volume that could not be read (0-based).
        volume: usize,
        /// Volumes the header declares.
        n_volumes: usize,
    },
    /// Data handed to the writer does not match its declared shape.
    #[error("nifti: {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The fields of a NIfTI-1 header that mirage-rt uses.
#[derive(Clone, Debug, PartialEq)]
pub struct NiftiHeader {
    /// `dim[1..=dim[0]]`: the image shape.
    pub dims: Vec<usize>,
    /// Sample type of the data.
    pub dtype: Dtype,
    /// Byte order of the header and data.
    pub endian: Endian,
    /// `pixdim[0..8]` as stored (`pixdim[0]` is qfac).
    pub pixdim: [f32; 8],
    /// Byte offset of the data in the (decompressed) file.
    pub vox_offset: usize,
    /// Data scaling slope (0 or non-finite: none).
    pub scl_slope: f32,
    /// Data scaling intercept.
    pub scl_inter: f32,
    /// Spatial and temporal units code.
    pub xyzt_units: u8,
    /// qform code (0: none).
    pub qform_code: i16,
    /// sform code (0: none).
    pub sform_code: i16,
    /// Quaternion b, c, d and offsets x, y, z.
    pub quatern: [f32; 6],
    /// sform rows x, y, z.
    pub srow: [[f32; 4]; 3],
}

impl NiftiHeader {
    /// Parses a 348-byte header (either byte order), checking every field it relies on.
    pub fn parse(bytes: &[u8]) -> Result<NiftiHeader, String> {
        if bytes.len() < HEADER_SIZE {
            return Err(format!("{} bytes, a header needs {HEADER_SIZE}", bytes.len()));
        }
        let le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let endian = if le == 348 {
            Endian::Little
        } else if i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == 348 {
            Endian::Big
        } else {
            return Err(format!("sizeof_hdr is {le}, not 348 (not a NIfTI-1 file)"));
        };
        let r = Fields { b: bytes, endian };
        match &bytes[344..348] {
            b"n+1\0" => {}
            b"ni1\0" => return Err("a .hdr/.img pair; only single-file .nii is supported".into()),
            m => return Err(format!("magic {m:?} is not \"n+1\"")),
        }
        let ndim = r.i16(40);
        if !(1..=7).contains(&ndim) {
            return Err(format!("dim[0] = {ndim}, must be 1..7"));
        }
        let mut dims = Vec::with_capacity(ndim as usize);
        for d in 0..ndim as usize {
            let v = r.i16(42 + 2 * d);
            if v < 1 {
                return Err(format!("dim[{}] = {v}, must be positive", d + 1));
            }
            dims.push(v as usize);
        }
        let code = r.i16(70);
        let dtype = NIFTI_TYPES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, d)| *d)
            .ok_or(format!("datatype code {code} is not supported"))?;
        let bitpix = r.i16(72);
        if bitpix as usize != dtype.size() * 8 {
            return Err(format!("bitpix {bitpix} does not match datatype {dtype}"));
        }
        let mut pixdim = [0f32; 8];
        for (i, p) in pixdim.iter_mut().enumerate() {
            *p = r.f32(76 + 4 * i);
        }
        let vox_offset = r.f32(108);
        if !vox_offset.is_finite() || vox_offset < HEADER_SIZE as f32 || vox_offset > 1e9 {
            return Err(format!("vox_offset {vox_offset} is not a valid data offset"));
        }
        let mut quatern = [0f32; 6];
        for (i, q) in quatern.iter_mut().enumerate() {
            *q = r.f32(256 + 4 * i);
        }
        let mut srow = [[0f32; 4]; 3];
        for (row, s) in srow.iter_mut().enumerate() {
            for (col, v) in s.iter_mut().enumerate() {
                *v = r.f32(280 + 16 * row + 4 * col);
            }
        }
        Ok(NiftiHeader {
            dims,
            dtype,
            endian,
            pixdim,
            vox_offset: vox_offset as usize,
            scl_slope: r.f32(112),
            scl_inter: r.f32(116),
            xyzt_units: bytes[123],
            qform_code: r.i16(252),
            sform_code: r.i16(254),
            quatern,
            srow,
        })
    }

    /// The spatial grid `[x, y, z]` (missing dimensions are 1).
    pub fn volume_dims(&self) -> [usize; 3] {
        let d = |i: usize| self.dims.get(i).copied().unwrap_or(1);
        [d(0), d(1), d(2)]
    }

    /// Number of 3-D volumes (the product of dimensions 4 to 7).
    pub fn n_volumes(&self) -> usize {
        self.dims.iter().skip(3).product()
    }

    /// Voxels in one volume, computed without overflow.
    pub fn voxels_per_volume(&self) -> u128 {
        self.volume_dims().iter().map(|&d| d as u128).product()
    }

    /// Repetition time in seconds from `pixdim[4]` and the time unit, when the file has one.
    pub fn tr_seconds(&self) -> Option<f64> {
        let tr = f64::from(self.pixdim[4]);
        if !(tr.is_finite() && tr > 0.0) || self.dims.len() < 4 {
            return None;
        }
        Some(match self.xyzt_units & 0x38 {
            16 => tr / 1e3,
            24 => tr / 1e6,
            _ => tr,
        })
    }

    /// The voxel-to-world matrix, following nibabel's choice of sform, qform or fallback.
    pub fn affine(&self) -> Affine {
        let f = |v: f32| f64::from(v);
        if self.sform_code > 0 {
            let s = &self.srow;
            return [
                [f(s[0][0]), f(s[0][1]), f(s[0][2]), f(s[0][3])],
                [f(s[1][0]), f(s[1][1]), f(s[1][2]), f(s[1][3])],
                [f(s[2][0]), f(s[2][1]), f(s[2][2]), f(s[2][3])],
                [0.0, 0.0, 0.0, 1.0],
            ];
        }
        let zooms =
            [f(self.pixdim[1]), f(self.pixdim[2]), f(self.pixdim[3])].map(|z| if z > 0.0 { z } else { 1.0 });
        if self.qform_code > 0 {
            let [b, c, d, x, y, z] = self.quatern.map(f);
            let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
            let rot = [
                [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
                [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
                [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
            ];
            let qfac = if self.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
            let scale = [zooms[0], zooms[1], zooms[2] * qfac];
            let mut out = [[0.0; 4]; 4];
            for r in 0..3 {
                for col in 0..3 {
                    out[r][col] = rot[r][col] * scale[col];
                }
            }
            out[0][3] = x;
            out[1][3] = y;
            out[2][3] = z;
            out[3][3] = 1.0;
            return out;
        }
        // nibabel's base affine: x flipped, origin at the grid centre.
        let dims = self.volume_dims();
        let origin = |i: usize| (dims[i] as f64 - 1.0) / 2.0;
        [
            [-zooms[0], 0.0, 0.0, origin(0) * zooms[0]],
            [0.0, zooms[1], 0.0, -origin(1) * zooms[1]],
            [0.0, 0.0, zooms[2], -origin(2) * zooms[2]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    /// Scaling to apply to stored values, if the header asks for one.
    fn scaling(&self) -> Option<(f32, f32)> {
        let (s, i) = (self.scl_slope, self.scl_inter);
        if s == 0.0 || !s.is_finite() || !i.is_finite() || (s == 1.0 && i == 0.0) {
            None
        } else {
            Some((s, i))
        }
    }
}

struct Fields<'a> {
    b: &'a [u8],
    endian: Endian,
}

impl Fields<'_> {
    fn i16(&self, at: usize) -> i16 {
        let b = [self.b[at], self.b[at + 1]];
        match self.endian {
            Endian::Little => i16::from_le_bytes(b),
            Endian::Big => i16::from_be_bytes(b),
        }
    }
    fn f32(&self, at: usize) -> f32 {
        let b = [self.b[at], self.b[at + 1], self.b[at + 2], self.b[at + 3]];
        match self.endian {
            Endian::Little => f32::from_le_bytes(b),
            Endian::Big => f32::from_be_bytes(b),
        }
    }
}

/// Reads a NIfTI series one volume at a time, in order.
pub struct NiftiReader {
    path: PathBuf,
    header: NiftiHeader,
    reader: Box<dyn Read + Send>,
    next: usize,
    raw: Vec<u8>,
}

impl std::fmt::Debug for NiftiReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NiftiReader").field("path", &self.path).field("next", &self.next).finish()
    }
}

impl NiftiReader {
    /// Opens `path` (gzip detected from its content) and validates the header; volumes larger
    /// than `max_voxels` are refused before anything is allocated for them.
    pub fn open(path: impl AsRef<Path>, max_voxels: usize) -> Result<NiftiReader, NiftiError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| NiftiError::Io { path: path.clone(), source };
        let mut file = File::open(&path).map_err(io)?;
        let mut magic = [0u8; 2];
        let n = file.read(&mut magic).map_err(io)?;
        let file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let gz = n == 2 && magic == [0x1f, 0x8b];
        let mut reader: Box<dyn Read + Send> = if gz {
            Box::new(BufReader::with_capacity(1 << 20, MultiGzDecoder::new(BufReader::new(file))))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, file))
        };
        let mut hdr = [0u8; HEADER_SIZE];
        reader.read_exact(&mut hdr).map_err(|e| NiftiError::Header {
            path: path.clone(),
            reason: format!("cannot read 348 header bytes: {e}"),
        })?;
        let header =
            NiftiHeader::parse(&hdr).map_err(|reason| NiftiError::Header { path: path.clone(), reason })?;
        let voxels = header.voxels_per_volume();
        if voxels > max_voxels as u128 {
            return Err(NiftiError::TooLarge { path, voxels, limit: max_voxels });
        }
        if !gz {
            let need =
                header.vox_offset as u128 + voxels * header.n_volumes() as u128 * header.dtype.size() as u128;
            if u128::from(file_len) < need {
                return Err(NiftiError::Header {
                    path,
                    reason: format!("file has {file_len} bytes, the header declares {need}"),
                });
            }
        }
        // Skip extensions up to the data offset.
        let skip = header.vox_offset - HEADER_SIZE;
        std::io::copy(&mut (&mut reader).take(skip as u64), &mut std::io::sink()).map_err(io)?;
        Ok(NiftiReader { path, header, reader, next: 0, raw: Vec::new() })
    }

    /// The parsed header.
    pub fn header(&self) -> &NiftiHeader {
        &self.header
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next volume as a [`Volume`] of run `run` numbered `index`, with the header's
    /// grid, affine, TR and sample type (the offline commands' input), or `None` after the last.
    pub fn next_volume(&mut self, index: u64, run: &str) -> Result<Option<Volume>, NiftiError> {
        let h = &self.header;
        let (dims, affine, tr, dtype) = (h.volume_dims(), h.affine(), h.tr_seconds(), h.dtype);
        Ok(self.read_volume()?.map(|data| Volume {
            data,
            dims,
            affine,
            index,
            run: run.to_string(),
            tr,
            acq_time: None,
            recv_time: 0.0,
            dtype,
        }))
    }

    /// Reads the next volume as f32 (scaling applied), or `None` after the last one.
    pub fn read_volume(&mut self) -> Result<Option<Vec<f32>>, NiftiError> {
        let n_volumes = self.header.n_volumes();
        if self.next >= n_volumes {
            return Ok(None);
        }
        let n = self.header.voxels_per_volume() as usize;
        let dtype = self.header.dtype;
        self.raw.resize(n * dtype.size(), 0);
        if self.reader.read_exact(&mut self.raw).is_err() {
            return Err(NiftiError::Truncated { path: self.path.clone(), volume: self.next, n_volumes });
        }
        let mut out = vec![0f32; n];
        dtype.decode_into(self.header.endian, &self.raw, &mut out).ok_or_else(|| NiftiError::Header {
            path: self.path.clone(),
            reason: "sample size mismatch".into(),
        })?;
        if let Some((s, i)) = self.header.scaling() {
            out.iter_mut().for_each(|v| *v = *v * s + i);
        }
        self.next += 1;
        Ok(Some(out))
    }
}

/// A whole NIfTI image in memory.
#[derive(Clone, Debug)]
pub struct NiftiImage {
    /// The parsed header.
    pub header: NiftiHeader,
    /// Voxel-to-world matrix (see [`NiftiHeader::affine`]).
    pub affine: Affine,
    /// Spatial grid `[x, y, z]`.
    pub dims: [usize; 3],
    /// Each volume's voxels, x fastest, as f32.
    pub volumes: Vec<Vec<f32>>,
}

/// Reads every volume of a NIfTI file.
pub fn read_nifti(path: impl AsRef<Path>, max_voxels: usize) -> Result<NiftiImage, NiftiError> {
    let mut reader = NiftiReader::open(path, max_voxels)?;
    let header = reader.header().clone();
    let mut volumes = Vec::with_capacity(header.n_volumes().min(4096));
    while let Some(v) = reader.read_volume()? {
        volumes.push(v);
    }
    Ok(NiftiImage { affine: header.affine(), dims: header.volume_dims(), header, volumes })
}

/// Writes a NIfTI-1 series volume by volume (`.gz` in the name: compressed).
pub struct NiftiWriter {
    path: PathBuf,
    out: Box<dyn Write + Send>,
    dtype: Dtype,
    n_voxels: usize,
    n_volumes: usize,
    written: usize,
}

impl NiftiWriter {
    /// Creates a float32 `path` for `n_volumes` volumes of `dims` with this affine and TR (s).
    pub fn create(
        path: impl AsRef<Path>,
        dims: [usize; 3],
        n_volumes: usize,
        affine: &Affine,
        tr: Option<f64>,
    ) -> Result<NiftiWriter, NiftiError> {
        Self::create_as(path, dims, n_volumes, affine, tr, Dtype::F32)
    }

    /// Like [`NiftiWriter::create`], storing samples as `dtype` (integers are rounded and
    /// saturated).
    pub fn create_as(
        path: impl AsRef<Path>,
        dims: [usize; 3],
        n_volumes: usize,
        affine: &Affine,
        tr: Option<f64>,
        dtype: Dtype,
    ) -> Result<NiftiWriter, NiftiError> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| NiftiError::Write { path: path.clone(), reason };
        if dims.iter().chain([&n_volumes]).any(|&d| d == 0 || d > i16::MAX as usize) {
            return Err(bad(format!("dimensions {dims:?} x {n_volumes} do not fit NIfTI-1")));
        }
        let file = File::create(&path).map_err(|source| NiftiError::Io { path: path.clone(), source })?;
        let gz = path.extension().is_some_and(|e| e == "gz");
        let mut out: Box<dyn Write + Send> = if gz {
            Box::new(GzEncoder::new(BufWriter::with_capacity(1 << 20, file), Compression::fast()))
        } else {
            Box::new(BufWriter::with_capacity(1 << 20, file))
        };
        let header = encode_header(dims, n_volumes, affine, tr, dtype);
        out.write_all(&header).map_err(|source| NiftiError::Io { path: path.clone(), source })?;
        Ok(NiftiWriter { path, out, dtype, n_voxels: dims.iter().product(), n_volumes, written: 0 })
    }

    /// Appends one volume (x fastest).
    pub fn write_volume(&mut self, data: &[f32]) -> Result<(), NiftiError> {
        if data.len() != self.n_voxels || self.written >= self.n_volumes {
            return Err(NiftiError::Write {
                path: self.path.clone(),
                reason: format!(
                    "volume {} has {} voxels; expected {} voxels and at most {} volumes",
                    self.written,
                    data.len(),
                    self.n_voxels,
                    self.n_volumes
                ),
            });
        }
        let bytes = self.dtype.encode_le(data);
        self.out.write_all(&bytes).map_err(|source| NiftiError::Io { path: self.path.clone(), source })?;
        self.written += 1;
        Ok(())
    }

    /// Flushes the file; fails if fewer volumes were written than declared.
    pub fn finish(mut self) -> Result<(), NiftiError> {
        if self.written != self.n_volumes {
            return Err(NiftiError::Write {
                path: self.path.clone(),
                reason: format!("{} of {} volumes written", self.written, self.n_volumes),
            });
        }
        self.out.flush().map_err(|source| NiftiError::Io { path: self.path.clone(), source })
    }
}

/// Writes one or more volumes to `path` in one call.
pub fn write_nifti(
    path: impl AsRef<Path>,
    dims: [usize; 3],
    affine: &Affine,
    tr: Option<f64>,
    volumes: &[&[f32]],
) -> Result<(), NiftiError> {
    let mut w = NiftiWriter::create(path, dims, volumes.len(), affine, tr)?;
    for v in volumes {
        w.write_volume(v)?;
    }
    w.finish()
}

fn encode_header(
    dims: [usize; 3],
    n_volumes: usize,
    affine: &Affine,
    tr: Option<f64>,
    dtype: Dtype,
) -> [u8; HEADER_SIZE + 4] {
    let mut h = [0u8; HEADER_SIZE + 4];
    let put_i16 = |h: &mut [u8], at: usize, v: i16| h[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |h: &mut [u8], at: usize, v: f32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    let four_d = n_volumes > 1 || tr.is_some();
    put_i16(&mut h, 40, if four_d { 4 } else { 3 });
    for (i, d) in dims.iter().chain([&n_volumes]).enumerate() {
        put_i16(&mut h, 42 + 2 * i, *d as i16);
    }
    for i in 4..7 {
        put_i16(&mut h, 42 + 2 * i, 1);
    }
    let code = NIFTI_TYPES.iter().find(|(_, d)| *d == dtype).map_or(16, |(c, _)| *c);
    put_i16(&mut h, 70, code);
    put_i16(&mut h, 72, (dtype.size() * 8) as i16);
    let zooms = voxel_size(affine);
    let quat = quaternion(affine);
    put_f32(&mut h, 76, quat.map(|q| q.0).unwrap_or(1.0));
    for (i, z) in zooms.iter().enumerate() {
        put_f32(&mut h, 80 + 4 * i, *z as f32);
    }
    put_f32(&mut h, 92, tr.unwrap_or(0.0) as f32);
    put_f32(&mut h, 108, 352.0);
    put_f32(&mut h, 112, 1.0);
    h[123] = 2 | 8; // mm, seconds
    h[148..148 + 9].copy_from_slice(b"mirage-rt");
    if let Some((_, q)) = quat {
        put_i16(&mut h, 252, 1);
        for (i, v) in q.iter().enumerate() {
            put_f32(&mut h, 256 + 4 * i, *v as f32);
        }
    }
    put_i16(&mut h, 254, 1);
    for (r, row) in affine.iter().take(3).enumerate() {
        for (c, v) in row.iter().enumerate() {
            put_f32(&mut h, 280 + 16 * r + 4 * c, *v as f32);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    h
}

/// qfac and `[b, c, d, qx, qy, qz]` for an affine whose linear part is a rotation times
/// positive zooms (possibly with a flip); `None` for shears or degenerate grids.
fn quaternion(affine: &Affine) -> Option<(f32, [f64; 6])> {
    let zooms = voxel_size(affine);
    if zooms.iter().any(|&z| z <= 0.0) || affine_det3(affine) == 0.0 {
        return None;
    }
    let mut r = [[0.0; 3]; 3];
    for (row, rr) in r.iter_mut().enumerate() {
        for (col, v) in rr.iter_mut().enumerate() {
            *v = affine[row][col] / zooms[col];
        }
    }
    let qfac = if affine_det3(affine) < 0.0 {
        for rr in r.iter_mut() {
            rr[2] = -rr[2];
        }
        -1.0
    } else {
        1.0
    };
    // R must be orthonormal for a qform to describe it.
    for a in 0..3 {
        for b in 0..3 {
            let dot: f64 = (0..3).map(|k| r[k][a] * r[k][b]).sum();
            if (dot - if a == b { 1.0 } else { 0.0 }).abs() > 1e-4 {
                return None;
            }
        }
    }
    let trace = r[0][0] + r[1][1] + r[2][2];
    let (a, b, c, d) = if trace > 0.0 {
        let s = 0.5 / (trace + 1.0).sqrt();
        (0.25 / s, (r[2][1] - r[1][2]) * s, (r[0][2] - r[2][0]) * s, (r[1][0] - r[0][1]) * s)
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = 2.0 * (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt();
        ((r[2][1] - r[1][2]) / s, 0.25 * s, (r[0][1] + r[1][0]) / s, (r[0][2] + r[2][0]) / s)
    } else if r[1][1] > r[2][2] {
        let s = 2.0 * (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt();
        ((r[0][2] - r[2][0]) / s, (r[0][1] + r[1][0]) / s, 0.25 * s, (r[1][2] + r[2][1]) / s)
    } else {
        let s = 2.0 * (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt();
        ((r[1][0] - r[0][1]) / s, (r[0][2] + r[2][0]) / s, (r[1][2] + r[2][1]) / s, 0.25 * s)
    };
    // NIfTI stores b, c, d with a >= 0.
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    Some((qfac as f32, [b * sign, c * sign, d * sign, affine[0][3], affine[1][3], affine[2][3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approx(a: &Affine, b: &Affine, tol: f64) -> bool {
        a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn write_then_read_keeps_values_affine_and_tr() {
        let dir = tempfile::tempdir().unwrap();
        // Anisotropic, rotated 30 degrees about z.
        let (s, c) = (0.5f64, 3f64.sqrt() / 2.0);
        let rotated = [
            [4.0 * c, -4.0 * s, 0.0, 90.0],
            [4.0 * s, 4.0 * c, 0.0, -120.0],
            [0.0, 0.0, 6.0, -30.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        // LAS (x flipped): qfac = -1.
        let las =
            [[-4.0, 0.0, 0.0, 90.0], [0.0, 4.0, 0.0, -120.0], [0.0, 0.0, 6.0, -30.0], [0.0, 0.0, 0.0, 1.0]];
        let v0: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let v1: Vec<f32> = (0..24).map(|i| -(i as f32)).collect();
        for (name, affine) in [("a.nii", rotated), ("a.nii.gz", rotated), ("las.nii.gz", las)] {
            let p = dir.path().join(name);
            write_nifti(&p, [2, 3, 4], &affine, Some(1.5), &[&v0, &v1]).unwrap();
            let img = read_nifti(&p, 1000).unwrap();
            assert_eq!(img.dims, [2, 3, 4]);
            assert_eq!(img.volumes, vec![v0.clone(), v1.clone()]);
            assert!(approx(&img.affine, &affine, 1e-5));
            assert_eq!(img.header.tr_seconds(), Some(1.5));
            // The qform alone gives the same matrix.
            let mut h = img.header.clone();
            h.sform_code = 0;
            assert!(approx(&h.affine(), &affine, 1e-4), "{:?}", h.affine());
        }
    }

    #[test]
    fn integer_and_double_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..8).map(|i| i as f32 * 100.0 - 300.0).collect();
        for dtype in [Dtype::I16, Dtype::F64, Dtype::I32] {
            let p = dir.path().join(format!("{dtype}.nii.gz"));
            let mut w =
                NiftiWriter::create_as(&p, [2, 2, 2], 1, &crate::volume::IDENTITY_AFFINE, None, dtype)
                    .unwrap();
            w.write_volume(&v).unwrap();
            w.finish().unwrap();
            let img = read_nifti(&p, 100).unwrap();
            assert_eq!(img.header.dtype, dtype);
            assert_eq!(img.volumes[0], v);
        }
        let p = dir.path().join("u16.nii");
        let mut w =
            NiftiWriter::create_as(&p, [2, 2, 2], 1, &crate::volume::IDENTITY_AFFINE, None, Dtype::U16)
                .unwrap();
        w.write_volume(&v).unwrap();
        w.finish().unwrap();
        assert_eq!(
            read_nifti(&p, 100).unwrap().volumes[0],
            vec![0.0, 0.0, 0.0, 0.0, 100.0, 200.0, 300.0, 400.0]
        );
    }

    #[test]
    fn huge_dims_are_refused_before_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.nii");
        let mut h = encode_header([2, 2, 2], 1, &crate::volume::IDENTITY_AFFINE, None, Dtype::F32);
        for i in 0..3 {
            h[42 + 2 * i..44 + 2 * i].copy_from_slice(&32767i16.to_le_bytes());
        }
        std::fs::write(&p, h).unwrap();
        match NiftiReader::open(&p, 1 << 24) {
            Err(NiftiError::TooLarge { voxels, .. }) => assert_eq!(voxels, 32767u128.pow(3)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.nii");
        let v = vec![1f32; 8];
        write_nifti(&p, [2, 2, 2], &crate::volume::IDENTITY_AFFINE, None, &[&v]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(NiftiReader::open(&p, 100), Err(NiftiError::Header { .. })));
        std::fs::write(&p, b"not a nifti file at all").unwrap();
        assert!(NiftiReader::open(&p, 100).is_err());
        let mut h = bytes.clone();
        h[70..72].copy_from_slice(&1792i16.to_le_bytes()); // complex128
        std::fs::write(&p, &h).unwrap();
        assert!(matches!(NiftiReader::open(&p, 100), Err(NiftiError::Header { .. })));
    }
}
