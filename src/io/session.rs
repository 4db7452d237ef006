//! The session folder: every received volume, appended as it arrives, and a log of every
//! published message.
//!
//! ```text
//! DIR/session.json      what ran: version, start time, configuration
//! DIR/volumes.f32       voxel data, one record per volume (little-endian f32, x fastest)
//! DIR/volumes.jsonl     one line per volume: seq, index, run, dims, affine, tr, times,
//!                       byte offset and length in volumes.f32, CRC-32 of those bytes, the
//!                       markers received since the previous volume
//! DIR/messages.jsonl    one line per published message: time, topic, JSON header and, but for
//!                       `volume` messages, where its payloads lie in payloads.bin (`data`)
//! DIR/payloads.bin      the payload bytes of those messages (trial betas, decode outputs, …)
//! ```
//!
//! Data is written before its index line, so a crash leaves at worst unindexed bytes or a torn
//! last line; [`SessionReader`] ignores both and checks every record's CRC.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::volume::{f32_le_view, Affine, Dtype, Volume};

/// File names inside a session folder.
pub const SESSION_JSON: &str = "session.json";
/// Raw voxel data.
pub const VOLUMES_DATA: &str = "volumes.f32";
/// Index of the raw data.
pub const VOLUMES_INDEX: &str = "volumes.jsonl";
/// Published message log.
pub const MESSAGES_LOG: &str = "messages.jsonl";
/// Payload bytes of the logged messages.
pub const PAYLOADS_DATA: &str = "payloads.bin";

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
    /// The sample type the volume arrived in (stored here as f32).
    #[serde(default = "float32")]
    pub dtype: Dtype,
    /// The markers (trial events) received since the previous volume, in arrival order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<serde_json::Value>,
}

fn float32() -> Dtype {
    Dtype::F32
}

/// `[record]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordConfig {
    /// Session folder (`{time}` becomes the UTC start time), or `"none"`.
    #[serde(with = "crate::settings::none_string")]
    pub dir: Option<String>,
    /// `every_volume` (fdatasync each volume) or `os` (the OS flushes).
    pub sync: SyncPolicy,
}

impl Default for RecordConfig {
    fn default() -> RecordConfig {
        RecordConfig { dir: Some("sessions/{time}".into()), sync: SyncPolicy::EveryVolume }
    }
}

/// When the recorder forces data to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncPolicy {
    /// `fdatasync` after every volume, off the acknowledgement's path (survives power loss once
    /// flushed; costs a disk flush per volume).
    EveryVolume,
    /// Leave flushing to the OS (survives a daemon crash, not power loss).
    Os,
}

/// Bytes per `write` of a volume's data. A kernel without preemption (`PREEMPT_NONE`, the
/// server default) runs a `write` to its end before a waiting realtime thread of the volume
/// path gets the core: a whole 64×64×36 volume held one for 1–2 ms, a piece holds it ~0.1 ms.
const WRITE_PIECE: usize = 64 << 10;

/// Appends volumes to a session folder (to the OS: a [`SessionFlusher`] puts them on disk).
pub struct SessionWriter {
    dir: PathBuf,
    data: File,
    index: File,
    offset: u64,
}

/// Forces a session's appended volumes to disk from a thread of its own, so that a disk's slow
/// flush never holds back the next append (nor the acknowledgement that waits for it).
pub struct SessionFlusher {
    dir: PathBuf,
    data: File,
    index: File,
}

impl SessionFlusher {
    /// `fdatasync`s the data, then the index: every volume appended before the call is on disk.
    pub fn flush(&self) -> Result<(), SessionError> {
        self.data.sync_data().map_err(io_err(&self.dir.join(VOLUMES_DATA)))?;
        self.index.sync_data().map_err(io_err(&self.dir.join(VOLUMES_INDEX)))
    }
}

