//! Entry points of the fuzz targets (`fuzz/`) and of the test that replays their corpus: each
//! feeds arbitrary bytes to one parser of outside input, which must answer with a value or an
//! error and never panic or allocate past its limits.

use crate::config::Config;
use crate::event::parse_marker;
use crate::glm::events::parse_events_tsv;
use crate::ingest::lsl::parse_geometry;
use crate::ingest::uri::{parse_publish_uri, IngestUri};
use crate::ingest::wire::{decode_volume, parse_header, peek_index};
use crate::io::nifti::NiftiHeader;
use crate::sim::SimConfig;

/// Largest volume the fuzzed wire decoder accepts (the daemon's limit is configurable).
pub const MAX_VOXELS: usize = 1 << 20;

/// A pyneal or native ZMQ message: the header frame up to the first newline, the payload after.
pub fn wire_message(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (header, payload) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let _ = peek_index(header);
    if let Ok(h) = parse_header(header, MAX_VOXELS) {
        let _ = decode_volume(&h, payload, 0.0, "run");
    }
}

/// An LSL stream's `<desc><volume>` fields, separated by ASCII unit separators (0x1f).
pub fn lsl_geometry(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let f: Vec<&str> = text.split('\u{1f}').collect();
    let at = |i: usize| f.get(i).copied();
    let _ = parse_geometry(at(0).unwrap_or_default(), at(1).unwrap_or_default(), at(2), at(3), at(4));
}

/// An event marker string (LSL marker stream or ZMQ events).
pub fn marker(data: &[u8]) {
    let _ = parse_marker(&String::from_utf8_lossy(data), 12.5);
}

/// The text of a BIDS events file.
pub fn events_tsv(data: &[u8]) {
    let _ = parse_events_tsv(&String::from_utf8_lossy(data), "fuzz");
}

/// A configuration file, then its validation and its URIs.
pub fn config(data: &[u8]) {
    if let Ok(cfg) = Config::parse(&String::from_utf8_lossy(data)) {
        let _ = cfg.validate();
        let _ = cfg.ingest_uri();
    }
}

/// A request to the results server (a client's bytes), then the board's answer to it.
pub fn results_request(data: &[u8]) {
    if let Ok(index) = crate::publish::results::parse_request(data) {
        let _ = crate::publish::results::ResultsBoard::default().lookup(index);
    }
}

/// An ingest or publish URI.
pub fn uri(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = IngestUri::parse(&text, &SimConfig::default());
    let _ = parse_publish_uri(&text);
}

/// A NIfTI-1 header (and the sizes it declares).
pub fn nifti_header(data: &[u8]) {
    if let Ok(h) = NiftiHeader::parse(data) {
        let _ = (h.volume_dims(), h.n_volumes(), h.voxels_per_volume(), h.tr_seconds(), h.affine());
    }
}

/// `ingest.allow` entries (one per line), then a ZAP request (frames after a blank line,
/// separated by 0x1f) checked against them, without and with a CURVE whose one client key is
/// 32 bytes of 0x37 (`7`).
pub fn allowlist(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (entries, request) = text.split_once("\n\n").unwrap_or((&text, ""));
    let entries: Vec<String> = entries.lines().map(str::to_string).collect();
    if let Ok(allow) = crate::ingest::allow::Allowlist::parse(&entries) {
        let frames: Vec<Vec<u8>> = request.split('\u{1f}').map(|f| f.as_bytes().to_vec()).collect();
        let mut policy = crate::ingest::zap::Policy { allow, curve: None };
        let _ = crate::ingest::zap::answer(&frames, &policy);
        policy.curve = Some(crate::curve::Curve::from_keys([1; 32], String::new(), [[b'7'; 32]]));
        let _ = crate::ingest::zap::answer(&frames, &policy);
    }
}

/// A web request's query (first line) and `Authorization` header (second), checked against
/// a token.
pub fn web_token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(2, '\n');
    let (query, auth) = (lines.next(), lines.next());
    if let Ok(t) = crate::access::Token::new("0123456789abcdef") {
        let _ = t.check(query, auth);
    }
    let _ = crate::access::Token::new(&text);
}

/// A run's volume indices as a sender might send them: 9 bytes per volume, the index (8, little
/// endian) and the TRs since the volume before (1). Ingest's index bookkeeping must hold its
/// invariants: what it counts missing lies between the taken indices, and an implausible
/// index moves no clock.
pub fn index_sequence(data: &[u8]) {
    use std::sync::atomic::Ordering;
    let (mut tracker, m) =
        (crate::ingest::intake::IndexTracker::default(), crate::metrics::Metrics::new(0.0));
    let (mut t, mut taken) = (0.0, Vec::new());
    for chunk in data.chunks_exact(9) {
        let mut index = [0u8; 8];
        index.copy_from_slice(&chunk[..8]);
        t += f64::from(chunk[8]);
        let v = crate::volume::Volume {
            data: Vec::new(),
            dims: [1, 1, 1],
            affine: crate::volume::IDENTITY_AFFINE,
            index: u64::from_le_bytes(index),
            run: "r".into(),
            tr: Some(1.0),
            acq_time: None,
            recv_time: t,
            dtype: crate::volume::Dtype::F32,
        };
        if !tracker.observe(&v, &m).implausible_index {
            taken.push(v.index);
        }
    }
    let (Some(lo), Some(hi)) = (taken.iter().min(), taken.iter().max()) else { return };
    let missing = m.missing.load(Ordering::Relaxed);
    assert!(missing <= hi - lo, "missing {missing} beyond the span {lo}..={hi} of the taken indices");
}

/// One fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 11] = [
    ("wire_message", wire_message),
    ("lsl_geometry", lsl_geometry),
    ("marker", marker),
    ("events_tsv", events_tsv),
    ("config", config),
    ("uri", uri),
    ("nifti_header", nifti_header),
    ("results_request", results_request),
    ("allowlist", allowlist),
    ("web_token", web_token),
    ("index_sequence", index_sequence),
];
