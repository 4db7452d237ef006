//! Bounded single-producer single-consumer edges between stage threads, and the hand-offs to
//! the workers beside the volume path.
//!
//! An edge is a lock-free `ringbuf` ring with a budget in messages *and* in bytes (a 64×64×36
//! volume is 0.6 MB; an 81×104×83 one 2.8 MB). What happens when it is full is the edge's
//! [`WhenFull`] policy, and every wait or drop is counted. Threads sleep with `park` and are
//! woken by the other side, so an idle edge costs nothing and a push wakes the consumer at once.
//! A [`handoff`] never waits: full, it drops the newest message or the oldest.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

/// What a producer does when its edge is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: lossless; slows the producer (counted as `blocked`).
    Block,
    /// Drop the new message (counted as `dropped`): for outputs where stale data is useless.
    DropNewest,
    /// Drop the oldest waiting message to make room (counted as `dropped`): the newest work is
    /// the one worth doing. Only a [`handoff`] can: an edge's producer cannot take back what
    /// its ring holds, so an edge treats it as [`WhenFull::DropNewest`].
    DropOldest,
}

/// Something that knows how many bytes it holds, for byte budgets.
pub trait ByteSize {
    /// Approximate heap bytes of the message.
    fn byte_size(&self) -> usize;
}

/// Counters of one edge, shared with status reporting.
#[derive(Debug)]
pub struct EdgeStats {
    /// Edge name, e.g. `ingest->motion`.
    pub name: String,
    /// Message capacity.
    pub capacity: usize,
    /// Byte budget.
    pub byte_budget: usize,
    /// What a producer does when it is full.
    pub policy: WhenFull,
    /// Messages accepted.
    pub pushed: AtomicU64,
    /// Messages dropped because the edge was full.
    pub dropped: AtomicU64,
    /// Pushes that had to wait for room.
    pub blocked: AtomicU64,
    /// Total nanoseconds producers spent waiting.
    pub blocked_ns: AtomicU64,
    /// Messages now queued.
    pub depth: AtomicUsize,
    /// Highest depth seen.
    pub max_depth: AtomicUsize,
    /// Bytes now queued.
    pub bytes: AtomicUsize,
}

struct Shared {
    stats: Arc<EdgeStats>,
    woken: AtomicBool,
    producer_closed: AtomicBool,
    consumer_closed: AtomicBool,
    producer_thread: OnceLock<Thread>,
    consumer_thread: OnceLock<Thread>,
}

/// The sending end of an edge.
pub struct EdgeTx<T> {
    prod: HeapProd<T>,
    shared: Arc<Shared>,
    policy: WhenFull,
}

/// The receiving end of an edge.
pub struct EdgeRx<T> {
    cons: HeapCons<T>,
    shared: Arc<Shared>,
}

/// Creates an edge holding at most `capacity` messages and `byte_budget` bytes (a single
/// message larger than the budget still passes when the edge is empty).
pub fn edge<T: ByteSize>(
    name: impl Into<String>,
    capacity: usize,
    byte_budget: usize,
    policy: WhenFull,
) -> (EdgeTx<T>, EdgeRx<T>) {
    let capacity = capacity.max(1);
    let (prod, cons) = HeapRb::<T>::new(capacity).split();
    let stats = Arc::new(EdgeStats {
        name: name.into(),
        capacity,
        byte_budget,
        policy,
        pushed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        blocked: AtomicU64::new(0),
        blocked_ns: AtomicU64::new(0),
        depth: AtomicUsize::new(0),
        max_depth: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
    });
    let shared = Arc::new(Shared {
        stats,
        woken: AtomicBool::new(false),
        producer_closed: AtomicBool::new(false),
        consumer_closed: AtomicBool::new(false),
        producer_thread: OnceLock::new(),
        consumer_thread: OnceLock::new(),
    });
    (EdgeTx { prod, shared: shared.clone(), policy }, EdgeRx { cons, shared })
}

/// Why a push did not deliver.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The consumer is gone; the message was discarded.
    Closed,
    /// The edge was full and its policy dropped the message.
    Dropped,
}

/// How long a blocked push waits before it logs that the pipeline is stalled.
const STALL_WARNING: Duration = Duration::from_secs(5);

impl<T: ByteSize> EdgeTx<T> {
    /// The edge's counters.
    pub fn stats(&self) -> Arc<EdgeStats> {
        self.shared.stats.clone()
    }

