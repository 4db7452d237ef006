//! What ingest makes of a source's events before they go down the volume path: each volume's
//! index bookkeeping (duplicates, gaps, reordering, new runs), the configured TR over the
//! sender's, and the live markers held for the next volume's frame.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::event::{Event, EVENTS_DROPPED};
use crate::frame::IngestFlags;
use crate::metrics::Metrics;
use crate::volume::Volume;

/// Live events held between two volumes; beyond this they are dropped (counted).
pub const MAX_PENDING_EVENTS: usize = 4096;

/// Tracks indices per run to flag duplicates, gaps and reordering.
#[derive(Default)]
pub struct IndexTracker {
    run: Option<(String, [usize; 3])>,
    max_seen: Option<u64>,
    seen: HashSet<u64>,
}

impl IndexTracker {
    /// The flags of `v` against the volumes before it in its run; counts duplicates, gaps and
    /// late arrivals in `m`.
    pub fn observe(&mut self, v: &Volume, m: &Metrics) -> IngestFlags {
        let mut flags = IngestFlags::default();
        let key = (v.run.clone(), v.dims);
        if self.run.as_ref() != Some(&key) {
            if self.run.is_some() {
                tracing::info!("ingest: new run {:?} grid {:?} from volume {}", v.run, v.dims, v.index);
            }
            flags.new_run = true;
            self.run = Some(key);
            self.max_seen = None;
            self.seen.clear();
        }
        flags.duplicate = !self.seen.insert(v.index);
        match self.max_seen {
            Some(max) if v.index > max + 1 => flags.gap_before = v.index - max - 1,
            Some(max) if v.index < max && !flags.duplicate => {
                flags.out_of_order = true;
                // It fills a hole counted earlier.
                let _ = m.missing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| x.checked_sub(1));
            }
            _ => {}
        }
        self.max_seen = Some(self.max_seen.map_or(v.index, |m| m.max(v.index)));
        if flags.duplicate {
            m.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        if flags.out_of_order {
            m.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        m.missing.fetch_add(flags.gap_before, Ordering::Relaxed);
        flags
    }
}

/// A volume as ingest hands it down the path: with its flags and the markers that came before it.
pub struct Accepted {
    /// The volume, with the configured TR.
    pub volume: Volume,
    /// Index bookkeeping.
    pub flags: IngestFlags,
    /// The live events received since the previous volume.
    pub events: Vec<Event>,
}

/// Ingest's bookkeeping between a source and the volume path.
pub struct Intake {
    tracker: IndexTracker,
    /// The configured TR, over the sender's.
    tr: Option<f64>,
    events: Vec<Event>,
    last_tr: Option<f64>,
}

impl Intake {
    /// Bookkeeping for a run whose configured TR (`None`: the sender's) is `tr`.
    pub fn new(tr: Option<f64>) -> Intake {
        Intake { tracker: IndexTracker::default(), tr, events: Vec::new(), last_tr: tr }
    }

    /// Holds a live event for the next volume (dropped and counted beyond
    /// [`MAX_PENDING_EVENTS`]).
    pub fn event(&mut self, e: Event, m: &Metrics) {
        if self.events.len() >= MAX_PENDING_EVENTS {
            m.count(EVENTS_DROPPED);
            return;
        }
        self.events.push(e);
    }

    /// Takes a valid volume: the configured TR set, its flags, and the events held for it.
    pub fn volume(&mut self, mut v: Volume, m: &Metrics) -> Accepted {
        v.tr = self.tr.or(v.tr);
        self.last_tr = v.tr.or(self.last_tr);
        let flags = self.tracker.observe(&v, m);
        m.received.fetch_add(1, Ordering::Relaxed);
        Accepted { volume: v, flags, events: std::mem::take(&mut self.events) }
    }

