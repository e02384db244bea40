//! Consumer-group lag: each service group's committed offsets against the topic's high
//! watermarks.
//!
//! The inbox consumer stores an offset after its transaction commits and librdkafka commits
//! stored offsets every `auto.commit.interval.ms` (5 s), so right after a run up to ~5 s of
//! already-processed events can show as lag; a lag that stays is a consumer behind.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The services that consume the topic, each in group `{COMMERCE_GROUP_PREFIX}-{service}`
/// (`Settings::group`).
pub const SERVICES: [&str; 4] = ["order", "payment", "shipping", "notification"];

/// One group's lag summed over the topic's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    /// Consumer group id.
    pub group: String,
    /// Messages between the committed offsets and the high watermarks.
    pub lag: i64,
    /// Partitions with no committed offset (counted from their low watermark).
    pub uncommitted: usize,
}

impl std::fmt::Display for GroupLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.group, self.lag)?;
        if self.uncommitted > 0 {
            write!(f, " ({} partitions never committed)", self.uncommitted)?;
        }
        Ok(())
    }
}

/// The lag of each of `groups` on `topic`. Reading committed offsets sends an OffsetFetch
/// only: the consumer created here never subscribes, so it does not join (or rebalance) the
/// services' groups.
pub async fn consumer_lag(
    brokers: &str,
    topic: &str,
    groups: &[String],
) -> anyhow::Result<Vec<GroupLag>> {
    let (brokers, topic, groups) = (brokers.to_owned(), topic.to_owned(), groups.to_vec());
    // librdkafka's metadata and offset calls block.
    tokio::task::spawn_blocking(move || {
        groups
            .iter()
            .map(|group| group_lag(&brokers, &topic, group))
            .collect()
    })
    .await?
}

fn group_lag(brokers: &str, topic: &str, group: &str) -> anyhow::Result<GroupLag> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("lag consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("metadata of {topic}"))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition as i32);
    }
    let committed = consumer
        .committed_offsets(list, timeout)
        .with_context(|| format!("committed offsets of {group}"))?;
    let (mut lag, mut uncommitted) = (0, 0);
    for element in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, element.partition(), timeout)?;
        lag += match element.offset() {
            Offset::Offset(at) => (high - at).max(0),
            _ => {
                uncommitted += 1;
                high - low
            }
        };
    }
    Ok(GroupLag {
        group: group.to_owned(),
        lag,
        uncommitted,
    })
}