    fn has_room(&self, size: usize) -> bool {
        let s = &self.shared.stats;
        !self.prod.is_full()
            && (s.bytes.load(Ordering::Acquire) == 0
                || s.bytes.load(Ordering::Acquire) + size <= s.byte_budget)
    }

    /// Sends `msg` according to the edge's policy.
    #[track_caller]
    pub fn push(&mut self, msg: T) -> Result<(), PushError> {
        let _ = self.shared.producer_thread.get_or_init(std::thread::current);
        let size = msg.byte_size();
        let stats = self.shared.stats.clone();
        if !self.has_room(size) {
            if self.policy != WhenFull::Block {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(PushError::Dropped);
            }
            stats.blocked.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            let mut warned = false;
            while !self.has_room(size) {
                if self.shared.consumer_closed.load(Ordering::Acquire) {
                    return Err(PushError::Closed);
                }
                std::thread::park_timeout(Duration::from_millis(50));
                if !warned && start.elapsed() > STALL_WARNING {
                    let at = std::panic::Location::caller();
                    tracing::warn!(
                        "edge {} full for {:?}; producer at {at} waiting",
                        stats.name,
                        start.elapsed()
                    );
                    warned = true;
                }
            }
            stats.blocked_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if self.shared.consumer_closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        // Counted before the message becomes visible, so the consumer's decrement for it always
        // follows (the counters never wrap below zero).
        stats.bytes.fetch_add(size, Ordering::AcqRel);
        let depth = stats.depth.fetch_add(1, Ordering::AcqRel) + 1;
        // The producer's view of the ring can lag the consumer's: a push refused for a full
        // ring waits for room like any blocked push, rather than failing.
        let mut msg = msg;
        while let Err(back) = self.prod.try_push(msg) {
            if self.shared.consumer_closed.load(Ordering::Acquire) {
                stats.bytes.fetch_sub(size, Ordering::AcqRel);
                stats.depth.fetch_sub(1, Ordering::AcqRel);
                return Err(PushError::Closed);
            }
            msg = back;
            std::thread::park_timeout(Duration::from_millis(1));
        }
        // A message popped but not yet uncounted can make `depth` exceed what the ring holds.
        stats.max_depth.fetch_max(depth.min(stats.capacity), Ordering::Relaxed);
        stats.pushed.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.shared.consumer_thread.get() {
            t.unpark();
        }
        Ok(())
    }
}

impl<T> Drop for EdgeTx<T> {
    fn drop(&mut self) {
        self.shared.producer_closed.store(true, Ordering::Release);
        if let Some(t) = self.shared.consumer_thread.get() {
            t.unpark();
        }
    }
}

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv<T> {
    /// A message.
    Msg(T),
    /// Nothing within the timeout.
    Timeout,
    /// The producer is gone and the edge is drained.
    Closed,
}

/// Wakes an edge's consumer from [`EdgeRx::recv_timeout`] early (it returns `Timeout`), so
/// that it can serve a second source.
#[derive(Clone)]
pub struct Waker(Arc<Shared>);

impl Waker {
    /// Makes the consumer's current or next wait return.
    pub fn wake(&self) {
        self.0.woken.store(true, Ordering::Release);
        if let Some(t) = self.0.consumer_thread.get() {
            t.unpark();
        }
    }
}

impl<T: ByteSize> EdgeRx<T> {
    /// A handle that interrupts this consumer's waits.
    pub fn waker(&self) -> Waker {
        Waker(self.shared.clone())
    }

    /// The edge's counters.
    pub fn stats(&self) -> Arc<EdgeStats> {
        self.shared.stats.clone()
    }

