//! The `Publisher` contract (`eventful_outbox::contract`), run against the in-memory and
//! the Kafka publisher. The in-memory half needs no server (`--no-default-features`).
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

#[cfg(feature = "kafka")]
mod common;

const POISON_SIZE: usize = 64 * 1024;

mod in_memory {
    use eventful_outbox::{contract::Fixture, Error, InMemoryPublisher};

    async fn fixture() -> Fixture<InMemoryPublisher, InMemoryPublisher> {
        let publisher = InMemoryPublisher::new();
        publisher.fail_when(|r| {
            (r.payload.len() >= super::POISON_SIZE)
                .then(|| Error::PublishPermanent("message too large".into()))
        });
        Fixture {
            readback: publisher.clone(),
            publisher,
            topic: "contract".into(),
            poison: vec![7; super::POISON_SIZE],
        }
    }

    eventful_outbox::contract_tests!(fixture());

    /// A publisher behind `Arc<dyn Publisher>` (how applications often hold one) keeps the
    /// contract.
    mod shared {
        use std::sync::Arc;

        use eventful_outbox::{contract::Fixture, InMemoryPublisher, Publisher};

        async fn fixture() -> Fixture<Arc<dyn Publisher>, InMemoryPublisher> {
            let inner = super::fixture().await;
            Fixture {
                publisher: Arc::new(inner.publisher),
                readback: inner.readback,
                topic: inner.topic,
                poison: inner.poison,
            }
        }

        eventful_outbox::contract_tests!(fixture());
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use std::collections::HashSet;
    use std::time::Duration;

    use async_trait::async_trait;
    use eventful_outbox::contract::{Fixture, Readback, Wire};
    use eventful_outbox::{Error, KafkaPublisher, NewEvent, OutboxRecord, Publisher as _};
    use eventful_test_support::kafka;
    use uuid::Uuid;

    use super::{common, POISON_SIZE};

    /// Reads a topic from the beginning with a fresh consumer.
    struct KafkaReadback(String);

    #[async_trait]
    impl Readback for KafkaReadback {
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

    async fn fixture() -> Fixture<KafkaPublisher, KafkaReadback> {
        let brokers = kafka::brokers();
        let publisher = KafkaPublisher::builder(&brokers)
            // Larger messages are rejected locally by librdkafka: a permanent error.
            .set("message.max.bytes", (POISON_SIZE / 2).to_string())
            .build()
            .unwrap();
        Fixture {
            publisher,
            readback: KafkaReadback(brokers),
            topic: kafka::create_topic(3).await,
            poison: vec![7; POISON_SIZE],
        }
    }

    eventful_outbox::contract_tests!(fixture());

    /// Per-key order when the broker (not librdkafka) rejects an event: the later event of
    /// its key must not reach the topic, and the rejection must not take other keys with it.
    /// Run with librdkafka batching as usual (the rejected event shares a produce request
    /// with the others) and with one message per request (`batch.num.messages=1`, so the
    /// later event of the key travels in a request of its own).
    #[tokio::test]
    async fn kafka_broker_rejection_holds_back_only_the_rest_of_its_key() {
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
                .map(|m| {
                    String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).into_owned()
                })
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
}
