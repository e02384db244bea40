//! Latency figures: HDR histograms, the percentiles printed from them, and the per-stage split
//! of an order's history. Pure: no network.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;

/// Longest latency a histogram holds exactly; longer ones are recorded as this (an hour is far
/// past any run's timeout).
const MAX_MICROS: u64 = 3_600_000_000;

/// A latency histogram in microseconds, three significant digits (0.1% error at any
/// magnitude), so p99.9 of a million samples costs a few kilobytes, not a sorted vector.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Latencies {
    /// An empty histogram.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self(Histogram::new_with_bounds(1, MAX_MICROS, 3)?))
    }

    /// Records one latency (negative ones, from clock skew, as zero; past an hour as an hour).
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
        self.0.saturating_record(micros.max(1));
    }

    /// Records `to - from`, clamping a negative difference to zero.
    pub fn record_between(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) {
        self.record((to - from).to_std().unwrap_or_default());
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The printed percentiles.
    pub fn percentiles(&self) -> Percentiles {
        Percentiles::of(&self.0)
    }
}

/// p50 / p90 / p99 / p99.9 / max of one histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Percentiles {
    /// Reads the percentiles of `histogram` (microseconds); all zero when it is empty.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let at = |q: f64| Duration::from_micros(histogram.value_at_quantile(q));
        Self {
            count: histogram.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(histogram.max()),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}

/// `12.3ms` / `1.234s`: short, fixed units, so columns compare at a glance.
pub fn ms(duration: Duration) -> String {
    if duration >= Duration::from_secs(1) {
        format!("{:.3}s", duration.as_secs_f64())
    } else {
        format!("{:.1}ms", duration.as_secs_f64() * 1e3)
    }
}

/// Where an order's time goes: one entry per transition of its history, named
/// `FROM→TO` (`created→ORDER_RESERVED` for the first), with its duration on the server clock.
///
/// `created` is the order's `createdAt`; `history` its transitions oldest first, as
/// `(toStatus, at)`. The hold happens in the same transaction as the creation, so
/// `created→ORDER_RESERVED` is ~0: it is kept to show that nothing waits there.
pub fn stages(
    created: DateTime<Utc>,
    history: &[(String, DateTime<Utc>)],
) -> Vec<(String, Duration)> {
    let mut previous = ("created", created);
    let mut out = Vec::with_capacity(history.len());
    for (status, at) in history {
        out.push((
            format!("{}→{status}", previous.0),
            (*at - previous.1).to_std().unwrap_or_default(),
        ));
        previous = (status.as_str(), *at);
    }
    out
}

/// The transitions of the flow in the order they happen, so the printed split reads as the
/// flow does; transitions not listed follow in the order first seen.
const STAGE_ORDER: [&str; 5] = [
    "created→ORDER_RESERVED",
    "ORDER_RESERVED→PAID",
    "PAID→SHIPPING",
    "ORDER_RESERVED→ORDER_CANCELED",
    "ORDER_RESERVED→ORDER_EXPIRED",
];

/// An order's transitions as `(toStatus, at)`, oldest first.
pub type History = Vec<(String, DateTime<Utc>)>;

/// One histogram per stage name.
#[derive(Debug, Default)]
pub struct StageSplit(Vec<(String, Latencies)>);

impl StageSplit {
    /// No stages yet.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds one order's transitions.
    pub fn add(&mut self, stages: Vec<(String, Duration)>) -> anyhow::Result<()> {
        for (name, duration) in stages {
            match self.0.iter_mut().find(|(n, _)| *n == name) {
                Some((_, latencies)) => latencies.record(duration),
                None => {
                    let mut latencies = Latencies::new()?;
                    latencies.record(duration);
                    self.0.push((name, latencies));
                }
            }
        }
        Ok(())
    }

    /// `(stage, percentiles)` in flow order.
    pub fn percentiles(&self) -> Vec<(String, Percentiles)> {
        let rank = |name: &str| {
            STAGE_ORDER
                .iter()
                .position(|s| *s == name)
                .unwrap_or(STAGE_ORDER.len())
        };
        let mut out: Vec<_> = self
            .0
            .iter()
            .map(|(name, latencies)| (name.clone(), latencies.percentiles()))
            .collect();
        // Stable: unknown stages keep their first-seen order after the known ones.
        out.sort_by_key(|(name, _)| rank(name));
        out
    }
}

