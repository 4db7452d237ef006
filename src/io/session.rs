//! The session folder: every received volume, appended as it arrives, and a log of every
//! published message.
//!
//! ```text
//! DIR/session.json      what ran: version, start time, configuration
//! DIR/volumes.f32       voxel data, one record per volume (little-endian f32, x fastest)
//! DIR/volumes.jsonl     one line per volume: seq, index, run, dims, affine, tr, times,
//!                       byte offset and length in volumes.f32, CRC-32 of those bytes, the
//!                       markers received since the previous volume
//! DIR/messages.jsonl    one line per published message: time, topic, JSON header
//! ```
//!
//! Data is written before its index line, so a crash leaves at worst unindexed bytes or a torn
//! last line; [`SessionReader`] ignores both and checks every record's CRC.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::volume::{f32_le_view, Affine, Volume};

/// File names inside a session folder.
pub const SESSION_JSON: &str = "session.json";
/// Raw voxel data.
pub const VOLUMES_DATA: &str = "volumes.f32";
/// Index of the raw data.
pub const VOLUMES_INDEX: &str = "volumes.jsonl";
/// Published message log.
pub const MESSAGES_LOG: &str = "messages.jsonl";

/// Why a session folder could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A file operation failed.
    #[error("record: {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// The folder already holds a session.
    #[error("record: {0} exists and is not empty; choose a new session folder")]
    NotEmpty(PathBuf),
    /// A record is damaged.
    #[error("record: {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SessionError + '_ {
    move |source| SessionError::Io { path: path.to_path_buf(), source }
}

/// One line of `volumes.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Arrival number in the session.
    pub seq: u64,
    /// Volume index as the sender numbered it.
    pub index: u64,
    /// Run id.
    pub run: String,
    /// Grid.
    pub dims: [usize; 3],
    /// Voxel-to-world matrix.
    pub affine: Affine,
    /// Repetition time, s.
    pub tr: Option<f64>,
    /// Acquisition time, s (sender clock).
    pub acq_time: Option<f64>,
    /// Receive time, s (daemon clock).
    pub recv_time: f64,
    /// Byte offset in `volumes.f32`.
    pub offset: u64,
    /// Byte length.
    pub nbytes: u64,
    /// CRC-32 of the bytes.
    pub crc32: u32,
    /// Duplicate / gap / order flags at arrival.
    #[serde(default)]
    pub flags: serde_json::Value,
    /// The markers (trial events) received since the previous volume, in arrival order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<serde_json::Value>,
}

/// When the recorder forces data to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncPolicy {
    /// `fdatasync` after every volume (survives power loss; costs a disk flush per volume).
    EveryVolume,
    /// Leave flushing to the OS (survives a daemon crash, not power loss).
    Os,
}

/// Appends volumes to a session folder.
pub struct SessionWriter {
    dir: PathBuf,
    data: File,
    index: File,
    offset: u64,
    sync: SyncPolicy,
}

impl SessionWriter {
    /// Creates the folder (refusing one that already has files) and writes `session.json`.
    pub fn create(
        dir: &Path,
        meta: &serde_json::Value,
        sync: SyncPolicy,
    ) -> Result<SessionWriter, SessionError> {
        if dir.exists() && std::fs::read_dir(dir).map_err(io_err(dir))?.next().is_some() {
            return Err(SessionError::NotEmpty(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let meta_path = dir.join(SESSION_JSON);
        let text = serde_json::to_string_pretty(meta).unwrap_or_else(|_| "{}".into());
        std::fs::write(&meta_path, text).map_err(io_err(&meta_path))?;
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&p)
                .map_err(|source| SessionError::Io { path: p, source })
        };
        Ok(SessionWriter {
            data: open(VOLUMES_DATA)?,
            index: open(VOLUMES_INDEX)?,
            dir: dir.to_path_buf(),
            offset: 0,
            sync,
        })
    }

    /// The session folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one volume: data, then its index line (with the markers received before it).
    pub fn append(
        &mut self,
        seq: u64,
        v: &Volume,
        flags: serde_json::Value,
        markers: &[serde_json::Value],
    ) -> Result<(), SessionError> {
        let bytes = f32_le_view(&v.data);
        let data_path = self.dir.join(VOLUMES_DATA);
        self.data.write_all(&bytes).map_err(io_err(&data_path))?;
        let entry = IndexEntry {
            seq,
            index: v.index,
            run: v.run.clone(),
            dims: v.dims,
            affine: v.affine,
            tr: v.tr,
            acq_time: v.acq_time,
            recv_time: v.recv_time,
            offset: self.offset,
            nbytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
            flags,
            markers: markers.to_vec(),
        };
        self.offset += bytes.len() as u64;
        let mut line = serde_json::to_string(&entry).unwrap_or_default();
        line.push('\n');
        let index_path = self.dir.join(VOLUMES_INDEX);
        if self.sync == SyncPolicy::EveryVolume {
            self.data.sync_data().map_err(io_err(&data_path))?;
        }
        self.index.write_all(line.as_bytes()).map_err(io_err(&index_path))?;
        if self.sync == SyncPolicy::EveryVolume {
            self.index.sync_data().map_err(io_err(&index_path))?;
        }
        Ok(())
    }

    /// Forces everything written so far to disk.
    pub fn sync(&mut self) -> Result<(), SessionError> {
        self.data.sync_all().map_err(io_err(&self.dir.join(VOLUMES_DATA)))?;
        self.index.sync_all().map_err(io_err(&self.dir.join(VOLUMES_INDEX)))
    }
}

/// Appends published message headers to `messages.jsonl`.
pub struct MessageLog {
    path: PathBuf,
    file: std::io::BufWriter<File>,
}

impl MessageLog {
    /// Opens (creates or appends to) the log in a session folder.
    pub fn open(dir: &Path) -> Result<MessageLog, SessionError> {
        let path = dir.join(MESSAGES_LOG);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        Ok(MessageLog { path, file: std::io::BufWriter::new(file) })
    }

