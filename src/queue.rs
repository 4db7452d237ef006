//! Bounded single-producer single-consumer edges between stage threads.
//!
//! An edge is a lock-free `ringbuf` ring with a budget in messages *and* in bytes (a 64×64×36
//! volume is 0.6 MB; an 81×104×83 one 2.8 MB). What happens when it is full is the edge's
//! [`WhenFull`] policy, and every wait or drop is counted. Threads sleep with `park` and are
//! woken by the other side, so an idle edge costs nothing and a push wakes the consumer at once.

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
            if self.policy == WhenFull::DropNewest {
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
}
