//! The one retry policy of the agent and the Lease client: exponential backoff with jitter from
//! the maintained `backon` crate (jitter keeps agents that hit the same conflict — a Lease 409,
//! a PodDisruptionBudget 429 — from retrying in lockstep). Callers choose the bounds; `backon`
//! does the arithmetic and, with [`backon::Retryable`], the loop.
use backon::ExponentialBuilder;
use std::time::Duration;

/// Jittered exponential backoff from `min` up to `max` per wait, retrying without end (callers
/// bound the retries by a deadline, a fence or `with_max_times`).
pub fn backoff(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
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
}
