//! Lab Streaming Layer ingest: one sample of an LSL stream is one whole volume.
//!
//! The stream (any name; we resolve it by name) has `channel_count = x·y·z`, channel format
//! float32 or int16, samples in NIfTI order (x fastest), and its geometry in `desc()`:
//!
//! ```xml
//! <desc>
//!   <volume>
//!     <dims>64 64 36</dims>                      <!-- x y z -->
//!     <affine>3 0 0 -94.5 0 3 0 -94.5 0 0 3 -52.5 0 0 0 1</affine>  <!-- row-major, 12 or 16 -->
//!     <tr>2.0</tr>                               <!-- seconds, optional -->
//!     <run>run-01</run>                          <!-- optional -->
//!     <first_index>0</first_index>               <!-- index of the first sample, optional -->
//!   </volume>
//! </desc>
//! ```
//!
//! A sample's timestamp is the volume's acquisition time on the sender's LSL clock; we add the
//! inlet's clock offset so it is on ours. Volume indices count samples from `first_index`.

use std::time::Duration;

use lsl::Pullable;

use super::wire::parse_affine;
use super::{IngestError, Source, SourceEvent, SourceLimits};
use crate::clock;
use crate::volume::{sanitize_run_id, Affine, Dtype, Volume};

/// Geometry read from a stream's `desc()`.
#[derive(Clone, Debug, PartialEq)]
pub struct LslGeometry {
    /// Grid `[x, y, z]`.
    pub dims: [usize; 3],
    /// Voxel-to-world matrix.
    pub affine: Affine,
    /// Repetition time in seconds.
    pub tr: Option<f64>,
    /// Run id.
    pub run: Option<String>,
    /// Index of the stream's first sample.
    pub first_index: u64,
}

/// Parses the text fields of `<desc><volume>` (each `None` when absent).
pub fn parse_geometry(
    dims: &str,
    affine: &str,
    tr: Option<&str>,
    run: Option<&str>,
    first_index: Option<&str>,
) -> Result<LslGeometry, String> {
    let d: Vec<usize> = dims
        .split_whitespace()
        .map(|x| x.parse().ok().filter(|v| *v > 0))
        .collect::<Option<_>>()
        .ok_or(format!("dims {dims:?} must be three positive integers"))?;
    let dims: [usize; 3] =
        d.try_into().map_err(|_| format!("dims {dims:?} must be three positive integers"))?;
    let nums: Vec<serde_json::Value> = affine
        .split_whitespace()
        .map(|x| x.parse::<f64>().ok().map(serde_json::Value::from))
        .collect::<Option<_>>()
        .ok_or(format!("affine {affine:?} must be numbers"))?;
    let affine = parse_affine(&serde_json::Value::Array(nums)).map_err(|e| e.to_string())?;
    let tr = match tr.filter(|t| !t.trim().is_empty()) {
        Some(t) => Some(
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or(format!("tr {t:?} must be positive seconds"))?,
        ),
        None => None,
    };
    let first_index = match first_index.filter(|t| !t.trim().is_empty()) {
        Some(t) => {
            t.trim().parse().map_err(|_| format!("first_index {t:?} must be a non-negative integer"))?
        }
        None => 0,
    };
    let run = run.filter(|r| !r.trim().is_empty()).map(sanitize_run_id);
    Ok(LslGeometry { dims, affine, tr, run, first_index })
}

enum Samples {
    F32(Vec<f32>),
    I16(Vec<i16>),
}

struct Connected {
    inlet: lsl::StreamInlet,
    geometry: LslGeometry,
    samples: Samples,
    count: u64,
    offset: f64,
}

/// Resolves a named LSL stream and pulls one volume per sample; re-resolves if it is lost.
pub struct LslReceiver {
    name: String,
    limits: SourceLimits,
    run: String,
    connected: Option<Connected>,
    next_resolve: f64,
}

/// Seconds between attempts to find the stream.
const RETRY_S: f64 = 0.5;

impl LslReceiver {
    /// A receiver for the stream called `name` (resolved lazily, so the sender may start later).
    pub fn new(name: &str, limits: SourceLimits, run: &str) -> LslReceiver {
        LslReceiver {
            name: name.to_string(),
            limits,
            run: run.to_string(),
            connected: None,
            next_resolve: 0.0,
        }
    }

    fn error(&self, reason: impl Into<String>) -> IngestError {
        IngestError::Lsl { name: self.name.clone(), reason: reason.into() }
    }

