//! The volume wire format shared by the pyneal and native ZMQ protocols, both directions.
//!
//! A volume is two frames: a JSON header and the raw sample buffer.
//!
//! ```json
//! {"volIdx": 3, "dtype": "int16", "shape": [64, 64, 36],
//!  "affine": "[[3,0,0,-94.5],[0,3,0,-94.5],[0,0,3,-52.5],[0,0,0,1]]", "TR": "2.0"}
//! ```
//!
//! pyneal-scanner sends `affine` and `TR` as JSON strings and the buffer in C order (z
//! fastest). The native protocol also accepts them as plain JSON values and adds the optional
//! fields `order` (`"C"` or `"F"`), `acq_time` (seconds, LSL clock) and `run`.

use serde_json::Value;

use crate::reason::Reason;
use crate::volume::{
    affine_det3, c_to_nifti_order_with, f32_le_bytes, nifti_to_c_order, sanitize_run_id, Affine, Dtype,
    Endian, Volume,
};

/// Counted when: a message whose header did not parse.
pub const BAD_HEADER: Reason = Reason::new("bad_header", "a message whose header did not parse");
/// Counted when: a volume of an unsupported dtype.
pub const BAD_DTYPE: Reason = Reason::new("bad_dtype", "a volume of an unsupported dtype");
/// Counted when: a volume over ingest.max_voxels.
pub const TOO_LARGE: Reason = Reason::new("too_large", "a volume over ingest.max_voxels");
/// Counted when: a payload whose size disagreed with its header.
pub const PAYLOAD_SIZE: Reason =
    Reason::new("payload_size", "a payload whose size disagreed with its header");
/// Counted when: a message with the wrong number of frames.
pub const BAD_FRAMES: Reason = Reason::new("bad_frames", "a message with the wrong number of frames");
/// Counted when: a volume with an unusable affine.
pub const BAD_AFFINE: Reason = Reason::new("bad_affine", "a volume with an unusable affine");
/// What a message can be refused for at the wire.
pub const REASONS: &[Reason] = &[BAD_HEADER, BAD_DTYPE, TOO_LARGE, PAYLOAD_SIZE, BAD_FRAMES, BAD_AFFINE];

/// Why a message could not become a volume; `reason()` names the counter it bumps.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The header is not valid JSON or lacks a required field.
    #[error("ingest: bad header: {0}")]
    Header(String),
    /// The sample type is not one we read.
    #[error("ingest: unsupported dtype {0:?} (use int8/16/32, uint8/16/32, float32 or float64)")]
    Dtype(String),
    /// The header declares more voxels than allowed.
    #[error("ingest: {voxels} voxels exceeds the limit of {limit}")]
    TooLarge {
        /// Voxels declared.
        voxels: u128,
        /// Configured limit.
        limit: usize,
    },
    /// The payload does not hold exactly the declared samples.
    #[error("ingest: payload has {got} bytes, header declares {expected}")]
    PayloadSize {
        /// Bytes the header implies.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The message has the wrong number of frames.
    #[error("ingest: message has {0} frames, a volume is a header frame and a data frame")]
    Frames(usize),
    /// The affine is missing, malformed or degenerate.
    #[error("ingest: bad affine: {0}")]
    Affine(String),
}

impl WireError {
    /// Counter name of this kind of error.
    pub fn reason(&self) -> Reason {
        match self {
            WireError::Header(_) => BAD_HEADER,
            WireError::Dtype(_) => BAD_DTYPE,
            WireError::TooLarge { .. } => TOO_LARGE,
            WireError::PayloadSize { .. } => PAYLOAD_SIZE,
            WireError::Frames(_) => BAD_FRAMES,
            WireError::Affine(_) => BAD_AFFINE,
        }
    }
}

/// Memory order of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Row-major, last axis (z) fastest: numpy's default, pyneal's order.
    C,
    /// Column-major, x fastest: NIfTI's order.
    F,
}

/// A parsed, validated volume header.
#[derive(Clone, Debug, PartialEq)]
pub struct WireHeader {
    /// `volIdx`.
    pub index: u64,
    /// Sample type.
    pub dtype: Dtype,
    /// Byte order of the samples.
    pub endian: Endian,
    /// Grid `[x, y, z]`.
    pub dims: [usize; 3],
    /// Voxel-to-world matrix.
    pub affine: Affine,
    /// Repetition time in seconds.
    pub tr: Option<f64>,
    /// Buffer order.
    pub order: Order,
    /// Acquisition time, seconds on the sender's LSL clock.
    pub acq_time: Option<f64>,
    /// Sanitised run id.
    pub run: Option<String>,
}

