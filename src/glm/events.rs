//! Trial events: the BIDS `events.tsv` known before a run, and live markers (LSL string
//! samples, ZMQ messages) in a small grammar.
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

use std::path::Path;

use crate::io::tsv;

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

/// Reads a BIDS events file: tab-separated with a header naming at least `onset` and
/// `duration`; `trial_type` (condition), `stim_id` and `trial_id` are used when present.
pub fn read_events_tsv(path: &Path) -> Result<Vec<Event>, EventError> {
    let table = tsv::read(path).map_err(file_error)?;
    events_of(&table)
}

/// Parses the text of a BIDS events file (see [`read_events_tsv`]); `source` names it in errors.
pub fn parse_events_tsv(text: &str, source: &str) -> Result<Vec<Event>, EventError> {
    let table = tsv::parse(text, source).map_err(file_error)?;
    events_of(&table)
}

fn file_error(e: tsv::TsvError) -> EventError {
    EventError::File { reason: e.detail(), path: e.what }
}

/// The events of a table read from a BIDS events file.
fn events_of(table: &tsv::Table) -> Result<Vec<Event>, EventError> {
    let err = |line: Option<usize>, reason: String| file_error(table.error(line, reason));
    if table.header.is_empty() {
        return Err(err(None, "empty file".into()));
    }
    let header = &table.header;
    let onset = table.column("onset").ok_or_else(|| err(None, "no onset column".into()))?;
    let duration = table.column("duration").ok_or_else(|| err(None, "no duration column".into()))?;
    let (ttype, stim, trial) =
        (table.column("trial_type"), table.column("stim_id"), table.column("trial_id"));
    let mut events = Vec::new();
    for row in &table.rows {
        let at = Some(row.line);
        let cell = |i: usize| row.get(i).ok_or_else(|| err(at, format!("missing column {}", header[i])));
        let num = |i: usize| -> Result<f64, EventError> {
            let c = cell(i)?;
            c.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err(at, format!("{} {c:?} is not a number", header[i])))
        };
        let opt_int = |i: Option<usize>| -> Result<Option<u64>, EventError> {
            match i.map(cell).transpose()? {
                None | Some("n/a") | Some("") => Ok(None),
                Some(c) => c.parse().map(Some).map_err(|_| err(at, format!("{c:?} is not an integer"))),
            }
        };
        let d = num(duration)?;
        if d < 0.0 {
            return Err(err(at, "negative duration".into()));
        }
        events.push(Event {
            trial: opt_int(trial)?,
            stim: opt_int(stim)?,
            condition: match ttype.map(cell).transpose()? {
                Some(t) if !t.is_empty() && t != "n/a" => t.to_string(),
                _ => DEFAULT_CONDITION.into(),
            },
            onset: Onset::Relative(num(onset)?),
            duration: Some(d),
        });
    }
    Ok(events)
}

/// Live events the GLM's queue had no room for.
pub const EVENTS_DROPPED: crate::reason::Reason =
    crate::reason::Reason::new("events_dropped", "live events dropped: the GLM's queue was full");

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

    #[test]
    fn events_tsv_with_and_without_optional_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.tsv");
        std::fs::write(&p, "onset\tduration\ttrial_type\tstim_id\ttrial_id\n4.000\t4.000\tseen\t3\t0\n12.5\t4\timagery\tn/a\t1\n").unwrap();
        let ev = read_events_tsv(&p).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].stim, ev[0].trial, ev[0].condition.as_str()), (Some(3), Some(0), "seen"));
        assert_eq!((ev[1].stim, ev[1].onset), (None, Onset::Relative(12.5)));
        std::fs::write(&p, "onset\tduration\n1\t2\n").unwrap();
        assert_eq!(read_events_tsv(&p).unwrap()[0].condition, "task");
        std::fs::write(&p, "onset\ttrial_type\n1\tx\n").unwrap();
        assert!(read_events_tsv(&p).unwrap_err().to_string().contains("duration"));
        std::fs::write(&p, "onset\tduration\nsoon\t2\n").unwrap();
        assert!(read_events_tsv(&p).unwrap_err().to_string().contains("line 2"));
    }

    #[test]
    fn a_comma_separated_events_file_is_named_as_such() {
        let e = parse_events_tsv("onset,duration,trial_type\n1,2,seen\n", "events.tsv").unwrap_err();
        assert_eq!(
            e.to_string(),
            "events: events.tsv: line 1: the header has no tab; is it comma-separated? BIDS files are \
             tab-separated"
        );
    }
}
