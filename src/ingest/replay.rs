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
use crate::event::{Event, Onset};
use crate::io::session::{SessionError, SessionReader};

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
    /// A recorded marker that does not read as one is an error naming the volume it preceded.
    fn marker(&self, i: usize, k: usize) -> Result<Event, IngestError> {
        let entries = &self.reader.entries;
        let recorded = entries[i].markers.get(k).cloned().unwrap_or_default();
        let mut e: Event = serde_json::from_value(recorded).map_err(|err| SessionError::Corrupt {
            path: self.dir.clone(),
            reason: format!(
                "marker {k} before volume {} of run {:?}: {err}",
                entries[i].index, entries[i].run
            ),
        })?;
        if let Onset::Absolute(t) = e.onset {
            e.onset = Onset::Relative(t - self.reader.run_start(i, self.tr));
        }
        Ok(e)
    }
}

impl Source for SessionReplay {
    fn next(&mut self, timeout: Duration) -> SourceEvent {
        if self.next >= self.reader.entries.len() {
            return SourceEvent::End;
        }
        if self.markers_played < self.reader.entries[self.next].markers.len() {
            self.markers_played += 1;
            return match self.marker(self.next, self.markers_played - 1) {
                Ok(e) => SourceEvent::Marker(e),
                Err(e) => SourceEvent::Rejected(e),
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::session::SessionWriter;
    use crate::volume::{Volume, IDENTITY_AFFINE};

    #[test]
    fn markers_come_before_their_volume_and_a_damaged_one_is_an_error_not_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &serde_json::json!({})).unwrap();
        let v = |index| Volume {
            data: vec![index as f32; 8],
            dims: [2, 2, 2],
            affine: IDENTITY_AFFINE,
            index,
            run: "r".into(),
            tr: Some(1.0),
            acq_time: Some(100.0 + index as f64),
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        };
        let marker = |onset| Event {
            trial: Some(0),
            stim: Some(3),
            condition: "seen".into(),
            onset,
            duration: Some(4.0),
        };
        let good = serde_json::to_value(marker(Onset::Absolute(102.5))).unwrap();
        w.append(0, &v(0), serde_json::Value::Null, &[]).unwrap();
        w.append(1, &v(1), serde_json::Value::Null, &[serde_json::json!({"not": "a marker"}), good]).unwrap();
        drop(w);
        let limits = SourceLimits { max_voxels: 1 << 20 };
        let playback = Playback { speed: crate::ingest::uri::Speed::Max, delay: 0.0 };
        let mut r = SessionReplay::open(&s, playback, None, limits).unwrap();
        let mut next = || r.next(Duration::from_secs(1));
        assert!(matches!(next(), SourceEvent::Volume(x) if x.index == 0));
        assert!(matches!(next(), SourceEvent::Rejected(IngestError::Session(SessionError::Corrupt { .. }))));
        // Absolute onsets become relative to the run's start as the live GLM reckoned it.
        assert!(matches!(next(), SourceEvent::Marker(e) if e == marker(Onset::Relative(2.5))));
        assert!(matches!(next(), SourceEvent::Volume(x) if x.index == 1 && x.data == vec![1.0; 8]));
        assert!(matches!(next(), SourceEvent::End));
    }
}
