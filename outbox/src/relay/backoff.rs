//! Exponential backoff with jitter for failed events.

use std::time::Duration;

use rand::Rng as _;

/// Delay before attempt `attempts + 1`, given `attempts` (≥ 1) failures so far:
/// `min(max, base · 2^(attempts-1))`, then "equal jitter": a uniform value in
/// `[delay/2, delay]`, so relays retrying the same outage do not synchronize.
pub(crate) fn delay(base: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let raw = base.saturating_mul(1u32 << exp).min(max);
    let half = raw / 2;
    let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms).min(half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for _ in 0..200 {
            let d1 = delay(base, max, 1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= base, "{d1:?}");
            let d4 = delay(base, max, 4);
            assert!(d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800));
            let d30 = delay(base, max, 30);
            assert!(d30 >= max / 2 && d30 <= max, "{d30:?}");
            assert!(delay(base, max, u32::MAX) <= max);
        }
    }

    #[test]
    fn jitter_spreads_values() {
        let values: std::collections::HashSet<_> = (0..50)
            .map(|_| delay(Duration::from_secs(1), Duration::from_secs(60), 3))
            .collect();
        assert!(values.len() > 10);
    }
}
