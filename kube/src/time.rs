//! The process's clocks, in one place. Wall clock: what is recorded and shown (run records and
//! reports store unix milliseconds) and times of day (maintenance windows). Monotonic clock:
//! what durations run on (fences, Lease expiry, the coordinator's turn timeouts and retry waits,
//! health), so that a wall-clock step (NTP, a resumed VM) changes none of them.
use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Local monotonic milliseconds (since the first call in this process). Fences and Lease
/// expiry use this clock, never the wall clock, so neither a clock step nor another machine's
/// clock can extend or shorten a hold.
pub fn mono_ms() -> i64 {
    i64::try_from(epoch().elapsed().as_millis()).unwrap_or(i64::MAX)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Both clocks, read together: what the pure core is fed at each step.
pub fn now() -> klm_protocol::lifecycle::Now {
    klm_protocol::lifecycle::Now {
        wall_ms: now_ms(),
        mono_ms: mono_ms(),
    }
}

/// The instant of a [`mono_ms`] value (saturating: never panics).
pub fn mono_instant(ms: i64) -> Instant {
    let at = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    epoch()
        .checked_add(at)
        .unwrap_or_else(|| epoch() + Duration::from_secs(86_400 * 365 * 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_monotonic_times_do_not_panic() {
        let _ = mono_instant(i64::MAX);
        let _ = mono_instant(-5);
    }
}
