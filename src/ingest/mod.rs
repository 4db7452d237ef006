//! Ingest: wire messages in, validated [`Volume`]s out.
//!
//! Each source is a thin adapter over one transport (see [`uri::IngestUri`]); it owns its
//! socket or file and is driven by the runner's ingest thread through [`Source`]. Sources do
//! no recording and keep no queues: the runner records every volume before it acknowledges it.

pub mod allow;
pub mod file;
pub mod intake;
pub mod lsl;
pub mod markers;
pub mod pacer;
pub mod replay;
pub mod sim;
pub mod uri;
pub mod wire;
pub mod zap;
pub mod zmq;

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::io::nifti::NiftiError;
use crate::reason::Reason;
use crate::volume::Volume;

pub use self::uri::{Endpoint, IngestUri, Playback, Speed};
pub use self::wire::WireError;

/// Counted when: a source socket that failed.
pub const SOCKET: Reason = Reason::new("socket", "a source socket that failed");
/// Counted when: an LSL stream that failed.
pub const LSL_STREAM: Reason = Reason::new("lsl_stream", "an LSL stream that failed");
/// Counted when: a replayed file that could not be read.
pub const FILE: Reason = Reason::new("file", "a replayed file that could not be read");
/// Counted when: a simulator that could not be made.
pub const SIM: Reason = Reason::new("sim", "a simulator that could not be made");
/// Counted when: a sender outside `ingest.allow` tried to connect (refused before any data).
pub const SENDER_REFUSED: Reason =
    Reason::new("sender_refused", "connections from senders outside ingest.allow, refused");
/// Counted when: a volume's index was implausible for its run; it was recorded and set aside.
pub const IMPLAUSIBLE_INDEX: Reason = Reason::new(
    "implausible_index",
    "volumes set aside (recorded, not processed): index before the run's first or far past the expected one",
);
/// What ingest refuses or fails on (the wire's reasons included; bad markers are the marker reader's).
/// (With the wire's, [`wire::REASONS`].)
pub const REASONS: &[Reason] = &[SOCKET, LSL_STREAM, FILE, SIM, SENDER_REFUSED, IMPLAUSIBLE_INDEX];

/// `[ingest]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Source URI: `pyneal://`, `zmq://`, `lsl://`, `file://` or `sim://`.
    pub uri: String,
    /// Largest volume accepted, in voxels; larger headers are refused before allocating.
    pub max_voxels: usize,
    /// Stop after this many accepted volumes (`None`: run until the source ends or a signal).
    pub stop_after: Option<u64>,
    /// End the run when no volume has come for this many seconds after the last one (a sender
    /// gone quiet at the run's end); waiting for the first volume never times out.
    pub idle_exit_s: Option<f64>,
    /// Run id for volumes whose sender does not name one.
    pub run: String,
    /// Repetition time in seconds, over whatever the sender's headers say (`None`: the
    /// headers', milliseconds above 60 read as such).
    pub tr: Option<f64>,
    /// Senders a listening ingest lets in: addresses and CIDR ranges, or `["*"]` for anyone
    /// on purpose. Required when it (or the results server) listens beyond loopback, unless
    /// `ingest.curve` guards the ingest.
    pub allow: Vec<String>,
    /// ZeroMQ CURVE on a listening ingest: encrypted, only the listed senders' keys let in.
    pub curve: crate::curve::CurveConfig,
}

impl Default for IngestConfig {
    fn default() -> IngestConfig {
        IngestConfig {
            uri: "sim://?speed=max".into(),
            max_voxels: 1 << 24,
            stop_after: None,
            idle_exit_s: None,
            run: "run".into(),
            tr: None,
            allow: Vec::new(),
            curve: Default::default(),
        }
    }
}

impl crate::settings::InputFiles for IngestConfig {
    /// A `file://` series and the CURVE certificates.
    fn resolve_inputs(&mut self, base: &Path) {
        if let Some(rest) = self.uri.strip_prefix("file://") {
            let (file, query) = rest.split_once('?').map_or((rest, None), |(f, q)| (f, Some(q)));
            let mut path = std::path::PathBuf::from(file);
            crate::settings::rebase(&mut path, base);
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            self.uri = format!("file://{}{query}", path.display());
        }
        self.curve.resolve_inputs(base);
    }
}

