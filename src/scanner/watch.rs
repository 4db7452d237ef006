//! The export folder, looked at again and again: which files are new, which are whole (they
//! parse, and their size has held still or the writer has closed them), which volumes are
//! complete, and in which order to send them. Reading files is all it does: the runner
//! (`mirage scanner`) owns the loop, the clock, change events and the connection.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::assemble::Assembler;
use super::{read_file, FileContent, ScannedVolume, ScannerError, Vendor};

/// How the watcher decides.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Which scanner wrote the files.
    pub vendor: Vendor,
    /// Seconds a file's size must hold still before it is read, when no close event came.
    pub settle_s: f64,
    /// Seconds a file may stay unreadable after its size settled before it is skipped.
    pub give_up_s: f64,
    /// Seconds a volume waits for an earlier one that has not arrived before it is sent anyway.
    pub reorder_s: f64,
}

impl Default for WatchConfig {
    fn default() -> WatchConfig {
        WatchConfig { vendor: Vendor::Auto, settle_s: 0.2, give_up_s: 10.0, reorder_s: 2.0 }
    }
}

/// One file in the folder as listed: path, size in bytes, modification time.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its modification time (any monotone stamp).
    pub modified: Option<std::time::SystemTime>,
}

enum FileState {
    /// Seen, not read yet: its size and stamp, and when they last changed.
    Waiting { size: u64, modified: Option<std::time::SystemTime>, since: f64 },
    /// Read, or skipped.
    Finished,
}

/// What one look gives.
#[derive(Debug, Default)]
pub struct Step {
    /// Volumes to send now, in order.
    pub volumes: Vec<ScannedVolume>,
    /// Files skipped, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Volumes dropped as duplicates (an index already sent or held).
    pub duplicates: u64,
    /// Volumes sent after a gap (an earlier index never came within `reorder_s`).
    pub gaps: u64,
}

/// The folder's state between looks.
pub struct FolderWatcher {
    cfg: WatchConfig,
    files: BTreeMap<PathBuf, FileState>,
    assembler: Assembler,
    held: BTreeMap<u64, (ScannedVolume, f64)>,
    series: Option<String>,
    next: Option<u64>,
}

impl FolderWatcher {
    /// A watcher that has seen nothing.
    pub fn new(cfg: WatchConfig) -> FolderWatcher {
        FolderWatcher {
            cfg,
            files: BTreeMap::new(),
            assembler: Assembler::default(),
            held: BTreeMap::new(),
            series: None,
            next: None,
        }
    }

    /// One look at the folder: `listing` is every file in it, `closed` those a change event
    /// says were closed after writing since the last look, `now` the time in seconds.
    pub fn process(&mut self, listing: &[Listed], closed: &HashSet<PathBuf>, now: f64) -> Step {
        let mut step = Step::default();
        let mut listing: Vec<&Listed> = listing.iter().filter(|l| super::is_candidate(&l.path)).collect();
        listing.sort_by(|a, b| a.path.cmp(&b.path));
        for l in listing {
            let state = self.files.entry(l.path.clone()).or_insert(FileState::Waiting {
                size: l.size,
                modified: l.modified,
                since: now,
            });
            let FileState::Waiting { size, modified, since } = state else { continue };
            if (*size, *modified) != (l.size, l.modified) {
                (*size, *modified, *since) = (l.size, l.modified, now);
            }
            let settled = now - *since >= self.cfg.settle_s;
            if !(settled || closed.contains(&l.path)) || l.size == 0 {
                continue;
            }
            match read_file(&l.path, self.cfg.vendor) {
                Ok(content) => {
                    *state = FileState::Finished;
                    self.take(content, &l.path, now, &mut step);
                }
                Err(ScannerError::Incomplete { reason, .. }) => {
                    if settled && now - *since >= self.cfg.give_up_s {
                        *state = FileState::Finished;
                        step.skipped.push((
                            l.path.clone(),
                            format!("still unreadable after its size held still: {reason}"),
                        ));
                    }
                }
                Err(e) => {
                    *state = FileState::Finished;
                    step.skipped.push((l.path.clone(), e.to_string()));
                }
            }
        }
        self.release(now, &mut step);
        step
    }

    fn take(&mut self, content: FileContent, path: &Path, now: f64, step: &mut Step) {
        let volumes = match content {
            FileContent::Volumes(v) => v,
            FileContent::Slice(s) => match self.assembler.process(s) {
                Ok(v) => v.into_iter().collect(),
                Err(e) => {
                    step.skipped.push((path.to_path_buf(), e));
                    Vec::new()
                }
            },
        };
        for v in volumes {
            if self.series.as_ref().is_some_and(|s| *s != v.series) {
                // A new series is a new run: what the old one still holds goes first.
                let old = std::mem::take(&mut self.held);
                step.volumes.extend(old.into_values().map(|(v, _)| v));
                self.next = None;
            }
            self.series = Some(v.series.clone());
            let index = v.volume.index;
            if self.next.is_some_and(|n| index < n) || self.held.contains_key(&index) {
                step.duplicates += 1;
                continue;
            }
            self.held.insert(index, (v, now));
        }
    }

    /// Sends held volumes in index order; a volume that has waited `reorder_s` for an earlier
    /// one is sent anyway.
    fn release(&mut self, now: f64, step: &mut Step) {
        loop {
            let Some((&first, (_, at))) = self.held.iter().next() else { return };
            let waited = now - at >= self.cfg.reorder_s;
            let next = match self.next {
                Some(n) => n,
                // The first volume seen: index 0 starts at once; a later one (the watcher began
                // mid-run, or files came out of order) waits for earlier ones a moment.
                None if first == 0 || waited => first,
                None => return,
            };
            if first != next {
                if !waited {
                    return;
                }
                step.gaps += 1;
            }
            if let Some((v, _)) = self.held.remove(&first) {
                step.volumes.push(v);
            }
            self.next = Some(first + 1);
        }
    }

    /// Volumes read but not yet sent, and GE volumes still missing slices.
    pub fn waiting(&self) -> (usize, usize) {
        (self.held.len(), self.assembler.pending())
    }
}
