//! The one retry policy of the agent and the Lease client: exponential backoff with jitter from
//! the maintained `backon` crate (jitter keeps agents that hit the same conflict — a Lease 409,
//! a PodDisruptionBudget 429 — from retrying in lockstep). Callers choose the bounds; `backon`
//! does the arithmetic and, with [`backon::Retryable`], the loop.
use backon::ExponentialBuilder;
use std::time::Duration;

/// Longest pause between reconnects of a watch (before jitter, which may double it).
pub const WATCH_RECONNECT_MAX: Duration = Duration::from_millis(2_500);

/// Jittered exponential backoff from `min` up to `max` per wait, retrying without end (callers
/// bound the retries by a deadline, a fence or `with_max_times`).
pub fn backoff(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// The reconnect policy of every watch the agent and the coordinator depend on (grants, Leases,
/// Nodes, pods). kube-runtime's default grows to 30 s and is reset only by an event or after a
/// quiet 120 s, so after an API server outage a watch whose object did not change stayed deaf
/// for up to 30 s: an agent missed its grant past the turn-start timeout and a healthy node was
/// failed. Here the pause stays under 5 s however long the outage was; the jitter spreads a
/// fleet's reconnects.
pub fn watch_backoff() -> kube::runtime::watcher::ExponentialBackoff {
    backoff(Duration::from_millis(250), WATCH_RECONNECT_MAX).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn waits_grow_jittered_within_bounds() {
        let waits: Vec<Duration> = backoff(Duration::from_millis(100), Duration::from_secs(1))
            .build()
            .take(8)
            .collect();
        assert_eq!(waits.len(), 8, "never gives up by itself");
        // backon's jitter adds up to one more delay on top: [d, 2d).
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] < Duration::from_millis(200));
        assert!(
            waits.iter().all(|w| *w < Duration::from_secs(2)),
            "{waits:?}"
        );
        assert!(waits[7] >= Duration::from_secs(1), "{waits:?}");
    }

    #[test]
    fn a_watch_reconnects_within_seconds_after_any_outage() {
        use kube::runtime::utils::Backoff;
        let mut b = watch_backoff();
        // An outage of many minutes: hundreds of failed reconnects in a row.
        let waits: Vec<Duration> = b.by_ref().take(500).collect();
        assert_eq!(waits.len(), 500, "never gives up");
        let longest = waits.iter().max().copied().unwrap_or_default();
        assert!(longest < Duration::from_secs(5), "{longest:?}");
        b.reset();
        assert!(b.next().is_some_and(|w| w < Duration::from_millis(500)));
    }
}
