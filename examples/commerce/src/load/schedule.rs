//! The open loop's send schedule and the `--duration` syntax. Pure: no network.

use std::time::Duration;

/// Send times, as offsets from the start, for `rate` orders per second during `duration`:
/// evenly spaced (`i / rate`), `floor(rate × duration)` of them.
///
/// Even spacing rather than Poisson arrivals: a sweep step is then reproducible, and a stall
/// of the system still shows, because latency counts from these times, not from when a
/// request actually left.
pub fn schedule(rate: f64, duration: Duration) -> Vec<Duration> {
    if !(rate.is_finite() && rate > 0.0) {
        return Vec::new();
    }
    let count = (rate * duration.as_secs_f64()).floor() as u64;
    (0..count)
        .map(|i| Duration::from_secs_f64(i as f64 / rate))
        .collect()
}

/// `30s`, `2m`, `500ms`, or plain seconds (`15`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 30s, 2m, 500ms or 15"))?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_evenly_spaced_within_the_duration() {
        let sends = schedule(250.0, Duration::from_secs(2));
        assert_eq!(sends.len(), 500);
        assert_eq!(sends[0], Duration::ZERO);
        assert_eq!(sends[1], Duration::from_millis(4));
        assert_eq!(sends[250], Duration::from_secs(1));
        assert!(*sends.last().unwrap() < Duration::from_secs(2));
        assert!(sends.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn a_fractional_rate_rounds_the_count_down() {
        assert_eq!(schedule(2.5, Duration::from_secs(3)).len(), 7);
        assert_eq!(
            schedule(2.5, Duration::from_secs(3))[1],
            Duration::from_millis(400)
        );
    }

    #[test]
    fn no_rate_sends_nothing() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(schedule(rate, Duration::from_secs(10)).is_empty(), "{rate}");
        }
    }

    #[test]
    fn durations_parse_with_and_without_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }
}
