//! Replay of a recorded session folder (`file://SESSION_DIR`): every volume in the order it
//! arrived, with its run id, sender index, grid, affine and TR as recorded, each preceded by
//! the markers recorded before it, released at the URI's pace, so a session can be re-run
//! offline with another configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pacer::Pacer;
use super::uri::Playback;
use super::{IngestError, Source, SourceEvent, SourceLimits};
use crate::clock;
use crate::glm::events::{Event, Onset};
use crate::io::session::{IndexEntry, SessionError, SessionReader};

/// Plays a session folder's volumes; `acq_time` is each volume's scheduled release time.
pub struct SessionReplay {
    reader: SessionReader,
    dir: PathBuf,
    pacer: Pacer,
    tr: Option<f64>,
    next: usize,
    /// Markers of entry `next` already played.
    markers_played: usize,
}

impl SessionReplay {
    /// Opens the session folder `dir`; `tr` overrides the recorded repetition times.
    pub fn open(
        dir: &Path,
        playback: Playback,
        tr: Option<f64>,
        limits: SourceLimits,
    ) -> Result<SessionReplay, IngestError> {
        let reader = SessionReader::open(dir)?;
        let corrupt = |reason: String| SessionError::Corrupt { path: dir.to_path_buf(), reason };
        if reader.entries.is_empty() {
            return Err(corrupt("the session holds no volumes".into()).into());
        }
        // Sizes are checked before any volume is read.
        if let Some(e) = reader.entries.iter().find(|e| e.dims.iter().product::<usize>() > limits.max_voxels)
        {
            return Err(corrupt(format!(
                "volume {} has {:?} voxels, above ingest.max_voxels",
                e.index, e.dims
            ))
            .into());
        }
        let pace_tr = tr.or_else(|| reader.entries.iter().find_map(|e| e.tr)).unwrap_or(2.0);
        Ok(SessionReplay {
            reader,
            dir: dir.to_path_buf(),
            pacer: Pacer::new(playback.speed.interval(pace_tr), playback.delay),
            tr,
            next: 0,
            markers_played: 0,
        })
    }

    /// Marker `k` of entry `i` as the live run's GLM read it: an onset on the recording's clock
    /// becomes one relative to its run's start there (as the GLM reckons it), which the
    /// replay's clock does not share.
    fn marker(&self, i: usize, k: usize) -> Option<Event> {
        let entries = &self.reader.entries;
        let mut e: Event = serde_json::from_value(entries[i].markers.get(k)?.clone()).ok()?;
        if let Onset::Absolute(t) = e.onset {
            let first: &IndexEntry = entries.iter().find(|x| x.run == entries[i].run)?;
            let tr = self.tr.or(first.tr).unwrap_or(2.0);
            let t0 = first.acq_time.unwrap_or(first.recv_time) - first.index as f64 * tr;
            e.onset = Onset::Relative(t - t0);
        }
        Some(e)
    }
}

impl Source for SessionReplay {
    fn next(&mut self, timeout: Duration) -> SourceEvent {
        if self.next >= self.reader.entries.len() {
            return SourceEvent::End;
        }
        while self.markers_played < self.reader.entries[self.next].markers.len() {
            self.markers_played += 1;
            if let Some(e) = self.marker(self.next, self.markers_played - 1) {
                return SourceEvent::Marker(e);
            }
        }
        let Some(due) = self.pacer.wait_for(self.next as u64, timeout) else {
            return SourceEvent::Idle;
        };
        match self.reader.volume(self.next) {
            Ok(mut v) => {
                v.tr = self.tr.or(v.tr);
                v.acq_time = Some(due);
                v.recv_time = clock::now();
                self.next += 1;
                self.markers_played = 0;
                SourceEvent::Volume(v)
            }
            Err(e) => {
                // A damaged record: report it and go on with the next.
                self.next += 1;
                self.markers_played = 0;
                SourceEvent::Rejected(e.into())
            }
        }
    }

    fn describe(&self) -> String {
        format!("session replay {} ({} volumes)", self.dir.display(), self.reader.entries.len())
    }
}