impl WireHeader {
    /// Bytes the data frame must have.
    pub fn payload_bytes(&self) -> usize {
        self.dims.iter().product::<usize>() * self.dtype.size()
    }
}

/// Whether a sender's TR in milliseconds has been warned about (once per process).
static TR_IN_MS_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The configuration gives the TR (`ingest.tr`, `?tr=`), which wins over the headers': a
/// header's TR in milliseconds is then not warned about.
pub fn tr_configured() {
    TR_IN_MS_WARNED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Parses a JSON value that may be a JSON document inside a string (pyneal's habit).
fn unstring(v: &Value) -> Result<Value, String> {
    match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| format!("{s:?} is not JSON: {e}")),
        other => Ok(other.clone()),
    }
}

/// Reads an affine from a 4×4 nested list or a flat list of 12 or 16 numbers (row-major).
pub fn parse_affine(v: &Value) -> Result<Affine, WireError> {
    let v = unstring(v).map_err(WireError::Affine)?;
    let nums: Vec<f64> = match &v {
        Value::Array(rows) if rows.iter().all(Value::is_array) => rows
            .iter()
            .flat_map(|r| r.as_array().into_iter().flatten())
            .map(|x| x.as_f64())
            .collect::<Option<_>>(),
        Value::Array(flat) => flat.iter().map(Value::as_f64).collect(),
        _ => None,
    }
    .ok_or_else(|| WireError::Affine("must be a 4x4 list of numbers".into()))?;
    let mut a = [[0.0; 4]; 4];
    match nums.len() {
        12 | 16 => {
            for (i, x) in nums.iter().enumerate() {
                a[i / 4][i % 4] = *x;
            }
            if nums.len() == 12 {
                a[3] = [0.0, 0.0, 0.0, 1.0];
            }
        }
        n => return Err(WireError::Affine(format!("has {n} numbers, want 16 (4x4) or 12 (3x4)"))),
    }
    if a.iter().flatten().any(|x| !x.is_finite()) {
        return Err(WireError::Affine("has non-finite entries".into()));
    }
    if a[3].iter().zip([0.0, 0.0, 0.0, 1.0]).any(|(x, y)| (x - y).abs() > 1e-6) {
        return Err(WireError::Affine(format!("last row is {:?}, want [0, 0, 0, 1]", a[3])));
    }
    a[3] = [0.0, 0.0, 0.0, 1.0];
    if affine_det3(&a).abs() < 1e-9 {
        return Err(WireError::Affine("is singular (zero voxel size)".into()));
    }
    Ok(a)
}

/// Parses and validates a header frame; `max_voxels` is checked before anything is allocated.
pub fn parse_header(frame: &[u8], max_voxels: usize) -> Result<WireHeader, WireError> {
    let v: Value = serde_json::from_slice(frame).map_err(|e| WireError::Header(format!("not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| WireError::Header("not a JSON object".into()))?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let index = field("volIdx")
        .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
        .ok_or_else(|| WireError::Header("volIdx must be a non-negative integer".into()))?;
    let dtype_name = field("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| WireError::Header("dtype must be a string".into()))?;
    let (dtype, endian) =
        Dtype::parse(dtype_name).ok_or_else(|| WireError::Dtype(dtype_name.chars().take(32).collect()))?;
    let shape: Vec<u64> = field("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| WireError::Header("shape must be a list of integers".into()))?;
    // A trailing singleton time axis ([x, y, z, 1]) is accepted.
    let spatial = match shape.as_slice() {
        [x, y, z] | [x, y, z, 1] => [*x, *y, *z],
        _ => return Err(WireError::Header(format!("shape {shape:?} must be [x, y, z]"))),
    };
    if spatial.contains(&0) {
        return Err(WireError::Header(format!("shape {shape:?} has a zero dimension")));
    }
    let voxels: u128 = spatial.iter().map(|&d| u128::from(d)).product();
    if voxels > max_voxels as u128 {
        return Err(WireError::TooLarge { voxels, limit: max_voxels });
    }
    let dims = spatial.map(|d| d as usize);
    let affine = parse_affine(field("affine").ok_or_else(|| WireError::Affine("missing".into()))?)?;
    let tr = match field("TR").or_else(|| field("tr")) {
        None => None,
        Some(v) => {
            let t = unstring(v).ok().and_then(|t| t.as_f64());
            let t = t
                .filter(|t| t.is_finite() && *t > 0.0)
                .ok_or_else(|| WireError::Header(format!("TR {v} is not a positive number")))?;
            let (seconds, from_ms) = super::plausible_tr_seconds(t);
            if from_ms && !TR_IN_MS_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "ingest: the sender's TR {t} is read as milliseconds ({seconds} s), as pyneal's simulated \
                     sender and Philips exports send it; set ingest.tr to override"
                );
            }
            Some(seconds)
        }
    };
    let order = match field("order").map(|o| o.as_str()) {
        None | Some(Some("C")) => Order::C,
        Some(Some("F")) => Order::F,
        Some(_) => return Err(WireError::Header("order must be \"C\" or \"F\"".into())),
    };
    let acq_time = match field("acq_time") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|t| t.is_finite())
                .ok_or_else(|| WireError::Header("acq_time must be a number".into()))?,
        ),
    };
    let run =
        field("run").map(|r| sanitize_run_id(&r.as_str().map_or_else(|| r.to_string(), str::to_string)));
    Ok(WireHeader { index, dtype, endian, dims, affine, tr, order, acq_time, run })
}