    fn connect(&self, timeout: Duration) -> Result<Option<Connected>, IngestError> {
        let found = lsl::resolve_byprop("name", &self.name, 1, timeout.as_secs_f64())
            .map_err(|e| self.error(format!("resolve: {e:?}")))?;
        let Some(info) = found.into_iter().next() else {
            return Ok(None);
        };
        let channels = info.channel_count().max(0) as usize;
        let max_buflen = if info.nominal_srate() > 0.0 { 60 } else { 1 };
        let inlet = lsl::StreamInlet::new(&info, max_buflen, 0, true)
            .map_err(|e| self.error(format!("inlet: {e:?}")))?;
        let mut full = inlet.info(5.0).map_err(|e| self.error(format!("reading stream info: {e:?}")))?;
        let vol = full.desc().child("volume");
        let text = |k: &str| Some(vol.child_value_named(k));
        let dims = text("dims").unwrap_or_default();
        let affine = text("affine").unwrap_or_default();
        let geometry = parse_geometry(
            &dims,
            &affine,
            text("tr").as_deref(),
            text("run").as_deref(),
            text("first_index").as_deref(),
        )
        .map_err(|e| self.error(format!("desc/volume: {e}")))?;
        let n: usize = geometry.dims.iter().product();
        if n > self.limits.max_voxels {
            return Err(self.error(format!("{n} voxels exceeds the limit of {}", self.limits.max_voxels)));
        }
        if channels != n {
            return Err(
                self.error(format!("{channels} channels but dims {:?} hold {n} voxels", geometry.dims))
            );
        }
        let samples = match info.channel_format() {
            lsl::ChannelFormat::Float32 => Samples::F32(Vec::with_capacity(n)),
            lsl::ChannelFormat::Int16 => Samples::I16(Vec::with_capacity(n)),
            f => return Err(self.error(format!("channel format {f:?}; use float32 or int16"))),
        };
        inlet.open_stream(5.0).map_err(|e| self.error(format!("open: {e:?}")))?;
        // Without waiting: the first estimate arrives in the background; samples flow meanwhile.
        let offset = inlet.time_correction(0.0).unwrap_or(0.0);
        tracing::info!(
            "lsl: connected to {:?}: {:?}, {n} channels, clock offset {:.6} s",
            self.name,
            geometry.dims,
            offset
        );
        Ok(Some(Connected { inlet, geometry, samples, count: 0, offset }))
    }
}

impl Source for LslReceiver {
    fn next(&mut self, timeout: Duration) -> SourceEvent {
        if self.connected.is_none() {
            let now = clock::now();
            if now < self.next_resolve {
                std::thread::sleep(timeout.min(Duration::from_secs_f64(self.next_resolve - now)));
                return SourceEvent::Idle;
            }
            self.next_resolve = now + RETRY_S;
            match self.connect(timeout) {
                Ok(Some(c)) => self.connected = Some(c),
                Ok(None) => return SourceEvent::Idle,
                Err(e) => return SourceEvent::Rejected(e),
            }
        }
        let Some(c) = self.connected.as_mut() else {
            return SourceEvent::Idle;
        };
        let t = timeout.as_secs_f64();
        let pulled = match &mut c.samples {
            Samples::F32(buf) => c.inlet.pull_sample_buf(buf, t),
            Samples::I16(buf) => c.inlet.pull_sample_buf(buf, t),
        };
        let stamp = match pulled {
            Ok(0.0) => return SourceEvent::Idle,
            Ok(s) => s,
            Err(e) => {
                self.connected = None;
                return SourceEvent::Rejected(IngestError::Lsl {
                    name: self.name.clone(),
                    reason: format!("stream lost ({e:?}); resolving again"),
                });
            }
        };
        let recv_time = clock::now();
        // liblsl refreshes the estimate in the background; a zero timeout reads the latest.
        c.offset = c.inlet.time_correction(0.0).unwrap_or(c.offset);
        let n: usize = c.geometry.dims.iter().product();
        let (data, dtype): (Vec<f32>, Dtype) = match &mut c.samples {
            Samples::F32(buf) => (std::mem::replace(buf, Vec::with_capacity(n)), Dtype::F32),
            Samples::I16(buf) => (buf.iter().map(|&v| f32::from(v)).collect(), Dtype::I16),
        };
        if data.len() != n {
            return SourceEvent::Rejected(
                super::WireError::PayloadSize { expected: n * 4, got: data.len() * 4 }.into(),
            );
        }
        let index = c.geometry.first_index + c.count;
        c.count += 1;
        SourceEvent::Volume(Volume {
            data,
            dims: c.geometry.dims,
            affine: c.geometry.affine,
            index,
            run: c.geometry.run.clone().unwrap_or_else(|| self.run.clone()),
            tr: c.geometry.tr,
            acq_time: Some(stamp + c.offset),
            recv_time,
            dtype,
        })
    }

    fn describe(&self) -> String {
        format!("lsl stream {:?}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_text_fields() {
        let g =
            parse_geometry("4 5 6", "2 0 0 -3 0 2 0 -4 0 0 2 -5", Some("1.5"), Some("run 1"), None).unwrap();
        assert_eq!(g.dims, [4, 5, 6]);
        assert_eq!(g.affine[1][3], -4.0);
        assert_eq!(g.affine[3], [0.0, 0.0, 0.0, 1.0]);
        assert_eq!((g.tr, g.run.as_deref(), g.first_index), (Some(1.5), Some("run1"), 0));
        assert!(parse_geometry("4 5", "1 0 0 0 0 1 0 0 0 0 1 0", None, None, None).is_err());
        assert!(parse_geometry("4 5 6", "1 0 0", None, None, None).is_err());
        assert!(parse_geometry("4 5 6", "1 0 0 0 0 1 0 0 0 0 1 0", Some("-1"), None, None).is_err());
    }
}
