//! The contract every `Publisher` backend must pass (see `Publisher`'s docs), run by
//! `tests/publisher_contract.rs` against the in-memory and the Kafka publisher.

use std::collections::HashSet;

use async_trait::async_trait;
use eventful_outbox::{Error, NewEvent, OutboxRecord, Publisher};
use uuid::Uuid;

/// A message as read back from the backend.
#[derive(Debug, Clone)]
pub struct Wire {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Wire {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn id(&self) -> Uuid {
        Uuid::parse_str(self.header("event-id").expect("event-id")).expect("uuid")
    }
}

/// Reads what the backend stored on `topic` (in storage order per key), waiting until every
/// id of `expected` is present, and then briefly for anything unexpected.
#[async_trait]
pub trait Readback: Send + Sync {
    async fn read(&self, topic: &str, expected: &HashSet<Uuid>) -> Vec<Wire>;
}

fn records(events: Vec<NewEvent>) -> Vec<OutboxRecord> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| OutboxRecord::from_event(i as i64 + 1, e))
        .collect()
}

/// Every event of a batch arrives once, with the wire-contract key, payload and headers,
/// in batch order per key.
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
            wire.header("event-id"),
            Some(record.id.hyphenated().to_string().as_str())
        );
        assert_eq!(wire.header("event-type"), Some(record.event_type.as_str()));
        assert_eq!(
            wire.header("content-type"),
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
            .header("content-type"),
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

/// An empty batch is fine and yields no results.
pub async fn accepts_empty_batch(publisher: &dyn Publisher) {
    assert!(publisher.publish_batch(&[]).await.is_empty());
}

/// When an event fails, the later events of its key in the same batch are not sent (and are
/// reported as retryable failures); other keys are unaffected. `poison` must make the backend
/// reject the event permanently.
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
    assert!(results[2].is_ok());
    assert!(
        matches!(results[3], Err(Error::PublishRetryable(_))),
        "{:?}",
        results[3]
    );
    assert!(results[4].is_ok());
    let expected: HashSet<Uuid> = [batch[0].id, batch[2].id, batch[4].id].into();
    let got = read.read(topic, &expected).await;
    let ids: Vec<Uuid> = got.iter().map(Wire::id).collect();
    assert_eq!(ids.len(), 3, "only the three good events: {ids:?}");
    assert!(!ids.contains(&batch[1].id) && !ids.contains(&batch[3].id));
}
