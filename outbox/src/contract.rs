//! The contract every [`Publisher`] backend must pass (feature `test-utils`).
//!
//! Plain public async functions that panic on a broken guarantee, in the style of
//! `object_store::integration` (and like `eventful_reservation::contract`). A third-party
//! publisher (NATS, RabbitMQ, SQS, ...) proves itself by giving each function a publisher, a
//! way to read back what reached its broker ([`Readback`]), a fresh topic and a payload its
//! broker rejects for good; or by letting [`contract_tests!`](crate::contract_tests)
//! generate one `#[tokio::test]` per function from a [`Fixture`] factory:
//!
//! ```
//! use eventful_outbox::{contract::Fixture, Error, InMemoryPublisher};
//!
//! async fn fixture() -> Fixture<InMemoryPublisher, InMemoryPublisher> {
//!     let publisher = InMemoryPublisher::new();
//!     // The poison payload: the "broker" refuses anything this large.
//!     publisher.fail_when(|r| (r.payload.len() >= 1024).then(|| Error::PublishPermanent("too large".into())));
//!     Fixture { readback: publisher.clone(), publisher, topic: "orders".into(), poison: vec![0; 1024] }
//! }
//!
//! eventful_outbox::contract_tests!(fixture());
//! # fn main() {}
//! ```
//!
//! The guarantees checked are those the relay relies on, listed on [`Publisher`]. The macro
//! expands to `#[tokio::test(flavor = "multi_thread")]` functions: the test crate needs
//! `tokio` with the `macros` and `rt-multi-thread` features.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use async_trait::async_trait;
use uuid::Uuid;

use crate::{Error, InMemoryPublisher, NewEvent, OutboxRecord, Publisher};

