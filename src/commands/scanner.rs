//! `mirage scanner`: watch the scanner's export folder and send each volume, as soon as it is
//! whole, to a daemon; `mirage convert`: the same readers offline, into a 4-D NIfTI.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::clock;
use crate::ingest::IngestUri;
use crate::scanner::watch::{FolderWatcher, Listed, WatchConfig};
use crate::scanner::Vendor;
use crate::sender::{Delivered, VolumeSender};
use crate::sim::SimConfig;

/// `mirage scanner` options.
#[derive(Clone, Debug)]
pub struct ScannerArgs {
    /// The export folder.
    pub watch: PathBuf,
    /// Destination: pyneal://, zmq:// or lsl://.
    pub to: String,
    /// How files are read and settled.
    pub watch_cfg: WatchConfig,
    /// TR (s) to send when the files carry none.
    pub tr: Option<f64>,
    /// Seconds between looks at the folder (change events, where they work, wake it sooner).
    pub poll_s: f64,
    /// Seconds to wait for the daemon.
    pub timeout_s: f64,
    /// Stop after sending this many volumes.
    pub stop_after: Option<u64>,
    /// Stop when no volume has come for this long (after the first).
    pub idle_exit_s: Option<f64>,
    /// Only poll, as on a network share where change events never come.
    pub no_events: bool,
    /// CURVE keys, for a daemon whose ingest has `ingest.curve`.
    pub curve: Option<crate::curve::ClientCurve>,
}

/// Lists the candidate files of `dir`.
pub fn list(dir: &Path) -> anyhow::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let Ok(entry) = entry else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            out.push(Listed { path: entry.path(), size: meta.len(), modified: meta.modified().ok() });
        }
    }
    Ok(out)
}

/// Reads every volume in `dir` (offline) and writes them, in order, as one 4-D NIfTI.
pub fn convert(dir: &Path, vendor: Vendor, out: &Path) -> anyhow::Result<usize> {
    let cfg = WatchConfig { vendor, settle_s: 0.0, give_up_s: 0.0, reorder_s: 0.0 };
    let mut watcher = FolderWatcher::new(cfg);
    let listing = list(dir)?;
    let all: HashSet<PathBuf> = listing.iter().map(|l| l.path.clone()).collect();
    let step = watcher.process(&listing, &all, 0.0);
    for (path, reason) in &step.skipped {
        eprintln!("mirage: skipped {}: {reason}", path.display());
    }
    let (_, partial) = watcher.waiting();
    if partial > 0 {
        eprintln!("mirage: {partial} volume(s) lack slices and were left out");
    }
    let first = step.volumes.first().with_context(|| format!("no volumes in {}", dir.display()))?;
    let (dims, affine, tr) = (first.volume.dims, first.volume.affine, first.volume.tr);
    for v in &step.volumes {
        if v.volume.dims != dims {
            anyhow::bail!("volume {} is {:?}, the first {dims:?}", v.volume.index, v.volume.dims);
        }
    }
    let data: Vec<&[f32]> = step.volumes.iter().map(|v| v.volume.data.as_slice()).collect();
    crate::io::nifti::write_nifti(out, dims, &affine, tr, &data)?;
    eprintln!("mirage: wrote {} volumes of {dims:?} to {}", data.len(), out.display());
    Ok(data.len())
}