    /// Writes one line `{"t": …, "topic": …, "header": …}` and hands it to the OS.
    pub fn append(&mut self, t: f64, topic: &str, header: &serde_json::Value) -> Result<(), SessionError> {
        let line = serde_json::json!({"t": t, "topic": topic, "header": header});
        let path = self.path.clone();
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|source| SessionError::Io { path, source })
    }
}

/// Reads a session folder back, tolerating the torn tail a crash can leave.
#[derive(Debug)]
pub struct SessionReader {
    dir: PathBuf,
    /// Contents of `session.json`.
    pub meta: serde_json::Value,
    /// Every complete index line whose data is present, in arrival order.
    pub entries: Vec<IndexEntry>,
}

impl SessionReader {
    /// Opens a session folder.
    pub fn open(dir: &Path) -> Result<SessionReader, SessionError> {
        let meta_path = dir.join(SESSION_JSON);
        let meta_text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let meta = serde_json::from_str(&meta_text)
            .map_err(|e| SessionError::Corrupt { path: meta_path, reason: e.to_string() })?;
        let data_path = dir.join(VOLUMES_DATA);
        let data_len = std::fs::metadata(&data_path).map_err(io_err(&data_path))?.len();
        let index_path = dir.join(VOLUMES_INDEX);
        let file = File::open(&index_path).map_err(io_err(&index_path))?;
        let mut entries = Vec::new();
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(io_err(&index_path))?;
            // A torn last line does not parse; everything before it is intact.
            let Ok(e) = serde_json::from_slice::<IndexEntry>(&line) else {
                break;
            };
            if e.offset + e.nbytes > data_len {
                break;
            }
            entries.push(e);
        }
        Ok(SessionReader { dir: dir.to_path_buf(), meta, entries })
    }

    /// Reads entry `i`'s volume, checking its length and CRC.
    pub fn volume(&self, i: usize) -> Result<Volume, SessionError> {
        let path = self.dir.join(VOLUMES_DATA);
        let corrupt = |reason: String| SessionError::Corrupt { path: path.clone(), reason };
        let e = self.entries.get(i).ok_or_else(|| corrupt(format!("no entry {i}")))?;
        let n: usize = e.dims.iter().product();
        if e.nbytes != n as u64 * 4 {
            return Err(corrupt(format!("entry {i}: {} bytes for {n} voxels", e.nbytes)));
        }
        let mut f = File::open(&path).map_err(io_err(&path))?;
        f.seek(SeekFrom::Start(e.offset)).map_err(io_err(&path))?;
        let mut bytes = vec![0u8; e.nbytes as usize];
        f.read_exact(&mut bytes).map_err(io_err(&path))?;
        if crc32fast::hash(&bytes) != e.crc32 {
            return Err(corrupt(format!("entry {i}: CRC mismatch")));
        }
        let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Volume {
            data,
            dims: e.dims,
            affine: e.affine,
            index: e.index,
            run: e.run.clone(),
            tr: e.tr,
            acq_time: e.acq_time,
            recv_time: e.recv_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(index: u64) -> Volume {
        Volume {
            data: (0..8).map(|i| (i as u64 * 10 + index) as f32).collect(),
            dims: [2, 2, 2],
            affine: crate::volume::IDENTITY_AFFINE,
            index,
            run: "r".into(),
            tr: Some(1.0),
            acq_time: None,
            recv_time: 1.0,
        }
    }

    #[test]
    fn append_reopen_and_survive_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &serde_json::json!({"k": 1}), SyncPolicy::Os).unwrap();
        for i in 0..3 {
            w.append(i, &vol(i), serde_json::Value::Null, &[]).unwrap();
        }
        drop(w);
        // A crash mid-append: extra data bytes and half an index line.
        let mut f = OpenOptions::new().append(true).open(s.join(VOLUMES_DATA)).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        let mut f = OpenOptions::new().append(true).open(s.join(VOLUMES_INDEX)).unwrap();
        f.write_all(b"{\"seq\": 3, \"ind").unwrap();
        let r = SessionReader::open(&s).unwrap();
        assert_eq!(r.entries.len(), 3);
        for i in 0..3 {
            assert_eq!(r.volume(i).unwrap(), vol(i as u64));
        }
        assert!(matches!(
            SessionWriter::create(&s, &serde_json::json!({}), SyncPolicy::Os),
            Err(SessionError::NotEmpty(_))
        ));
    }

    #[test]
    fn flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &serde_json::json!({}), SyncPolicy::EveryVolume).unwrap();
        w.append(0, &vol(0), serde_json::Value::Null, &[]).unwrap();
        let mut bytes = std::fs::read(s.join(VOLUMES_DATA)).unwrap();
        bytes[5] ^= 0xff;
        std::fs::write(s.join(VOLUMES_DATA), bytes).unwrap();
        assert!(matches!(SessionReader::open(&s).unwrap().volume(0), Err(SessionError::Corrupt { .. })));
    }
}
