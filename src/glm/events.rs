//! Events files: the BIDS `events.tsv` known before a run, read into [`Event`]s (live markers
//! are read by ingest, [`crate::event`]).

use std::path::Path;

pub use crate::event::{Event, EventError, Onset, DEFAULT_CONDITION};

/// Reads a BIDS events file: tab-separated with a header naming at least `onset` and
/// `duration`; `trial_type` (condition), `stim_id` and `trial_id` are used when present.
pub fn read_events_tsv(path: &Path) -> Result<Vec<Event>, EventError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| EventError::File { path: p.clone(), reason: e.to_string() })?;
    parse_events_tsv(&text, &p)
}

/// Parses the text of a BIDS events file (see [`read_events_tsv`]); `source` names it in errors.
pub fn parse_events_tsv(text: &str, source: &str) -> Result<Vec<Event>, EventError> {
    let err = |reason: String| EventError::File { path: source.to_string(), reason };
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> =
        lines.next().ok_or_else(|| err("empty file".into()))?.split('\t').map(str::trim).collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let onset = col("onset").ok_or_else(|| err("no onset column".into()))?;
    let duration = col("duration").ok_or_else(|| err("no duration column".into()))?;
    let (ttype, stim, trial) = (col("trial_type"), col("stim_id"), col("trial_id"));
    let mut events = Vec::new();
    for (n, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split('\t').map(str::trim).collect();
        let row = n + 2;
        let cell = |i: usize| {
            cells.get(i).copied().ok_or_else(|| err(format!("line {row}: missing column {}", header[i])))
        };
        let num = |i: usize| -> Result<f64, EventError> {
            let c = cell(i)?;
            c.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err(format!("line {row}: {} {c:?} is not a number", header[i])))
        };
        let opt_int = |i: Option<usize>| -> Result<Option<u64>, EventError> {
            match i.map(cell).transpose()? {
                None | Some("n/a") | Some("") => Ok(None),
                Some(c) => {
                    c.parse().map(Some).map_err(|_| err(format!("line {row}: {c:?} is not an integer")))
                }
            }
        };
        let d = num(duration)?;
        if d < 0.0 {
            return Err(err(format!("line {row}: negative duration")));
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
        std::fs::write(&p, "onset\tduration\nsoon\t2\n").unwrap();
        assert!(read_events_tsv(&p).unwrap_err().to_string().contains("line 2"));
    }
}