/// The `volIdx` of a header that failed validation, when it has a readable one (for replies).
pub fn peek_index(frame: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(frame).ok()?.get("volIdx")?.as_u64()
}

/// Builds the volume from a validated header and its data frame.
pub fn decode_volume(
    h: &WireHeader,
    payload: &[u8],
    recv_time: f64,
    default_run: &str,
) -> Result<Volume, WireError> {
    let expected = h.payload_bytes();
    if payload.len() != expected {
        return Err(WireError::PayloadSize { expected, got: payload.len() });
    }
    let n = h.dims.iter().product();
    let mut data = vec![0f32; n];
    let size_err = WireError::PayloadSize { expected, got: payload.len() };
    match h.order {
        Order::F => h.dtype.decode_into(h.endian, payload, &mut data).ok_or(size_err)?,
        Order::C => decode_c_order(h, payload, &mut data).ok_or(size_err)?,
    }
    Ok(Volume {
        data,
        dims: h.dims,
        affine: h.affine,
        index: h.index,
        run: h.run.clone().unwrap_or_else(|| default_run.to_string()),
        tr: h.tr,
        acq_time: h.acq_time,
        recv_time,
        dtype: h.dtype,
    })
}

/// Converts and reorders a C-order buffer in one pass (no intermediate copy).
fn decode_c_order(h: &WireHeader, payload: &[u8], out: &mut [f32]) -> Option<()> {
    if payload.len() != out.len().checked_mul(h.dtype.size())? {
        return None;
    }
    macro_rules! reorder {
        ($t:ty, $n:expr) => {{
            let at = |c: usize| {
                let mut b = [0u8; $n];
                b.copy_from_slice(&payload[c * $n..c * $n + $n]);
                (match h.endian {
                    Endian::Little => <$t>::from_le_bytes(b),
                    Endian::Big => <$t>::from_be_bytes(b),
                }) as f32
            };
            c_to_nifti_order_with(h.dims, out, at)
        }};
    }
    match h.dtype {
        Dtype::U8 => c_to_nifti_order_with(h.dims, out, |c| f32::from(payload[c])),
        Dtype::I8 => c_to_nifti_order_with(h.dims, out, |c| f32::from(payload[c] as i8)),
        Dtype::I16 => reorder!(i16, 2),
        Dtype::U16 => reorder!(u16, 2),
        Dtype::I32 => reorder!(i32, 4),
        Dtype::U32 => reorder!(u32, 4),
        Dtype::F32 => reorder!(f32, 4),
        Dtype::F64 => reorder!(f64, 8),
    }
    Some(())
}

/// Which header dialect a sender writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Exactly what pyneal-scanner sends: string affine and TR, C-order float32 buffer.
    Pyneal,
    /// The native dialect: plain JSON values, F-order buffer, `acq_time` and `run`.
    Native,
}

/// Encodes a volume as a header frame and a float32 data frame in the dialect's conventions.
pub fn encode_volume(v: &Volume, dialect: Dialect) -> (String, Vec<u8>) {
    (encode_header(v, dialect), encode_payload(v, dialect))
}

/// The JSON header of [`encode_volume`].
pub fn encode_header(v: &Volume, dialect: Dialect) -> String {
    let shape = v.dims;
    let header = match dialect {
        Dialect::Pyneal => {
            let affine = serde_json::to_string(&v.affine).unwrap_or_default();
            let tr = v.tr.map_or_else(|| "null".to_string(), |t| t.to_string());
            serde_json::json!({"volIdx": v.index, "dtype": "float32", "shape": shape, "affine": affine, "TR": tr})
        }
        Dialect::Native => {
            serde_json::json!({"volIdx": v.index, "dtype": "float32", "shape": shape, "affine": v.affine,
                "TR": v.tr, "order": "F", "acq_time": v.acq_time, "run": v.run})
        }
    };
    header.to_string()
}

