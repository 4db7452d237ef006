//! Events files: the BIDS `events.tsv` known before a run, read into [`Event`]s (live markers
//! are read by ingest, [`crate::event`]).

use std::path::Path;

pub use crate::event::{Event, EventError, Onset, DEFAULT_CONDITION};
use crate::io::tsv;

/// Reads a BIDS events file: tab-separated with a header naming at least `onset` and
/// `duration`; `trial_type` (condition), `stim_id` and `trial_id` are used when present. A
/// duration of `n/a` (BIDS' "not applicable") is the configured default duration, with a warning.
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
    let mut unknown_durations = 0;
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
        let d = match cell(duration)? {
            "n/a" => {
                unknown_durations += 1;
                None
            }
            _ => Some(num(duration)?),
        };
        if d.is_some_and(|d| d < 0.0) {
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
            duration: d,
        });
    }
    if unknown_durations > 0 {
        tracing::warn!(
            "events {}: {unknown_durations} rows with duration n/a: each takes the default duration \
             (glm.default_duration_s)",
            table.what
        );
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        std::fs::write(&p, "onset\tduration\ttrial_type\n1\tn/a\tx\n5\t2\tx\n").unwrap();
        let ev = read_events_tsv(&p).unwrap();
        assert_eq!((ev[0].duration, ev[1].duration), (None, Some(2.0)), "n/a: the default duration");
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
