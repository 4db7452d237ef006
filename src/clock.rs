//! The one clock every timestamp in mirage-rt is read from.
//!
//! `now()` is `CLOCK_MONOTONIC` in seconds: the clock liblsl's `local_clock()`, pylsl's
//! `local_clock()` and Python's `time.monotonic()` read on Linux, so acquisition times sent by a
//! simulator or LSL outlet on this machine compare directly with the daemon's own stamps.

/// Seconds on the monotonic clock shared with LSL (`CLOCK_MONOTONIC`).
pub fn now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Wall-clock seconds since the Unix epoch (for file names and session metadata only).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time: a sortable, filesystem-safe UTC label.
pub fn utc_label(unix_seconds: f64) -> String {
    let secs = unix_seconds.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (H. Hinnant), proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_matches_lsl_local_clock() {
        let a = now();
        let l = lsl::local_clock();
        let b = now();
        assert!(l >= a - 1e-3 && l <= b + 1e-3, "{a} {l} {b}");
    }

    #[test]
    fn utc_label_known_dates() {
        assert_eq!(utc_label(0.0), "19700101T000000Z");
        assert_eq!(utc_label(951_782_400.0), "20000229T000000Z");
        assert_eq!(utc_label(1_795_651_199.0), "20261125T235959Z");
    }
}