/// The data frame of [`encode_volume`]: float32 little-endian, C order for pyneal, F for native.
pub fn encode_payload(v: &Volume, dialect: Dialect) -> Vec<u8> {
    match dialect {
        Dialect::Pyneal => {
            let mut c = vec![0f32; v.data.len()];
            nifti_to_c_order(&v.data, v.dims, &mut c);
            f32_le_bytes(&c)
        }
        Dialect::Native => f32_le_bytes(&v.data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> Volume {
        Volume {
            data: (0..24).map(|i| i as f32 * 0.25).collect(),
            dims: [2, 3, 4],
            affine: [
                [-3.0, 0.0, 0.0, 10.0],
                [0.0, 3.0, 0.0, -5.0],
                [0.0, 0.0, 4.0, 2.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            index: 7,
            run: "r1".into(),
            tr: Some(2.0),
            acq_time: Some(12.5),
            recv_time: 0.0,
            dtype: Dtype::F32,
        }
    }

    #[test]
    fn both_dialects_round_trip() {
        for dialect in [Dialect::Pyneal, Dialect::Native] {
            let v = vol();
            let (h, data) = encode_volume(&v, dialect);
            let header = parse_header(h.as_bytes(), 1000).unwrap();
            let back = decode_volume(&header, &data, 0.0, "r1").unwrap();
            assert_eq!(back.data, v.data, "{dialect:?}");
            assert_eq!(back.affine, v.affine);
            assert_eq!((back.index, back.tr), (7, Some(2.0)));
            if dialect == Dialect::Native {
                assert_eq!(back.acq_time, Some(12.5));
            }
        }
    }

    #[test]
    fn pyneal_header_with_c_order_int16() {
        let h = br#"{"volIdx": 0, "dtype": "int16", "shape": [2, 1, 2],
            "affine": "[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]", "TR": "1.5"}"#;
        let header = parse_header(h, 100).unwrap();
        // C order: (0,0,0)=1 (0,0,1)=2 (1,0,0)=3 (1,0,1)=4
        let payload: Vec<u8> = [1i16, 2, 3, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let v = decode_volume(&header, &payload, 0.0, "run").unwrap();
        assert_eq!(v.data, vec![1.0, 3.0, 2.0, 4.0]);
        assert_eq!(v.tr, Some(1.5));
        // pyneal's simulated sender sends milliseconds as TR: "500.0" is 0.5 s.
        let ms = std::str::from_utf8(h).unwrap().replace(r#""TR": "1.5""#, r#""TR": "500.0""#);
        assert_eq!(parse_header(ms.as_bytes(), 1 << 20).unwrap().tr, Some(0.5));
    }

    #[test]
    fn every_defect_is_a_typed_error() {
        let ok = r#""volIdx": 0, "shape": [2, 2, 2], "affine": [[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]"#;
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "bad_header"),
            ("[1,2]".into(), "bad_header"),
            (format!(r#"{{{ok}, "dtype": "complex64"}}"#), "bad_dtype"),
            (r#"{"volIdx": 0, "dtype": "int16", "shape": [99999, 99999, 99999], "affine": []}"#.into(), "too_large"),
            (r#"{"volIdx": -1, "dtype": "int16", "shape": [2, 2, 2]}"#.into(), "bad_header"),
            (r#"{"volIdx": 0, "dtype": "int16", "shape": [2, 0, 2]}"#.into(), "bad_header"),
            (r#"{"volIdx": 0, "dtype": "int16", "shape": [2, 2, 2]}"#.into(), "bad_affine"),
            (r#"{"volIdx": 0, "dtype": "int16", "shape": [2, 2, 2], "affine": [[0,0,0,0],[0,0,0,0],[0,0,0,0],[0,0,0,1]]}"#.into(), "bad_affine"),
            (format!(r#"{{{ok}, "dtype": "int16", "TR": "-2"}}"#), "bad_header"),
            (format!(r#"{{{ok}, "dtype": "int16", "order": "X"}}"#), "bad_header"),
        ];
        for (h, reason) in cases {
            let err = parse_header(h.as_bytes(), 1 << 20).unwrap_err();
            assert_eq!(err.reason().name, reason, "{h}: {err}");
        }
        let header = parse_header(format!(r#"{{{ok}, "dtype": "float32"}}"#).as_bytes(), 100).unwrap();
        let err = decode_volume(&header, &[0u8; 31], 0.0, "run").unwrap_err();
        assert_eq!(err, WireError::PayloadSize { expected: 32, got: 31 });
    }
}
