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
