//! The retry backoff every Eventful crate uses: exponential, capped, with equal jitter.
//!
//! ```
//! use std::time::Duration;
//! use eventful_core::Backoff;
//!
//! let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
//! // After the 3rd failure: 400 ms ceiling, jittered into [200 ms, 400 ms].
//! let d = backoff.delay(3);
//! assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
//! assert!(backoff.delay(100) <= Duration::from_secs(30)); // capped at `max`
//! ```

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff between retries: after failure `n` (1-based) the ceiling is
/// `min(max, base · 2^(n-1))`, and the delay is drawn uniformly from `[ceiling/2, ceiling]`.
///
/// That jitter policy is "equal jitter": half the delay is kept, half is random. Clients
/// that failed together (every consumer when PostgreSQL restarts, every relay when the
/// broker goes away) spread their retries out instead of returning in lockstep, while no
/// retry comes sooner than half the ceiling, so the retry rate during an outage stays
/// bounded.
///
/// [`Default`] is 100 ms → 30 s. Every crate's builder takes one through a setter named
/// `backoff` (`RelayBuilder::backoff`, `InboxConsumerBuilder::backoff`,
/// `RedisReservationsBuilder::backoff`, `CoordinatorBuilder::backoff`), and every crate
/// re-exports it as `<crate>::Backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Backoff {
    /// The ceiling after the first failure.
    pub base: Duration,
    /// The largest ceiling: the doubling stops here (also when `max` < `base`).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}

impl Backoff {
    /// A backoff starting at `base` and doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max }
    }

    /// This backoff with another `base`.
    #[must_use]
    pub const fn with_base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// This backoff with another `max`.
    #[must_use]
    pub const fn with_max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// The delay ceiling after `attempt` failures (attempt 0 counts as 1), without jitter:
    /// `min(max, base · 2^(attempt-1))`. Never overflows.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next try after `attempt` failures (attempt 0 counts as 1): a
    /// uniform draw from `[ceiling/2, ceiling]` ([`ceiling`](Backoff::ceiling)).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        // `ceiling - half` ≥ `half` (the halving rounds down), so the draw never passes the
        // ceiling; a ceiling past u64 nanoseconds (584 years) is drawn from a narrower span.
        let span = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half.saturating_add(Duration::from_nanos(rand::rng().random_range(0..=span)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn default_is_100ms_to_30s() {
        let b = Backoff::default();
        assert_eq!((b.base, b.max), (100 * MS, Duration::from_secs(30)));
    }

    #[test]
    fn ceiling_doubles_from_base_and_stops_at_max() {
        let b = Backoff::new(100 * MS, Duration::from_secs(5));
        let ceilings: Vec<_> = (0..=8).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [100, 100, 200, 400, 800, 1600, 3200, 5000, 5000].map(|ms| ms * MS)
        );
    }

    #[test]
    fn delay_stays_within_half_ceiling_and_ceiling() {
        let b = Backoff::new(100 * MS, Duration::from_secs(5));
        for attempt in [0, 1, 2, 4, 7, 30, 31, 32, 64, u32::MAX] {
            for _ in 0..200 {
                let ceiling = b.ceiling(attempt);
                let d = b.delay(attempt);
                assert!(
                    d >= ceiling / 2 && d <= ceiling,
                    "attempt {attempt}: {d:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
        }
    }

    #[test]
    fn extreme_values_neither_overflow_nor_panic() {
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.ceiling(u32::MAX), Duration::MAX);
        assert!(huge.delay(u32::MAX) >= Duration::MAX / 2);
        let zero = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(zero.delay(10), Duration::ZERO);
        // max below base: max wins.
        let inverted = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(inverted.ceiling(1), Duration::from_secs(1));
        // Sub-millisecond delays are jittered too (not rounded to whole milliseconds).
        let tiny = Backoff::new(Duration::from_micros(10), Duration::from_micros(10));
        let draws: HashSet<_> = (0..100).map(|_| tiny.delay(1)).collect();
        assert!(draws.len() > 10, "{draws:?}");
    }

    #[test]
    fn jitter_spreads_the_delays_over_the_range() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let draws: Vec<_> = (0..400).map(|_| b.delay(3)).collect();
        let distinct: HashSet<_> = draws.iter().collect();
        assert!(
            distinct.len() > 300,
            "only {} distinct delays",
            distinct.len()
        );
        // Both halves of [2 s, 4 s] are hit: clients that failed together spread out.
        let low = draws
            .iter()
            .filter(|d| **d < Duration::from_secs(3))
            .count();
        assert!(
            (100..=300).contains(&low),
            "{low} of 400 below the midpoint"
        );
    }

    #[test]
    fn builder_methods_replace_one_bound() {
        let b = Backoff::default()
            .with_base(Duration::from_secs(1))
            .with_max(Duration::from_secs(2));
        assert_eq!(
            b,
            Backoff::new(Duration::from_secs(1), Duration::from_secs(2))
        );
    }
}
