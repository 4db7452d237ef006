//! Trial markers from an LSL string stream (as PsychoPy and most stimulus software send them),
//! on their own thread, into the GLM stage's event queue.

use std::sync::atomic::{AtomicBool, Ordering};

use lsl::Pullable;

use crate::event::{parse_marker, Event};
use crate::metrics::{Metrics, Reason};

/// An LSL marker stream that could not be opened (retried).
pub const MARKER_STREAM: Reason = Reason::new("marker_stream", "LSL marker streams that could not be opened");
/// A marker that did not parse.
pub const BAD_MARKER: Reason = Reason::new("bad_marker", "markers that did not parse as events");
/// What the marker reader counts.
pub const REASONS: &[Reason] = &[MARKER_STREAM, BAD_MARKER];

/// Resolves the LSL stream `name` (again whenever it is lost) and forwards every marker,
/// timestamped on the daemon's clock, until `stop` is set.
pub fn marker_loop(name: &str, events: &crossbeam_channel::Sender<Event>, stop: &AtomicBool, m: &Metrics) {
    while !stop.load(Ordering::Acquire) {
        let Ok(found) = lsl::resolve_byprop("name", name, 1, 0.5) else { continue };
        let Some(info) = found.into_iter().next() else { continue };
        let inlet = match lsl::StreamInlet::new(&info, 10, 0, true) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("markers: cannot open {name:?}: {e:?}");
                m.count(MARKER_STREAM);
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
        };
        tracing::info!("markers: reading LSL stream {name:?}");
        let mut buf: Vec<String> = Vec::new();
        while !stop.load(Ordering::Acquire) {
            match inlet.pull_sample_buf(&mut buf, 0.2) {
                Ok(0.0) => {}
                Ok(ts) => {
                    let offset = inlet.time_correction(0.0).unwrap_or(0.0);
                    for text in &buf {
                        match parse_marker(text, ts + offset) {
                            Ok(e) => {
                                if events.try_send(e).is_err() {
                                    m.count(crate::event::EVENTS_DROPPED);
                                }
                            }
                            Err(e) => {
                                tracing::warn!("{e}");
                                m.count(BAD_MARKER);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("markers: stream {name:?} lost ({e:?}); resolving again");
                    break;
                }
            }
        }
    }
}