    /// Takes the next message, waiting up to `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Recv<T> {
        let _ = self.shared.consumer_thread.get_or_init(std::thread::current);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(msg) = self.cons.try_pop() {
                let s = &self.shared.stats;
                s.bytes.fetch_sub(msg.byte_size(), Ordering::AcqRel);
                s.depth.fetch_sub(1, Ordering::AcqRel);
                if let Some(t) = self.shared.producer_thread.get() {
                    t.unpark();
                }
                return Recv::Msg(msg);
            }
            // Check closure after an empty pop: anything pushed before the close is drained first.
            if self.shared.producer_closed.load(Ordering::Acquire) {
                if let Some(msg) = self.cons.try_pop() {
                    let s = &self.shared.stats;
                    s.bytes.fetch_sub(msg.byte_size(), Ordering::AcqRel);
                    s.depth.fetch_sub(1, Ordering::AcqRel);
                    return Recv::Msg(msg);
                }
                return Recv::Closed;
            }
            let now = Instant::now();
            if now >= deadline || self.shared.woken.swap(false, Ordering::AcqRel) {
                return Recv::Timeout;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

impl<T> Drop for EdgeRx<T> {
    fn drop(&mut self) {
        self.shared.consumer_closed.store(true, Ordering::Release);
        if let Some(t) = self.shared.producer_thread.get() {
            t.unpark();
        }
    }
}

/// What a hand-off did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Handed {
    /// Queued.
    Queued,
    /// Not queued: the hand-off was full ([`WhenFull::DropNewest`]).
    Dropped,
    /// Queued in place of the oldest waiting message ([`WhenFull::DropOldest`]).
    Replaced,
    /// The worker is gone; the message was discarded.
    Closed,
}

/// The sending end of a hand-off (see [`handoff`]).
pub struct HandoffTx<T> {
    tx: crossbeam_channel::Sender<T>,
    /// The same queue's receiving side, to take the oldest message out under `DropOldest`.
    oldest: crossbeam_channel::Receiver<T>,
    stats: Arc<EdgeStats>,
    /// Set when the receiving end is dropped (`oldest` keeps the channel itself open).
    closed: Arc<AtomicBool>,
}

/// The receiving end of a hand-off.
pub struct HandoffRx<T> {
    rx: crossbeam_channel::Receiver<T>,
    stats: Arc<EdgeStats>,
    closed: Arc<AtomicBool>,
}

impl<T> Drop for HandoffRx<T> {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// A hand-off of at most `capacity` messages from a thread that must never wait (the volume
/// path) to a worker: full, it drops the newest or the oldest message by `policy` (`Block` is
/// taken as `DropNewest`), counted as the edge's `dropped`.
pub fn handoff<T>(
    name: impl Into<String>,
    capacity: usize,
    policy: WhenFull,
) -> (HandoffTx<T>, HandoffRx<T>) {
    let capacity = capacity.max(1);
    let policy = if policy == WhenFull::Block { WhenFull::DropNewest } else { policy };
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let stats = Arc::new(EdgeStats {
        name: name.into(),
        capacity,
        byte_budget: usize::MAX,
        policy,
        pushed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        blocked: AtomicU64::new(0),
        blocked_ns: AtomicU64::new(0),
        depth: AtomicUsize::new(0),
        max_depth: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
    });
    let closed = Arc::new(AtomicBool::new(false));
    (
        HandoffTx { tx, oldest: rx.clone(), stats: stats.clone(), closed: closed.clone() },
        HandoffRx { rx, stats, closed },
    )
}

impl<T> HandoffTx<T> {
    /// The hand-off's counters.
    pub fn stats(&self) -> Arc<EdgeStats> {
        self.stats.clone()
    }