/// Terminal states per second between the first and the last of `times` (server clock): the
/// rate the pipeline delivered, which equals the offered rate while the system keeps up and
/// its service rate once it does not. 0 with fewer than two.
pub fn achieved_rate(times: &[DateTime<Utc>]) -> f64 {
    let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
        return 0.0;
    };
    let span = (*last - *first).to_std().unwrap_or_default().as_secs_f64();
    if times.len() < 2 || span <= 0.0 {
        return 0.0;
    }
    (times.len() - 1) as f64 / span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::milliseconds(ms)
    }

    #[test]
    fn percentiles_of_a_uniform_sample_are_within_the_histogram_precision() {
        let mut latencies = Latencies::new().unwrap();
        for ms in 1..=1000 {
            latencies.record(Duration::from_millis(ms));
        }
        let p = latencies.percentiles();
        assert_eq!(p.count, 1000);
        // Three significant digits: each value within 0.1% of the exact rank.
        let near = |got: Duration, want_ms: f64| {
            let got = got.as_secs_f64() * 1e3;
            assert!(
                (got - want_ms).abs() <= want_ms * 0.001 + 0.001,
                "{got} vs {want_ms}"
            );
        };
        near(p.p50, 500.0);
        near(p.p90, 900.0);
        near(p.p99, 990.0);
        near(p.p999, 999.0);
        near(p.max, 1000.0);
    }

    #[test]
    fn one_stall_shows_in_the_tail_not_the_median() {
        let mut latencies = Latencies::new().unwrap();
        for _ in 0..999 {
            latencies.record(Duration::from_millis(10));
        }
        latencies.record(Duration::from_secs(5));
        let p = latencies.percentiles();
        assert!(p.p50 < Duration::from_millis(11), "{p}");
        assert!(p.p99 < Duration::from_millis(11), "{p}");
        assert!(p.max >= Duration::from_millis(4995), "{p}");
    }

    #[test]
    fn an_empty_histogram_reads_as_zeros() {
        assert_eq!(
            Latencies::new().unwrap().percentiles(),
            Percentiles::default()
        );
    }

    #[test]
    fn a_negative_or_huge_latency_is_clamped_not_lost() {
        let mut latencies = Latencies::new().unwrap();
        latencies.record_between(at(100), at(0));
        latencies.record(Duration::from_secs(10 * 3600));
        let p = latencies.percentiles();
        assert_eq!(p.count, 2);
        assert!(p.max >= Duration::from_secs(3599), "{p}");
    }

    #[test]
    fn stages_split_the_history_by_transition() {
        let history = vec![
            ("ORDER_RESERVED".to_owned(), at(0)),
            ("PAID".to_owned(), at(120)),
            ("SHIPPING".to_owned(), at(150)),
        ];
        assert_eq!(
            stages(at(0), &history),
            vec![
                ("created→ORDER_RESERVED".to_owned(), Duration::ZERO),
                ("ORDER_RESERVED→PAID".to_owned(), Duration::from_millis(120)),
                ("PAID→SHIPPING".to_owned(), Duration::from_millis(30)),
            ]
        );
    }

    #[test]
    fn the_stage_split_reads_in_flow_order() {
        let mut split = StageSplit::new();
        split
            .add(stages(
                at(0),
                &[
                    ("ORDER_RESERVED".to_owned(), at(0)),
                    ("ORDER_CANCELED".to_owned(), at(10)),
                ],
            ))
            .unwrap();
        split
            .add(stages(
                at(0),
                &[
                    ("ORDER_RESERVED".to_owned(), at(1)),
                    ("PAID".to_owned(), at(20)),
                    ("SHIPPING".to_owned(), at(30)),
                ],
            ))
            .unwrap();
        let names: Vec<_> = split.percentiles().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "created→ORDER_RESERVED",
                "ORDER_RESERVED→PAID",
                "PAID→SHIPPING",
                "ORDER_RESERVED→ORDER_CANCELED"
            ]
        );
        assert_eq!(split.percentiles()[0].1.count, 2);
    }

    #[test]
    fn achieved_rate_counts_intervals_between_first_and_last() {
        // 11 terminal states 100 ms apart: 10 intervals in 1 s.
        let times: Vec<_> = (0..=10).rev().map(|i| at(i * 100)).collect();
        assert!((achieved_rate(&times) - 10.0).abs() < 1e-9);
        assert_eq!(achieved_rate(&[at(5)]), 0.0);
        assert_eq!(achieved_rate(&[]), 0.0);
    }

    #[test]
    fn ms_formats_short_and_long_durations() {
        assert_eq!(ms(Duration::from_micros(12_345)), "12.3ms");
        assert_eq!(ms(Duration::from_millis(1_234)), "1.234s");
    }
}
