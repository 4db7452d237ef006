//! Replay of a 4-D NIfTI series as if it were arriving from the scanner.

use std::path::Path;
use std::time::Duration;

use super::pacer::Pacer;
use super::uri::Playback;
use super::{IngestError, Source, SourceEvent, SourceLimits};
use crate::clock;
use crate::io::nifti::NiftiReader;
use crate::volume::{Affine, Volume};

/// Reads volumes in order and releases them at the chosen speed; `acq_time` is each volume's
/// scheduled release time.
pub struct FileReplay {
    reader: NiftiReader,
    pacer: Pacer,
    dims: [usize; 3],
    affine: Affine,
    tr: f64,
    run: String,
    index: u64,
}

impl FileReplay {
    /// Opens `path`; `tr` overrides the header's repetition time.
    pub fn open(
        path: &Path,
        playback: Playback,
        tr: Option<f64>,
        limits: SourceLimits,
        run: &str,
    ) -> Result<FileReplay, IngestError> {
        let reader = NiftiReader::open(path, limits.max_voxels)?;
        let h = reader.header();
        let tr = match (tr, h.tr_seconds().map(super::plausible_tr_seconds)) {
            (Some(t), _) => t,
            (None, Some((t, true))) => {
                tracing::warn!(
                    "{}: header TR {} s is implausible; assuming {t} s (milliseconds mislabelled); pass ?tr=SECONDS to override",
                    path.display(),
                    t * 1e3
                );
                t
            }
            (None, Some((t, false))) => t,
            (None, None) => {
                tracing::warn!("{}: no TR in the header; assuming 2 s (pass ?tr=SECONDS)", path.display());
                2.0
            }
        };
        let (dims, affine) = (h.volume_dims(), h.affine());
        let run = path
            .file_name()
            .map(|f| f.to_string_lossy().split('.').next().unwrap_or(run).to_string())
            .unwrap_or_else(|| run.to_string());
        Ok(FileReplay {
            reader,
            pacer: Pacer::new(playback.speed.interval(tr), playback.delay),
            dims,
            affine,
            tr,
            run: crate::volume::sanitize_run_id(&run),
            index: 0,
        })
    }
}

impl Source for FileReplay {
    fn next(&mut self, timeout: Duration) -> SourceEvent {
        if self.index as usize >= self.reader.header().n_volumes() {
            return SourceEvent::End;
        }
        let Some(due) = self.pacer.wait_for(self.index, timeout) else {
            return SourceEvent::Idle;
        };
        match self.reader.read_volume() {
            Ok(Some(data)) => {
                let v = Volume {
                    data,
                    dims: self.dims,
                    affine: self.affine,
                    index: self.index,
                    run: self.run.clone(),
                    tr: Some(self.tr),
                    acq_time: Some(due),
                    recv_time: clock::now(),
                    dtype: self.reader.header().dtype,
                };
                self.index += 1;
                SourceEvent::Volume(v)
            }
            Ok(None) => SourceEvent::End,
            Err(e) => {
                // A truncated file cannot continue: report it, then end.
                self.index = u64::MAX;
                SourceEvent::Rejected(e.into())
            }
        }
    }

    fn describe(&self) -> String {
        format!("file replay {}", self.reader.path().display())
    }
}