impl SessionWriter {
    /// Creates the folder (refusing one that already has files) and writes `session.json`.
    pub fn create(dir: &Path, meta: &serde_json::Value) -> Result<SessionWriter, SessionError> {
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
        })
    }

    /// A flusher over this session's files (their handles duplicated).
    pub fn flusher(&self) -> Result<SessionFlusher, SessionError> {
        let dup = |f: &File, name: &str| f.try_clone().map_err(io_err(&self.dir.join(name)));
        Ok(SessionFlusher {
            dir: self.dir.clone(),
            data: dup(&self.data, VOLUMES_DATA)?,
            index: dup(&self.index, VOLUMES_INDEX)?,
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
        for piece in bytes.chunks(WRITE_PIECE) {
            self.data.write_all(piece).map_err(io_err(&data_path))?;
        }
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
            dtype: v.dtype,
            flags,
            markers: markers.to_vec(),
        };
        self.offset += bytes.len() as u64;
        let mut line = serde_json::to_string(&entry).unwrap_or_default();
        line.push('\n');
        self.index.write_all(line.as_bytes()).map_err(io_err(&self.dir.join(VOLUMES_INDEX)))?;
        Ok(())
    }

    /// Forces everything written so far to disk.
    pub fn sync(&mut self) -> Result<(), SessionError> {
        self.data.sync_all().map_err(io_err(&self.dir.join(VOLUMES_DATA)))?;
        self.index.sync_all().map_err(io_err(&self.dir.join(VOLUMES_INDEX)))
    }
}

/// Appends published message headers to `messages.jsonl` and their payloads to `payloads.bin`
/// (bytes first, so a crash leaves at worst unindexed bytes or a torn last line).
pub struct MessageLog {
    path: PathBuf,
    file: std::io::BufWriter<File>,
    data_path: PathBuf,
    data: File,
    offset: u64,
}

/// Where one payload of a logged message lies in `payloads.bin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRecord {
    /// The payload's name (as in the header's `payloads`).
    pub name: String,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub nbytes: u64,
    /// CRC-32 of the bytes.
    pub crc32: u32,
}

/// One line of `messages.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoggedMessage {
    /// When it was published (daemon clock, s).
    pub t: f64,
    /// Its topic.
    pub topic: String,
    /// Its header as sent.
    pub header: serde_json::Value,
    /// Its payloads' places in `payloads.bin` (none for `volume` messages, whose data the
    /// recorded volumes reproduce).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<PayloadRecord>,
}

impl MessageLog {
    /// Opens (creates or appends to) the log in a session folder.
    pub fn open(dir: &Path) -> Result<MessageLog, SessionError> {
        let path = dir.join(MESSAGES_LOG);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        let data_path = dir.join(PAYLOADS_DATA);
        let data =
            OpenOptions::new().create(true).append(true).open(&data_path).map_err(io_err(&data_path))?;
        let offset = data.metadata().map_err(io_err(&data_path))?.len();
        Ok(MessageLog { path, file: std::io::BufWriter::new(file), data_path, data, offset })
    }

    /// Writes `payloads` (named as given) to `payloads.bin`, then one line `{"t", "topic",
    /// "header", "data"}`, and hands both to the OS.
    pub fn append(
        &mut self,
        t: f64,
        topic: &str,
        header: &serde_json::Value,
        payloads: &[(&str, &[u8])],
    ) -> Result<(), SessionError> {
        let mut data = Vec::with_capacity(payloads.len());
        for (name, bytes) in payloads {
            self.data.write_all(bytes).map_err(io_err(&self.data_path))?;
            data.push(PayloadRecord {
                name: name.to_string(),
                offset: self.offset,
                nbytes: bytes.len() as u64,
                crc32: crc32fast::hash(bytes),
            });
            self.offset += bytes.len() as u64;
        }
        let line = LoggedMessage { t, topic: topic.to_string(), header: header.clone(), data };
        let text = serde_json::to_string(&line).unwrap_or_default();
        let path = self.path.clone();
        writeln!(self.file, "{text}")
            .and_then(|_| self.file.flush())
            .map_err(|source| SessionError::Io { path, source })
    }
}

/// Every complete line of a session's `messages.jsonl` (a torn last line ignored), in order.
pub fn read_messages(dir: &Path) -> Result<Vec<LoggedMessage>, SessionError> {
    let path = dir.join(MESSAGES_LOG);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(io_err(&path))?;
        let Ok(m) = serde_json::from_slice::<LoggedMessage>(&line) else { break };
        out.push(m);
    }
    Ok(out)
}