    /// The TR of the latest volume (or the configured one).
    pub fn last_tr(&self) -> Option<f64> {
        self.last_tr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(run: &str, index: u64, dims: [usize; 3]) -> Volume {
        Volume {
            data: Vec::new(),
            dims,
            affine: crate::volume::IDENTITY_AFFINE,
            index,
            run: run.into(),
            tr: None,
            acq_time: None,
            recv_time: 0.0,
            dtype: crate::volume::Dtype::F32,
        }
    }

    /// `(new_run, gap_before, out_of_order, duplicate)` of one volume.
    type Flags = (bool, u64, bool, bool);

    /// Flags of each index in turn (run `r1`, one grid), and the counters after them
    /// (missing, out of order, duplicates).
    fn observe(indices: &[u64]) -> (Vec<Flags>, [u64; 3]) {
        let (mut tracker, m) = (IndexTracker::default(), Metrics::new(0.0));
        let flags = indices
            .iter()
            .map(|&i| {
                let f = tracker.observe(&volume("r1", i, [4, 4, 2]), &m);
                (f.new_run, f.gap_before, f.out_of_order, f.duplicate)
            })
            .collect();
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        (flags, [count(&m.missing), count(&m.out_of_order), count(&m.duplicates)])
    }

    #[test]
    fn a_clean_run_is_flagged_only_at_its_start() {
        let (flags, counts) = observe(&[0, 1, 2, 3]);
        assert_eq!(flags[0], (true, 0, false, false));
        assert!(flags[1..].iter().all(|f| *f == (false, 0, false, false)), "{flags:?}");
        assert_eq!(counts, [0, 0, 0]);
    }

    #[test]
    fn gaps_late_arrivals_and_resends_are_told_apart_and_counted() {
        // 0, then 3 (1 and 2 missing), then 1 arrives late (fills a hole), then 3 again.
        let (flags, counts) = observe(&[0, 3, 1, 3, 4]);
        assert_eq!(flags[1], (false, 2, false, false));
        assert_eq!(flags[2], (false, 0, true, false));
        assert_eq!(flags[3], (false, 0, false, true));
        assert_eq!(flags[4], (false, 0, false, false));
        // Missing: 2 counted, 1 filled; one late arrival; one resend.
        assert_eq!(counts, [1, 1, 1]);
    }

    #[test]
    fn a_new_run_id_or_grid_starts_the_indices_over() {
        let (mut tracker, m) = (IndexTracker::default(), Metrics::new(0.0));
        assert!(tracker.observe(&volume("r1", 5, [4, 4, 2]), &m).new_run);
        assert!(!tracker.observe(&volume("r1", 6, [4, 4, 2]), &m).new_run);
        let f = tracker.observe(&volume("r2", 0, [4, 4, 2]), &m);
        assert!(f.new_run && !f.duplicate && !f.out_of_order && f.gap_before == 0, "{f:?}");
        let f = tracker.observe(&volume("r2", 0, [8, 8, 2]), &m);
        assert!(f.new_run && !f.duplicate, "{f:?}");
        assert_eq!(m.duplicates.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn markers_wait_for_the_next_volume_and_the_configured_tr_wins() {
        let (mut intake, m) = (Intake::new(Some(2.0)), Metrics::new(0.0));
        let e = crate::event::parse_marker("trial=1;cond=seen", 5.0).unwrap();
        intake.event(e.clone(), &m);
        let mut v = volume("r", 0, [2, 2, 2]);
        v.tr = Some(1.0);
        let a = intake.volume(v, &m);
        assert_eq!((a.volume.tr, a.events, a.flags.new_run), (Some(2.0), vec![e], true));
        assert!(intake.volume(volume("r", 1, [2, 2, 2]), &m).events.is_empty());
        for _ in 0..MAX_PENDING_EVENTS + 3 {
            intake.event(crate::event::parse_marker("cond=seen", 6.0).unwrap(), &m);
        }
        assert_eq!(intake.volume(volume("r", 2, [2, 2, 2]), &m).events.len(), MAX_PENDING_EVENTS);
        assert_eq!(m.snapshot().errors.get(EVENTS_DROPPED.name), Some(&3));
        assert_eq!(m.received.load(Ordering::Relaxed), 3);
    }
}