/// Watches the folder and sends volumes until stopped; returns the number sent.
pub fn scanner(args: &ScannerArgs, stop: &AtomicBool) -> anyhow::Result<u64> {
    let uri = IngestUri::parse(&args.to, &SimConfig::default()).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    if !args.watch.is_dir() {
        anyhow::bail!("--watch {}: not a folder", args.watch.display());
    }
    let mut sender = VolumeSender::connect_with(&uri, args.timeout_s, args.curve.as_ref())?;
    let mut events = if args.no_events { None } else { Inotify::new(&args.watch) };
    if events.is_none() {
        tracing::info!("no change events for {}: polling every {} s", args.watch.display(), args.poll_s);
    }
    let mut watcher = FolderWatcher::new(args.watch_cfg.clone());
    let (mut sent, mut skipped, mut last_volume, mut run_over) = (0u64, 0u64, None::<f64>, false);
    // Scanner clock to ours: the first volume's time is when we saw it; later ones keep the
    // scanner's spacing, so export jitter does not reach the GLM's timing.
    let mut clock_offset: Option<f64> = None;
    eprintln!("mirage: watching {} → {}", args.watch.display(), args.to);
    while !stop.load(Ordering::Acquire) && !run_over && args.stop_after.is_none_or(|n| sent < n) {
        let closed = match events.as_mut() {
            Some(e) => e.wait(args.poll_s),
            None => {
                std::thread::sleep(Duration::from_secs_f64(args.poll_s));
                HashSet::new()
            }
        };
        let now = clock::now();
        let step = watcher.process(&list(&args.watch)?, &closed, now);
        for (path, reason) in &step.skipped {
            skipped += 1;
            tracing::warn!("skipped {}: {reason}", path.display());
        }
        if step.duplicates > 0 {
            tracing::warn!("{} volume(s) already sent came again: dropped", step.duplicates);
        }
        if step.gaps > 0 {
            tracing::warn!("{} volume(s) sent after a gap: an earlier one never came", step.gaps);
        }
        for mut v in step.volumes {
            v.volume.acq_time = Some(acquisition_time(v.scanner_time, clock::now(), &mut clock_offset));
            v.volume.run = crate::volume::sanitize_run_id(&format!("series-{}", v.series));
            if v.volume.tr.is_none() {
                v.volume.tr = args.tr;
            }
            let delivered =
                sender.send(&v.volume).with_context(|| format!("sending volume {}", v.volume.index))?;
            tracing::info!("sent volume {} of {}", v.volume.index, v.volume.run);
            sent += 1;
            last_volume = Some(now);
            if delivered == Delivered::Last {
                tracing::info!("the daemon's run is over (STOP): stopping");
                run_over = true;
                break;
            }
            if args.stop_after.is_some_and(|n| sent >= n) {
                break;
            }
        }
        if let (Some(idle), Some(last)) = (args.idle_exit_s, last_volume) {
            if now - last > idle {
                break;
            }
        }
    }
    sender.finish();
    eprintln!("mirage: sent {sent} volumes, skipped {skipped} files");
    Ok(sent)
}

/// A volume's acquisition time on our clock: the scanner's time shifted by the offset fixed at
/// the first volume that had one (seen then), so volumes keep the scanner's spacing; `seen` for
/// files without a time.
pub fn acquisition_time(scanner_time: Option<f64>, seen: f64, offset: &mut Option<f64>) -> f64 {
    match scanner_time {
        Some(t) => t + *offset.get_or_insert(seen - t),
        None => seen,
    }
}

/// Linux change events for one folder: which files were closed after writing (or moved in).
struct Inotify {
    fd: i32,
    dir: PathBuf,
}

impl Inotify {
    fn new(dir: &Path) -> Option<Inotify> {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: plain syscalls on a descriptor this struct owns; `path` is NUL-terminated.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_CREATE | libc::IN_MODIFY;
        // SAFETY: as above.
        if unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) } < 0 {
            // SAFETY: `fd` is ours and open.
            unsafe { libc::close(fd) };
            return None;
        }
        Some(Inotify { fd, dir: dir.to_path_buf() })
    }

    /// Waits up to `seconds` for events; returns the files closed after writing or moved in.
    fn wait(&mut self, seconds: f64) -> HashSet<PathBuf> {
        let mut closed = HashSet::new();
        let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, valid for the call.
        if unsafe { libc::poll(&mut pfd, 1, (seconds * 1e3) as i32) } <= 0 {
            return closed;
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return closed;
            }
            let mut at = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                let field = |o: usize| {
                    u32::from_ne_bytes([buf[at + o], buf[at + o + 1], buf[at + o + 2], buf[at + o + 3]])
                };
                // struct inotify_event { int wd; uint32_t mask, cookie, len; char name[]; }
                let (mask, len) = (field(4), field(12) as usize);
                let name_end = (at + header + len).min(n as usize);
                let name = &buf[at + header..name_end];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0 && !name.is_empty() {
                    closed.insert(self.dir.join(std::ffi::OsStr::from_bytes(name)));
                }
                at = name_end;
            }
        }
    }
}

impl Drop for Inotify {
    fn drop(&mut self) {
        // SAFETY: `fd` is ours and open.
        unsafe { libc::close(self.fd) };
    }
}

/// Stops `mirage scanner` on SIGINT/SIGTERM.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    super::run::watch_signals(stop.clone()).map(|_| stop.clone()).unwrap_or(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_keep_the_scanners_spacing_on_our_clock() {
        let mut offset = None;
        // Seen 0.3 s and then 0.1 s after acquisition: export jitter does not move them.
        assert!((acquisition_time(Some(36_000.0), 500.3, &mut offset) - 500.3).abs() < 1e-9);
        assert!((acquisition_time(Some(36_001.0), 501.1, &mut offset) - 501.3).abs() < 1e-9);
        assert_eq!(acquisition_time(None, 502.0, &mut offset), 502.0);
    }
}
