//! The inbox's instruments in the `metrics` facade (feature `metrics`); without the feature
//! every function here is an empty inline call.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `eventful_inbox_applied_total` | counter | `consumer`, `topic` |
//! | `eventful_inbox_duplicates_total` | counter | `consumer`, `topic` |
//! | `eventful_inbox_dead_letters_total` | counter | `consumer`, `topic` |
//! | `eventful_inbox_skipped_total` | counter | `consumer`, `topic` |
//! | `eventful_inbox_handler_duration_seconds` | histogram | `consumer`, `event_type` |
//! | `eventful_inbox_lag` | gauge | `group`, `topic`, `partition` |
//!
//! The lag comes from librdkafka's statistics (every `statistics.interval.ms`, 5 s unless
//! set in [`ConsumerOptions::set`](super::ConsumerOptions::set)): the partition's high
//! watermark minus the offset the runtime stored last, i.e. messages not yet settled.

use std::future::Future;

use super::Delivery;
#[cfg(feature = "metrics")]
use super::Outcome;

/// Counts a settled message by its outcome.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[inline]
pub(super) fn settled(consumer: &str, delivery: &Delivery) {
    #[cfg(feature = "metrics")]
    {
        let name = match delivery.outcome {
            Outcome::Applied => "eventful_inbox_applied_total",
            Outcome::Duplicate => "eventful_inbox_duplicates_total",
            Outcome::DeadLettered { .. } => "eventful_inbox_dead_letters_total",
            Outcome::Skipped => "eventful_inbox_skipped_total",
        };
        ::metrics::counter!(name, "consumer" => consumer.to_owned(), "topic" => delivery.topic.clone())
            .increment(1);
    }
}

/// Runs a handler, recording how long it took (whatever its result).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[inline]
pub(super) async fn timed<T>(
    consumer: &str,
    event_type: &str,
    handler: impl Future<Output = T>,
) -> T {
    #[cfg(feature = "metrics")]
    {
        let started = std::time::Instant::now();
        let result = handler.await;
        ::metrics::histogram!(
            "eventful_inbox_handler_duration_seconds",
            "consumer" => consumer.to_owned(),
            "event_type" => event_type.to_owned()
        )
        .record(started.elapsed());
        result
    }
    #[cfg(not(feature = "metrics"))]
    handler.await
}

/// Sets the lag of every partition this member fetches from librdkafka's statistics.
#[cfg(feature = "metrics")]
pub(super) fn lag(group: &str, statistics: &rdkafka::statistics::Statistics) {
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            // -1 is librdkafka's internal "unassigned" partition; a partition this member
            // does not fetch (revoked, or not assigned yet) has no lag of its own here.
            if *partition < 0 || p.fetch_state != "active" {
                continue;
            }
            // Lag behind what the runtime settled (stored offsets); before the first
            // store, behind the committed offset; unknown (-1) until both ends are known.
            let lag = if p.consumer_lag_stored >= 0 {
                p.consumer_lag_stored
            } else {
                p.consumer_lag
            };
            if lag >= 0 {
                set_lag(group, topic, *partition, lag as f64);
            }
        }
    }
}

/// Sets one partition's lag (0 when the partition is revoked: its new owner reports it).
#[cfg(feature = "metrics")]
pub(super) fn set_lag(group: &str, topic: &str, partition: i32, lag: f64) {
    ::metrics::gauge!(
        "eventful_inbox_lag",
        "group" => group.to_owned(),
        "topic" => topic.to_owned(),
        "partition" => partition.to_string()
    )
    .set(lag);
}