/// Generates one `#[tokio::test]` per contract function; `$fixture` is an expression
/// evaluating to a future of a fresh [`Fixture`], evaluated once per test.
#[macro_export]
macro_rules! contract_tests {
    ($fixture:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn accepts_empty_batch() {
            let fixture = $fixture.await;
            $crate::contract::accepts_empty_batch(&fixture.publisher).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn delivers_batch_per_wire_contract() {
            let fixture = $fixture.await;
            $crate::contract::delivers_batch_per_wire_contract(
                &fixture.publisher,
                &fixture.readback,
                &fixture.topic,
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failure_holds_back_only_its_key() {
            let fixture = $fixture.await;
            $crate::contract::failure_holds_back_only_its_key(
                &fixture.publisher,
                &fixture.readback,
                &fixture.topic,
                fixture.poison.clone(),
            )
            .await;
        }
    };
}

/// What one contract test needs: built fresh for each test by the factory given to
/// [`contract_tests!`](crate::contract_tests). Built by backend tests with a struct
/// literal, so deliberately not `#[non_exhaustive]`.
#[derive(Debug)]
pub struct Fixture<P, R> {
    /// The publisher under test.
    pub publisher: P,
    /// Reads back what reached the broker.
    pub readback: R,
    /// A topic no other test writes to (created beforehand if the broker needs it).
    pub topic: String,
    /// A payload the broker (or the client) rejects permanently, e.g. one larger than the
    /// broker's message size limit: the publisher must report it as
    /// [`Error::PublishPermanent`].
    pub poison: Vec<u8>,
}

/// A message as read back from the broker (built by a [`Readback`] with a struct literal,
/// so deliberately not `#[non_exhaustive]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    /// The message key (the event key).
    pub key: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The headers, in any order.
    pub headers: Vec<(String, String)>,
}

impl Wire {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `event-id` header, parsed.
    pub fn id(&self) -> Uuid {
        Uuid::parse_str(
            self.header(crate::headers::EVENT_ID)
                .expect("event-id header"),
        )
        .expect("event-id is a UUID")
    }
}

/// Reads what the broker stored on a topic.
#[async_trait]
pub trait Readback: Send + Sync {
    /// The messages of `topic` in storage order per key, once every id of `expected` is
    /// there (then waiting briefly for anything unexpected, such as a duplicate or an event
    /// that should have been held back).
    async fn read(&self, topic: &str, expected: &HashSet<Uuid>) -> Vec<Wire>;
}

#[async_trait]
impl<R: Readback + ?Sized> Readback for std::sync::Arc<R> {
    async fn read(&self, topic: &str, expected: &HashSet<Uuid>) -> Vec<Wire> {
        (**self).read(topic, expected).await
    }
}

/// The in-memory publisher's log is its broker: reading it back needs no waiting.
#[async_trait]
impl Readback for InMemoryPublisher {
    async fn read(&self, topic: &str, _expected: &HashSet<Uuid>) -> Vec<Wire> {
        self.messages()
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

fn records(events: Vec<NewEvent>) -> Vec<OutboxRecord> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| OutboxRecord::from_event(i as i64 + 1, e))
        .collect()
}

/// An empty batch is fine and yields no results.
pub async fn accepts_empty_batch(publisher: &dyn Publisher) {
    assert!(publisher.publish_batch(&[]).await.is_empty());
}

/// Every event of a batch arrives once, with the wire-contract key, payload and headers
/// (`event-id`, `event-type`, `content-type`, then the event's own), in batch order per key.
pub async fn delivers_batch_per_wire_contract(
    publisher: &dyn Publisher,
    read: &dyn Readback,
    topic: &str,
) {
    let mut events = Vec::new();
    for i in 0..5 {
        for key in ["k1", "k2", "k3"] {
            let e = NewEvent::json(
                topic,
                key,
                "Thing.Happened",
                &serde_json::json!({ "key": key, "n": i }),
            )
            .unwrap()
            .traceparent(format!("00-{:032x}-{:016x}-01", i + 1, i + 1))
            .header("tenant", "t-1");
            events.push(e);
        }
    }
    events.push(NewEvent::bytes(
        topic,
        "k4",
        "Blob",
        vec![0u8, 159, 146, 150],
    ));
    let batch = records(events);
    let results = publisher.publish_batch(&batch).await;
    assert_eq!(results.len(), batch.len(), "one result per event");
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let expected: HashSet<Uuid> = batch.iter().map(|r| r.id).collect();
    let got = read.read(topic, &expected).await;
    assert_eq!(got.len(), batch.len(), "each event exactly once");
    for record in &batch {
        let wire = got.iter().find(|w| w.id() == record.id).expect("published");
        assert_eq!(wire.key, record.key);
        assert_eq!(wire.payload, record.payload);
        assert_eq!(
            wire.header(crate::headers::EVENT_ID),
            Some(record.id.hyphenated().to_string().as_str())
        );
        assert_eq!(
            wire.header(crate::headers::EVENT_TYPE),
            Some(record.event_type.as_str())
        );
        assert_eq!(
            wire.header(crate::headers::CONTENT_TYPE),
            Some(record.content_type.as_str())
        );
        for (name, value) in &record.headers {
            assert_eq!(wire.header(name), Some(value.as_str()), "header {name}");
        }
    }
    assert_eq!(
        got.iter()
            .find(|w| w.key == "k4")
            .unwrap()
            .header(crate::headers::CONTENT_TYPE),
        Some("application/octet-stream")
    );
    for key in ["k1", "k2", "k3"] {
        let in_batch: Vec<Uuid> = batch
            .iter()
            .filter(|r| r.key == key)
            .map(|r| r.id)
            .collect();
        let stored: Vec<Uuid> = got.iter().filter(|w| w.key == key).map(Wire::id).collect();
        assert_eq!(stored, in_batch, "order of key {key}");
    }
}

/// When an event fails, the later events of its key in the same batch are not sent (and are
/// reported as [`Error::PublishRetryable`]); other keys are unaffected. `poison` must make
/// the backend reject the event permanently ([`Error::PublishPermanent`]).
pub async fn failure_holds_back_only_its_key(
    publisher: &dyn Publisher,
    read: &dyn Readback,
    topic: &str,
    poison: Vec<u8>,
) {
    let batch = records(vec![
        NewEvent::bytes(topic, "a", "E", b"a1".to_vec()),
        NewEvent::bytes(topic, "a", "E", poison),
        NewEvent::bytes(topic, "b", "E", b"b1".to_vec()),
        NewEvent::bytes(topic, "a", "E", b"a3".to_vec()),
        NewEvent::bytes(topic, "b", "E", b"b2".to_vec()),
    ]);
    let results = publisher.publish_batch(&batch).await;
    assert_eq!(results.len(), 5);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(Error::PublishPermanent(_))),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert!(
        matches!(results[3], Err(Error::PublishRetryable(_))),
        "{:?}",
        results[3]
    );
    assert!(results[4].is_ok(), "{:?}", results[4]);
    let expected: HashSet<Uuid> = [batch[0].id, batch[2].id, batch[4].id].into();
    let got = read.read(topic, &expected).await;
    let ids: Vec<Uuid> = got.iter().map(Wire::id).collect();
    assert_eq!(ids.len(), 3, "only the three good events: {ids:?}");
    assert!(!ids.contains(&batch[1].id) && !ids.contains(&batch[3].id));
}
