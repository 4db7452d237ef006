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

/// How far past the expected index a volume's may be before it is taken for a glitch: the
/// expected index is the previous highest plus one, plus the TRs that have passed since it
/// arrived.
pub const MAX_INDEX_LEAD: u64 = 16;

/// Volumes in a row that continue one another past an implausible jump before the jump is taken
/// as real (the sender's indices did move on); the ones before are set aside.
pub const JUMP_CONFIRMATIONS: u32 = 3;

/// Tracks indices per run to flag duplicates, gaps, reordering and implausible indices.
///
/// An index is implausible when it is below the run's first, or more than [`MAX_INDEX_LEAD`]
/// beyond the expected one. Such a volume moves none of the run's clocks (its highest index,
/// what is missing); [`JUMP_CONFIRMATIONS`] volumes in a row continuing one another from there
/// make the jump real, and the gap before the first of them is then counted missing.
#[derive(Default)]
pub struct IndexTracker {
    run: Option<(String, [usize; 3])>,
    first: u64,
    /// The highest index taken, and the receipt time of its volume.
    max_seen: Option<(u64, f64)>,
    seen: HashSet<u64>,
    /// An implausible run of indices so far: its first index, its last, how many.
    jump: Option<(u64, u64, u32)>,
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
            *self = IndexTracker { run: Some(key), first: v.index, ..IndexTracker::default() };
        }
        // Where the gap before `v` starts: itself, or the first of a jump it confirms.
        let mut from = v.index;
        if let Some((max, at)) = self.max_seen {
            match self.plausible(v, max, at) {
                Some(first) => from = first,
                None => {
                    flags.implausible_index = true;
                    return flags;
                }
            }
        }
        flags.duplicate = !self.seen.insert(v.index);
        match self.max_seen {
            Some((max, _)) if v.index > max.saturating_add(1) => flags.gap_before = from - max - 1,
            Some((max, _)) if v.index < max && !flags.duplicate => {
                flags.out_of_order = true;
                // It fills a hole counted earlier.
                let _ = m.missing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| x.checked_sub(1));
            }
            _ => {}
        }
        self.jump = None;
        if self.max_seen.is_none_or(|(max, _)| v.index > max) {
            self.max_seen = Some((v.index, v.recv_time));
        }
        if flags.duplicate {
            m.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        if flags.out_of_order {
            m.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        m.missing.fetch_add(flags.gap_before, Ordering::Relaxed);
        flags
    }

    /// Whether `v`'s index fits a run whose highest index so far, `max`, arrived at `at`: `None`
    /// if not, else where the gap before it starts (its own index, or the first index of the jump
    /// it confirms). An implausible one is remembered, and the last of [`JUMP_CONFIRMATIONS`] in
    /// a row is taken.
    fn plausible(&mut self, v: &Volume, max: u64, at: f64) -> Option<u64> {
        if v.index < self.first {
            return None;
        }
        let elapsed = v.tr.filter(|t| *t > 0.0).map_or(0.0, |tr| ((v.recv_time - at) / tr).floor());
        let passed =
            if elapsed.is_finite() && elapsed > 0.0 { elapsed.min(u32::MAX as f64) as u64 } else { 0 };
        let expected = max.saturating_add(1).saturating_add(passed);
        if v.index <= expected.saturating_add(MAX_INDEX_LEAD) {
            return Some(v.index);
        }
        self.jump = match self.jump {
            Some((first, last, n)) if last.checked_add(1) == Some(v.index) => Some((first, v.index, n + 1)),
            _ => Some((v.index, v.index, 1)),
        };
        self.jump.filter(|(.., n)| *n >= JUMP_CONFIRMATIONS).map(|(first, ..)| first)
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

    /// `(implausible, gap_before)` of each `(index, receipt time)` at a 1 s TR, and `missing`.
    fn observe_timed(volumes: &[(u64, f64)]) -> (Vec<(bool, u64)>, u64) {
        let (mut tracker, m) = (IndexTracker::default(), Metrics::new(0.0));
        let flags = volumes
            .iter()
            .map(|&(i, t)| {
                let mut v = volume("r1", i, [4, 4, 2]);
                (v.tr, v.recv_time) = (Some(1.0), t);
                let f = tracker.observe(&v, &m);
                (f.implausible_index, f.gap_before)
            })
            .collect();
        (flags, m.missing.load(Ordering::Relaxed))
    }

    #[test]
    fn one_stray_index_is_set_aside_and_moves_no_clock() {
        for stray in [1000, 1 << 63, u64::MAX] {
            let mut run: Vec<(u64, f64)> = (0..20).map(|i| (i, i as f64)).collect();
            run.push((stray, 20.0));
            run.extend((20..60).map(|i| (i, i as f64 + 0.5)));
            let (flags, missing) = observe_timed(&run);
            assert_eq!(flags[20], (true, 0), "{stray}");
            assert!(flags.iter().enumerate().all(|(k, f)| k == 20 || *f == (false, 0)), "{stray}: {flags:?}");
            assert_eq!(missing, 0, "{stray}");
        }
        // Before the run's first index.
        let (flags, _) = observe_timed(&[(5, 0.0), (6, 1.0), (2, 2.0), (7, 3.0)]);
        assert_eq!(flags, [(false, 0), (false, 0), (true, 0), (false, 0)]);
    }

    #[test]
    fn a_jump_the_clock_explains_or_that_continues_is_taken_as_a_real_gap() {
        // 30 s without volumes at a 1 s TR: index 40 after 9 is expected, 30 missing.
        let (flags, missing) = observe_timed(&[(8, 8.0), (9, 9.0), (40, 39.0), (41, 40.0)]);
        assert_eq!(flags[2], (false, 30));
        assert_eq!(missing, 30);
        // Just within the lead, at once; then one beyond it.
        let lead = MAX_INDEX_LEAD;
        let (flags, _) = observe_timed(&[(0, 0.0), (1 + lead, 0.1), (2 + 2 * lead + 1, 0.2)]);
        assert_eq!(flags.iter().map(|f| f.0).collect::<Vec<_>>(), [false, false, true]);
        // The sender's indices really moved on: the third in a row is taken, and the gap before
        // the first of them counts missing (the two set aside were received, not missing).
        let (flags, missing) =
            observe_timed(&[(0, 0.0), (1, 1.0), (500, 2.0), (501, 3.0), (502, 4.0), (503, 5.0)]);
        assert_eq!(flags, [(false, 0), (false, 0), (true, 0), (true, 0), (false, 498), (false, 0)]);
        assert_eq!(missing, 498);
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