    /// Queues `msg` without waiting, by the hand-off's policy.
    pub fn push(&self, mut msg: T) -> Handed {
        if self.closed.load(Ordering::Acquire) {
            return Handed::Closed;
        }
        let mut replaced = false;
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Handed::Closed,
                Err(crossbeam_channel::TrySendError::Full(back)) => {
                    if self.stats.policy != WhenFull::DropOldest {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        return Handed::Dropped;
                    }
                    if self.oldest.try_recv().is_ok() {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        replaced = true;
                    }
                    msg = back;
                }
            }
        }
        self.stats.pushed.fetch_add(1, Ordering::Relaxed);
        let depth = self.tx.len();
        self.stats.depth.store(depth, Ordering::Relaxed);
        self.stats.max_depth.fetch_max(depth, Ordering::Relaxed);
        if replaced {
            Handed::Replaced
        } else {
            Handed::Queued
        }
    }
}

impl<T> HandoffRx<T> {
    /// Takes the next message, waiting up to `timeout`; `Closed` once the sender is gone and
    /// nothing is left.
    pub fn recv_timeout(&self, timeout: Duration) -> Recv<T> {
        let got = self.rx.recv_timeout(timeout);
        self.stats.depth.store(self.rx.len(), Ordering::Relaxed);
        match got {
            Ok(msg) => Recv::Msg(msg),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Recv::Timeout,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Recv::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Msg(usize, usize);
    impl ByteSize for Msg {
        fn byte_size(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn order_is_kept_and_close_drains() {
        let (mut tx, mut rx) = edge::<Msg>("t", 4, 1 << 20, WhenFull::Block);
        let h = std::thread::spawn(move || {
            for i in 0..1000 {
                tx.push(Msg(i, 10)).unwrap();
            }
        });
        let mut got = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Recv::Msg(m) => got.push(m.0),
                Recv::Closed => break,
                Recv::Timeout => panic!("stalled"),
            }
        }
        h.join().unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
        let s = rx.stats();
        assert_eq!(s.pushed.load(Ordering::Relaxed), 1000);
        assert_eq!(s.depth.load(Ordering::Relaxed), 0);
        assert_eq!(s.bytes.load(Ordering::Relaxed), 0);
        assert!(s.max_depth.load(Ordering::Relaxed) <= 4);
    }

    #[test]
    fn byte_budget_and_drop_policy() {
        let (mut tx, mut rx) = edge::<Msg>("t", 10, 100, WhenFull::DropNewest);
        assert_eq!(tx.push(Msg(0, 150)), Ok(())); // oversized but the edge is empty
        assert_eq!(tx.push(Msg(1, 10)), Err(PushError::Dropped));
        assert!(matches!(rx.recv_timeout(Duration::ZERO), Recv::Msg(Msg(0, _))));
        assert_eq!(tx.push(Msg(2, 60)), Ok(()));
        assert_eq!(tx.push(Msg(3, 60)), Err(PushError::Dropped));
        assert_eq!(tx.stats().dropped.load(Ordering::Relaxed), 2);
        drop(rx);
        assert_eq!(tx.push(Msg(4, 1)), Err(PushError::Closed));
    }

    #[test]
    fn blocked_producer_waits_then_delivers() {
        let (mut tx, mut rx) = edge::<Msg>("t", 1, 1 << 20, WhenFull::Block);
        tx.push(Msg(0, 1)).unwrap();
        let h = std::thread::spawn(move || {
            tx.push(Msg(1, 1)).unwrap();
            tx.stats()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(rx.recv_timeout(Duration::ZERO), Recv::Msg(Msg(0, _))));
        let stats = h.join().unwrap();
        assert!(matches!(rx.recv_timeout(Duration::from_secs(1)), Recv::Msg(Msg(1, _))));
        assert_eq!(stats.blocked.load(Ordering::Relaxed), 1);
        assert!(stats.blocked_ns.load(Ordering::Relaxed) > 10_000_000);
    }

    #[test]
    fn a_handoff_never_waits_and_drops_the_newest_or_the_oldest() {
        let (tx, rx) = handoff::<usize>("h", 2, WhenFull::DropNewest);
        let start = Instant::now();
        let handed: Vec<Handed> = (0..4).map(|i| tx.push(i)).collect();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(handed, [Handed::Queued, Handed::Queued, Handed::Dropped, Handed::Dropped]);
        assert_eq!(rx.recv_timeout(Duration::ZERO), Recv::Msg(0));
        assert_eq!(rx.recv_timeout(Duration::ZERO), Recv::Msg(1));
        assert_eq!(rx.recv_timeout(Duration::ZERO), Recv::Timeout);
        assert_eq!(
            (tx.stats().pushed.load(Ordering::Relaxed), tx.stats().dropped.load(Ordering::Relaxed)),
            (2, 2)
        );

        let (tx, rx) = handoff::<usize>("h", 1, WhenFull::DropOldest);
        let handed: Vec<Handed> = (0..3).map(|i| tx.push(i)).collect();
        assert_eq!(handed, [Handed::Queued, Handed::Replaced, Handed::Replaced]);
        assert_eq!(rx.recv_timeout(Duration::ZERO), Recv::Msg(2));
        assert_eq!(tx.stats().dropped.load(Ordering::Relaxed), 2);
        drop(tx);
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Recv::Closed);

        let (tx, rx) = handoff::<usize>("h", 1, WhenFull::DropNewest);
        drop(rx);
        assert_eq!(tx.push(1), Handed::Closed);
    }
}