/// Why a message or a source failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// A message could not be decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A socket could not be set up or used.
    #[error("ingest: socket {endpoint}: {reason}")]
    Socket {
        /// The address.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// An LSL stream is unusable.
    #[error("ingest: lsl stream {name:?}: {reason}")]
    Lsl {
        /// Stream name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A replayed file could not be read.
    #[error("ingest: {0}")]
    File(#[from] NiftiError),
    /// A replayed session folder could not be read.
    #[error("ingest: {0}")]
    Session(#[from] crate::io::session::SessionError),
    /// The simulator could not be built.
    #[error("ingest: {0}")]
    Sim(#[from] crate::sim::SimError),
    /// A marker could not be read.
    #[error("ingest: {0}")]
    Marker(#[from] crate::event::EventError),
}

impl IngestError {
    /// Counter name of this kind of error.
    pub fn reason(&self) -> Reason {
        match self {
            IngestError::Wire(w) => w.reason(),
            IngestError::Socket { .. } => SOCKET,
            IngestError::Lsl { .. } => LSL_STREAM,
            IngestError::File(_) | IngestError::Session(_) => FILE,
            IngestError::Sim(_) => SIM,
            IngestError::Marker(_) => markers::BAD_MARKER,
        }
    }
}

/// What a source produced in one call.
#[derive(Debug)]
pub enum SourceEvent {
    /// A complete, valid volume.
    Volume(Volume),
    /// A message that could not become a volume; the source goes on.
    Rejected(IngestError),
    /// Nothing arrived within the timeout.
    Idle,
    /// A finite source (file, simulator) has no more volumes.
    End,
    /// A trial event (a marker) for the GLM.
    Marker(crate::event::Event),
    /// Senders outside `ingest.allow` were refused this many connections (nothing of theirs
    /// was read).
    Refused(u64),
}

/// The runner's verdict on the last event, for protocols that answer their sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack<'a> {
    /// The volume was written to the session folder (or a TR passed) and queued.
    Accepted {
        /// Its index.
        index: u64,
        /// Whether it is the run's last (the answer then says `STOP`).
        last: bool,
    },
    /// The message was refused.
    Rejected {
        /// Why.
        reason: &'a str,
    },
    /// The run is over; the message (a volume, if its index could be read) was not taken.
    Stopped {
        /// The refused volume's index.
        index: Option<u64>,
    },
}

/// A transport adapter that yields volumes.
pub trait Source {
    /// Waits up to `timeout` for the next event.
    fn next(&mut self, timeout: Duration) -> SourceEvent;
    /// Called once after every `Volume` or `Rejected` event, once the volume is recorded.
    fn acknowledge(&mut self, _ack: Ack<'_>) {}
    /// Whether the sender waits for [`Source::acknowledge`] (then the runner holds the answer
    /// until the recorder has written the volume, for at most one TR).
    fn answers_sender(&self) -> bool {
        false
    }
    /// A short description for logs (`pyneal tcp://127.0.0.1:5555`).
    fn describe(&self) -> String;
}

/// A repetition time above this many seconds is a value in milliseconds under the wrong label
/// (pyneal's simulated sender and Philips exports send milliseconds as `TR`).
pub const IMPLAUSIBLE_TR_S: f64 = 60.0;

/// A header's TR in seconds, and whether it was read as milliseconds (above
/// [`IMPLAUSIBLE_TR_S`]).
pub fn plausible_tr_seconds(tr: f64) -> (f64, bool) {
    if tr > IMPLAUSIBLE_TR_S {
        (tr / 1e3, true)
    } else {
        (tr, false)
    }
}

/// Limits every source applies before allocating.
#[derive(Clone, Copy, Debug)]
pub struct SourceLimits {
    /// Largest voxel count of one volume.
    pub max_voxels: usize,
}

impl SourceLimits {
    /// Largest message any frame may be: the biggest volume in float64 plus room for a header.
    pub fn max_message_bytes(&self) -> i64 {
        (self.max_voxels as i64).saturating_mul(8).saturating_add(1 << 20)
    }
}

/// Opens the source a URI names, letting in only the senders `policy` names where it listens.
/// Call on the thread that will drive it (LSL handles are not `Send`).
pub fn open_source(
    uri: &IngestUri,
    limits: SourceLimits,
    run: &str,
    policy: &zap::Policy,
) -> Result<Box<dyn Source>, IngestError> {
    Ok(match uri {
        IngestUri::Pyneal { endpoint, .. } => {
            Box::new(zmq::ZmqReceiver::bind(zmq::Protocol::Pyneal, endpoint, limits, run, policy)?)
        }
        IngestUri::Zmq { endpoint, .. } => {
            Box::new(zmq::ZmqReceiver::bind(zmq::Protocol::Native, endpoint, limits, run, policy)?)
        }
        IngestUri::Lsl { name, .. } => Box::new(lsl::LslReceiver::new(name, limits, run)),
        IngestUri::File { path, playback, tr } if path.is_dir() => {
            Box::new(replay::SessionReplay::open(path, *playback, *tr, limits)?)
        }
        IngestUri::File { path, playback, tr } => {
            Box::new(file::FileReplay::open(path, *playback, *tr, limits, run)?)
        }
        IngestUri::Sim { sim, playback } => Box::new(sim::SimSource::new(sim, *playback)?),
    })
}
