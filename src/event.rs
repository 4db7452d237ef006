//! Trial events: what a trial is to the GLM, wherever it comes from (a BIDS `events.tsv`
//! known before a run, or a live marker: an LSL string sample or a ZMQ message), and the live
//! markers' small grammar. Ingest reads markers; the GLM models events.
//!
//! Marker grammar: `key=value` pairs separated by `;`, keys in any order:
//!
//! ```text
//! trial=12;stim=7;cond=imagery;dur=4            onset = the marker's timestamp
//! trial=13;stim=2;cond=seen;dur=4;onset=104.5   onset in seconds from the run's first volume
//! ```
//!
//! `trial` (integer, default: the next number), `stim` (integer), `cond` (condition label,
//! default `task`), `dur` (seconds, default from the configuration), `onset` (seconds after
//! volume 0's acquisition). Unknown keys and malformed values are errors, so a typo in a
//! stimulus script is noticed at once.

/// When an event starts.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Onset {
    /// Seconds after the acquisition of the run's first volume.
    Relative(f64),
    /// Seconds on the daemon's clock ([`crate::clock::now`], LSL's `local_clock`).
    Absolute(f64),
}

/// One trial (or any event to model).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Trial id (`None`: numbered in arrival order).
    pub trial: Option<u64>,
    /// Stimulus id.
    pub stim: Option<u64>,
    /// Condition label.
    pub condition: String,
    /// Onset.
    pub onset: Onset,
    /// Duration in seconds (`None`: the configured default).
    pub duration: Option<f64>,
}

/// Why an event could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// A marker string is malformed.
    #[error("events: marker {marker:?}: {reason}")]
    Marker {
        /// The marker as received (truncated).
        marker: String,
        /// What is wrong.
        reason: String,
    },
    /// An events file is malformed or unreadable.
    #[error("events: {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The condition of a trial whose marker or events row names none.
pub const DEFAULT_CONDITION: &str = "task";

/// Longest marker accepted (characters).
const MAX_MARKER: usize = 1024;

/// Parses a marker string; `timestamp` (daemon clock) is the onset unless it says `onset=`.
pub fn parse_marker(marker: &str, timestamp: f64) -> Result<Event, EventError> {
    let err = |reason: String| EventError::Marker { marker: marker.chars().take(80).collect(), reason };
    if marker.len() > MAX_MARKER {
        return Err(err(format!("longer than {MAX_MARKER} characters")));
    }
    let mut e = Event {
        trial: None,
        stim: None,
        condition: DEFAULT_CONDITION.into(),
        onset: Onset::Absolute(timestamp),
        duration: None,
    };
    for pair in marker.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| err(format!("{pair:?} is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        let number = |what: &str| -> Result<f64, EventError> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err(format!("{what} {v:?} is not a number")))
        };
        match k {
            "trial" => {
                e.trial =
                    Some(v.parse().map_err(|_| err(format!("trial {v:?} is not a non-negative integer")))?)
            }
            "stim" => {
                e.stim =
                    Some(v.parse().map_err(|_| err(format!("stim {v:?} is not a non-negative integer")))?)
            }
            "cond" | "condition" => {
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err(err(format!("condition {v:?} must be letters, digits, _ or -")));
                }
                e.condition = v.to_string();
            }
            "dur" | "duration" => {
                let d = number("duration")?;
                if d < 0.0 {
                    return Err(err(format!("duration {d} is negative")));
                }
                e.duration = Some(d);
            }
            "onset" => e.onset = Onset::Relative(number("onset")?),
            _ => return Err(err(format!("unknown key {k:?} (use trial, stim, cond, dur, onset)"))),
        }
    }
    Ok(e)
}

/// The live events (markers) that arrived before a volume, carried in its frame: ingest puts
/// them there, the stages that model events (the GLM, the feedback recipe) read them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveEvents(pub Vec<Event>);

/// Live events dropped because too many arrived between two volumes.
pub const EVENTS_DROPPED: crate::reason::Reason =
    crate::reason::Reason::new("events_dropped", "live events dropped: too many arrived between two volumes");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_grammar() {
        let e = parse_marker("trial=12;stim=7;cond=imagery;dur=4", 100.0).unwrap();
        assert_eq!(
            e,
            Event {
                trial: Some(12),
                stim: Some(7),
                condition: "imagery".into(),
                onset: Onset::Absolute(100.0),
                duration: Some(4.0)
            }
        );
        let e = parse_marker(" cond=seen ; onset=10.5 ", 1.0).unwrap();
        assert_eq!((e.onset, e.trial, e.duration), (Onset::Relative(10.5), None, None));
        for (bad, hint) in [
            ("trial=x", "trial"),
            ("stim=-1", "stim"),
            ("dur=-2", "negative"),
            ("colour=red", "unknown key"),
            ("trial", "key=value"),
            ("cond=a/b", "condition"),
            ("onset=nan", "onset"),
        ] {
            let e = parse_marker(bad, 0.0).unwrap_err().to_string();
            assert!(e.contains(hint), "{bad}: {e}");
        }
        assert!(parse_marker(&"x".repeat(2000), 0.0).is_err());
    }
}
