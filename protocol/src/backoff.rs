//! Jittered exponential backoff (the "equal jitter" variant): attempt `n` waits between half
//! and all of `min(cap, base * 2^n)`. Jitter keeps agents that hit the same conflict (a Lease
//! 409, a PodDisruptionBudget 429) from retrying in lockstep. Pure: the random draw is passed in.
use std::time::Duration;

/// `unit` is a uniform draw from `[0, 1)`; values outside are clamped.
pub fn jittered(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
    let ceiling = exp.min(cap);
    let half = ceiling / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// [`jittered`] with a draw from `rng`.
pub fn jittered_with(
    attempt: u32,
    base: Duration,
    cap: Duration,
    rng: &mut impl rand::Rng,
) -> Duration {
    jittered(attempt, base, cap, rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_then_caps() {
        let base = 100 * MS;
        let cap = 2_000 * MS;
        assert_eq!(jittered(0, base, cap, 0.0), 50 * MS);
        assert_eq!(jittered(0, base, cap, 1.0), 100 * MS);
        assert_eq!(jittered(3, base, cap, 1.0), 800 * MS);
        assert_eq!(jittered(10, base, cap, 1.0), cap);
        assert_eq!(jittered(u32::MAX, base, cap, 0.0), cap / 2);
    }

    proptest::proptest! {
        #[test]
        fn always_within_half_and_full_ceiling(attempt in 0u32..64, unit in -1.0f64..2.0) {
            let base = 250 * MS;
            let cap = 8_000 * MS;
            let d = jittered(attempt, base, cap, unit);
            let ceiling = base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(cap);
            proptest::prop_assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
        }
    }
}
