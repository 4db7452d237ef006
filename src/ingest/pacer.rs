//! Scheduling replayed and simulated volumes on the monotonic clock.

use std::time::Duration;

use crate::clock;

/// Releases volume `i` at `start + i · interval`, where `start` is `delay` seconds after the
/// first call (with no interval: every volume at once after the delay).
#[derive(Clone, Debug)]
pub struct Pacer {
    interval: Option<f64>,
    delay: f64,
    start: Option<f64>,
}

impl Pacer {
    /// A pacer with `interval` seconds between volumes (`None`: as fast as possible) that
    /// starts `delay` seconds after its first call.
    pub fn new(interval: Option<f64>, delay: f64) -> Pacer {
        Pacer { interval, delay, start: None }
    }

    /// Waits at most `timeout` for volume `i`'s slot; returns its scheduled time (seconds on
    /// [`clock::now`]; the current time when unpaced) once due, `None` if still early.
    pub fn wait_for(&mut self, i: u64, timeout: Duration) -> Option<f64> {
        let now = clock::now();
        let start = *self.start.get_or_insert(now + self.delay);
        let due = start + i as f64 * self.interval.unwrap_or(0.0);
        let released = |now: f64| if self.interval.is_some() { due } else { now };
        if now >= due {
            return Some(released(now));
        }
        std::thread::sleep(Duration::from_secs_f64((due - now).min(timeout.as_secs_f64())));
        let now = clock::now();
        (now >= due).then(|| released(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_released_on_schedule() {
        let mut p = Pacer::new(Some(0.02), 0.0);
        let t0 = p.wait_for(0, Duration::from_millis(100)).unwrap();
        assert!(p.wait_for(3, Duration::from_millis(1)).is_none());
        let t3 = p.wait_for(3, Duration::from_millis(200)).unwrap();
        assert!((t3 - t0 - 0.06).abs() < 1e-9);
        assert!(clock::now() >= t3);
        assert!(Pacer::new(None, 0.0).wait_for(1000, Duration::ZERO).is_some());
        let mut delayed = Pacer::new(None, 0.05);
        assert!(delayed.wait_for(0, Duration::from_millis(1)).is_none());
        assert!(delayed.wait_for(0, Duration::from_millis(100)).is_some());
    }
}
