//! The `Publisher` contract, run against the in-memory and the Kafka publisher.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use common::contract::{self, Readback, Wire};
use eventful_outbox::{Error, InMemoryPublisher, KafkaPublisher};
use eventful_test_support::kafka;
use uuid::Uuid;

const POISON_SIZE: usize = 64 * 1024;

struct Memory(InMemoryPublisher);

#[async_trait]
impl Readback for Memory {
    async fn read(&self, topic: &str, _expected: &HashSet<Uuid>) -> Vec<Wire> {
        self.0
            .messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| Wire {
                key: m.key,
                payload: m.payload,
                headers: m.headers,
            })
            .collect()
    }
}

struct Kafka(String);

#[async_trait]
impl Readback for Kafka {
    async fn read(&self, topic: &str, expected: &HashSet<Uuid>) -> Vec<Wire> {
        common::read_topic(
            &self.0,
            topic,
            expected,
            Duration::from_secs(30),
            Some(Duration::from_secs(1)),
        )
        .await
        .into_iter()
        .map(|m| Wire {
            key: common::key_of(&m),
            payload: m.payload.clone().unwrap_or_default(),
            headers: m.headers.clone(),
        })
        .collect()
    }
}

#[tokio::test]
async fn in_memory_publisher_passes_the_contract() {
    let publisher = InMemoryPublisher::new();
    publisher.fail_when(|r| {
        (r.payload.len() >= POISON_SIZE)
            .then(|| Error::PublishPermanent("message too large".into()))
    });
    let read = Memory(publisher.clone());
    contract::accepts_empty_batch(&publisher).await;
    contract::delivers_batch_per_wire_contract(&publisher, &read, "t1").await;
    contract::failure_holds_back_only_its_key(&publisher, &read, "t2", vec![7; POISON_SIZE]).await;
}

#[tokio::test]
async fn kafka_publisher_passes_the_contract() {
    let brokers = kafka::brokers();
    let publisher = KafkaPublisher::builder(&brokers)
        // Larger messages are rejected locally by librdkafka: a permanent error.
        .set("message.max.bytes", (POISON_SIZE / 2).to_string())
        .build()
        .unwrap();
    let read = Kafka(brokers);
    contract::accepts_empty_batch(&publisher).await;
    let t1 = kafka::create_topic(3).await;
    contract::delivers_batch_per_wire_contract(&publisher, &read, &t1).await;
    let t2 = kafka::create_topic(1).await;
    contract::failure_holds_back_only_its_key(&publisher, &read, &t2, vec![7; POISON_SIZE]).await;
}

/// Per-key order when the broker (not librdkafka) rejects an event: the later event of its
/// key must not reach the topic, and the rejection must not take other keys with it. Run
/// with librdkafka batching as usual (the rejected event shares a produce request with the
/// others) and with one message per request (`batch.num.messages=1`, so the later event of
/// the key travels in a request of its own).
#[tokio::test]
async fn kafka_broker_rejection_holds_back_only_the_rest_of_its_key() {
    use eventful_outbox::{NewEvent, OutboxRecord, Publisher as _};
    let brokers = kafka::brokers();
    for batch_messages in ["1", "10000"] {
        // One partition: every key shares it, so produce requests mix the keys.
        let topic = common::create_small_topic(&brokers, 1, 1024).await;
        let publisher = KafkaPublisher::builder(&brokers)
            .set("batch.num.messages", batch_messages)
            .build()
            .unwrap();
        let batch: Vec<OutboxRecord> = [
            NewEvent::bytes(&topic, "a", "E", vec![7; 4096]),
            NewEvent::bytes(&topic, "a", "E", b"a2".to_vec()),
            NewEvent::bytes(&topic, "b", "E", b"b1".to_vec()),
            NewEvent::bytes(&topic, "c", "E", b"c1".to_vec()),
            NewEvent::bytes(&topic, "b", "E", b"b2".to_vec()),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, e)| OutboxRecord::from_event(i as i64 + 1, e))
        .collect();
        let results = publisher.publish_batch(&batch).await;
        let got = common::read_topic(
            &brokers,
            &topic,
            &[batch[2].id, batch[3].id, batch[4].id].into(),
            Duration::from_secs(15),
            Some(Duration::from_secs(2)),
        )
        .await;
        let payloads: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).into_owned())
            .collect();
        assert!(
            !payloads.contains(&"a2".to_owned()),
            "batch.num.messages={batch_messages}: a2 is on the topic although a1 before it was rejected: {payloads:?}"
        );
        assert!(
            matches!(results[0], Err(Error::PublishPermanent(_))),
            "batch.num.messages={batch_messages}: {:?}",
            results[0]
        );
        assert!(
            matches!(results[1], Err(Error::PublishRetryable(_))),
            "batch.num.messages={batch_messages}: {:?}",
            results[1]
        );
        assert!(
            results[2..].iter().all(Result::is_ok),
            "batch.num.messages={batch_messages}: other keys failed with the rejected event: {results:?}"
        );
        let mut others = payloads.clone();
        others.sort();
        assert_eq!(
            others,
            ["b1", "b2", "c1"],
            "batch.num.messages={batch_messages}"
        );
        let b: Vec<&String> = payloads.iter().filter(|p| p.starts_with('b')).collect();
        assert_eq!(b, ["b1", "b2"]);
    }
}