/// Reads the payload `name` of a logged message from the session's `payloads.bin`, checking
/// its length and CRC; `None` when the message has no such payload recorded.
pub fn read_payload(dir: &Path, m: &LoggedMessage, name: &str) -> Result<Option<Vec<u8>>, SessionError> {
    let Some(r) = m.data.iter().find(|r| r.name == name) else { return Ok(None) };
    let path = dir.join(PAYLOADS_DATA);
    let corrupt = |reason: String| SessionError::Corrupt { path: path.clone(), reason };
    let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
    if r.offset.checked_add(r.nbytes).is_none_or(|end| end > len) {
        return Err(corrupt(format!("{} payload {name:?} lies past the end of the file", m.topic)));
    }
    let bytes = read_checked(&path, r.offset, r.nbytes, r.crc32)?
        .ok_or_else(|| corrupt(format!("{} payload {name:?}: CRC mismatch", m.topic)))?;
    Ok(Some(bytes))
}

/// `nbytes` bytes of `path` at `offset`, or `None` when their CRC-32 is not `crc32`.
fn read_checked(path: &Path, offset: u64, nbytes: u64, crc32: u32) -> Result<Option<Vec<u8>>, SessionError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    let mut bytes = vec![0u8; nbytes as usize];
    f.read_exact(&mut bytes).map_err(io_err(path))?;
    Ok((crc32fast::hash(&bytes) == crc32).then_some(bytes))
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

    /// When entry `i`'s run began on the recording's clock, as the live GLM reckoned it: its
    /// first recorded volume's time less its index × TR (`tr`, else the volume's own, else 2 s),
    /// so that an absolute marker time becomes an onset relative to the run.
    pub fn run_start(&self, i: usize, tr: Option<f64>) -> f64 {
        let Some(entry) = self.entries.get(i).or(self.entries.last()) else { return 0.0 };
        let first = self.entries.iter().find(|x| x.run == entry.run).unwrap_or(entry);
        let tr = tr.or(first.tr).unwrap_or(2.0);
        first.acq_time.unwrap_or(first.recv_time) - first.index as f64 * tr
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
        let bytes = read_checked(&path, e.offset, e.nbytes, e.crc32)?
            .ok_or_else(|| corrupt(format!("entry {i}: CRC mismatch")))?;
        let data = crate::volume::f32_from_le_bytes(&bytes);
        Ok(Volume {
            data,
            dims: e.dims,
            affine: e.affine,
            index: e.index,
            run: e.run.clone(),
            tr: e.tr,
            acq_time: e.acq_time,
            recv_time: e.recv_time,
            dtype: e.dtype,
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
            dtype: crate::volume::Dtype::F32,
        }
    }

    #[test]
    fn append_reopen_and_survive_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &serde_json::json!({"k": 1})).unwrap();
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
        assert!(matches!(SessionWriter::create(&s, &serde_json::json!({})), Err(SessionError::NotEmpty(_))));
    }

    #[test]
    fn the_flusher_holds_the_writers_files_and_flushes_what_is_appended_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &serde_json::json!({})).unwrap();
        let flusher = w.flusher().unwrap();
        for i in 0..2 {
            w.append(i, &vol(i), serde_json::Value::Null, &[]).unwrap();
            flusher.flush().unwrap();
        }
        // The same open files, not copies: it sees every byte appended since it was made.
        assert_eq!(flusher.data.metadata().unwrap().len(), 2 * 8 * 4);
        let index_len = std::fs::metadata(s.join(VOLUMES_INDEX)).unwrap().len();
        assert_eq!(flusher.index.metadata().unwrap().len(), index_len);
        drop(w);
        assert_eq!(SessionReader::open(&s).unwrap().volume(1).unwrap().data, vol(1).data);
    }

    #[test]
    fn flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let mut w = SessionWriter::create(&s, &serde_json::json!({})).unwrap();
        w.append(0, &vol(0), serde_json::Value::Null, &[]).unwrap();
        let mut bytes = std::fs::read(s.join(VOLUMES_DATA)).unwrap();
        bytes[5] ^= 0xff;
        std::fs::write(s.join(VOLUMES_DATA), bytes).unwrap();
        assert!(matches!(SessionReader::open(&s).unwrap().volume(0), Err(SessionError::Corrupt { .. })));
    }
}
