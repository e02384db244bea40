//! Events: [`NewEvent`] (what a service records) and [`OutboxRecord`] (what a publisher sends).

use chrono::{DateTime, Utc};
use eventful_core::headers::{
    self, CONTENT_TYPE, CONTENT_TYPE_BYTES, CONTENT_TYPE_JSON, EVENT_ID, EVENT_TYPE, TRACEPARENT,
};
use uuid::Uuid;

use crate::Error;

/// An event to record with [`Outbox::record`](crate::Outbox::record).
///
/// The id is a UUIDv7 chosen when the value is built, so the caller can keep it (for example
/// to return it in an HTTP response) before the transaction commits.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub(crate) id: Uuid,
    pub(crate) topic: String,
    pub(crate) key: String,
    pub(crate) event_type: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(String, String)>,
}

impl NewEvent {
    /// An event whose payload is `payload` serialized to JSON (`content-type:
    /// application/json`).
    ///
    /// `key` is the ordering key (for example the aggregate id): events with the same key are
    /// published in the order their transactions committed, and become the Kafka message key.
    pub fn json<T: serde::Serialize>(
        topic: impl Into<String>,
        key: impl Into<String>,
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<NewEvent, Error> {
        let payload = serde_json::to_vec(payload)?;
        Ok(Self::build(
            topic,
            key,
            event_type,
            payload,
            CONTENT_TYPE_JSON,
        ))
    }

    /// An event with a raw payload (`content-type: application/octet-stream`).
    pub fn bytes(
        topic: impl Into<String>,
        key: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> NewEvent {
        Self::build(topic, key, event_type, payload.into(), CONTENT_TYPE_BYTES)
    }

    fn build(
        topic: impl Into<String>,
        key: impl Into<String>,
        event_type: impl Into<String>,
        payload: Vec<u8>,
        content_type: &'static str,
    ) -> NewEvent {
        NewEvent {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: key.into(),
            event_type: event_type.into(),
            payload,
            content_type,
            headers: Vec::new(),
        }
    }

    /// Adds a header (a Kafka header on the published message). Setting a name twice keeps
    /// the last value. The reserved names `event-id`, `event-type` and `content-type` are
    /// written by the publisher from the event itself; a user header with one of those names
    /// is ignored when publishing.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> NewEvent {
        let name = name.into();
        let value = value.into();
        if let Some(slot) = self.headers.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.headers.push((name, value));
        }
        self
    }

    /// Sets the W3C `traceparent` header explicitly (see the crate docs on tracing).
    pub fn traceparent(self, value: impl Into<String>) -> NewEvent {
        self.header(TRACEPARENT, value)
    }

    /// The event id (UUIDv7), also the `event-id` header of the published message.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The ordering key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The destination topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The headers added so far.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// `true` when the event already carries a header named `name`.
    pub fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }
}

/// A recorded event as the relay hands it to a [`Publisher`](crate::Publisher).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxRecord {
    /// Position in the outbox table (`seq`); for one key, seq order is commit order.
    pub seq: i64,
    /// Event id (UUIDv7): the `event-id` header.
    pub id: Uuid,
    /// Destination topic.
    pub topic: String,
    /// Ordering key: the Kafka message key.
    pub key: String,
    /// Event type: the `event-type` header.
    pub event_type: String,
    /// Payload bytes: the Kafka message value.
    pub payload: Vec<u8>,
    /// `application/json` or `application/octet-stream`: the `content-type` header.
    pub content_type: String,
    /// The user's headers, in the order they were added.
    pub headers: Vec<(String, String)>,
    /// When the event was recorded (database clock).
    pub created_at: DateTime<Utc>,
    /// Failed publish attempts so far.
    pub attempts: i32,
}

/// An outbox row as the relay's fetch returns it (`headers` is JSON text).
#[derive(sqlx::FromRow)]
pub(crate) struct RecordRow {
    seq: i64,
    id: Uuid,
    topic: String,
    key: String,
    event_type: String,
    payload: Vec<u8>,
    content_type: String,
    headers: String,
    created_at: DateTime<Utc>,
    attempts: i32,
}

impl TryFrom<RecordRow> for OutboxRecord {
    type Error = Error;

    fn try_from(row: RecordRow) -> Result<OutboxRecord, Error> {
        Ok(OutboxRecord {
            seq: row.seq,
            id: row.id,
            topic: row.topic,
            key: row.key,
            event_type: row.event_type,
            payload: row.payload,
            content_type: row.content_type,
            headers: serde_json::from_str(&row.headers)?,
            created_at: row.created_at,
            attempts: row.attempts,
        })
    }
}

impl OutboxRecord {
    /// The record a relay would hand to a publisher for `event` stored at position `seq`
    /// (for testing publishers and for embedding a publisher without the relay).
    pub fn from_event(seq: i64, event: NewEvent) -> OutboxRecord {
        OutboxRecord {
            seq,
            id: event.id,
            topic: event.topic,
            key: event.key,
            event_type: event.event_type,
            payload: event.payload,
            content_type: event.content_type.to_owned(),
            headers: event.headers,
            created_at: Utc::now(),
            attempts: 0,
        }
    }

    /// The headers of the published message per the wire contract: `event-id`, `event-type`,
    /// `content-type`, then the user's headers (reserved names skipped).
    pub fn wire_headers(&self) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(3 + self.headers.len());
        out.push((EVENT_ID.to_owned(), self.id.hyphenated().to_string()));
        out.push((EVENT_TYPE.to_owned(), self.event_type.clone()));
        out.push((CONTENT_TYPE.to_owned(), self.content_type.clone()));
        for (name, value) in &self.headers {
            if !headers::is_reserved(name) {
                out.push((name.clone(), value.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_event_has_json_content_type_and_v7_id() {
        let e = NewEvent::json("t", "k", "Created", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(e.content_type, CONTENT_TYPE_JSON);
        assert_eq!(e.payload, br#"{"a":1}"#);
        assert_eq!(e.id().get_version_num(), 7);
    }

    #[test]
    fn ids_of_successive_events_increase() {
        let a = NewEvent::bytes("t", "k", "x", vec![1]);
        let b = NewEvent::bytes("t", "k", "x", vec![2]);
        assert!(a.id() < b.id());
        assert_eq!(a.content_type, CONTENT_TYPE_BYTES);
    }

    #[test]
    fn header_replaces_same_name_and_keeps_order() {
        let e = NewEvent::bytes("t", "k", "x", vec![])
            .header("a", "1")
            .header("b", "2")
            .header("a", "3");
        assert_eq!(
            e.headers(),
            &[("a".into(), "3".into()), ("b".into(), "2".into())]
        );
    }

    #[test]
    fn wire_headers_put_contract_headers_first_and_skip_reserved_user_headers() {
        let record = OutboxRecord {
            seq: 1,
            id: Uuid::now_v7(),
            topic: "t".into(),
            key: "k".into(),
            event_type: "Created".into(),
            payload: vec![],
            content_type: CONTENT_TYPE_JSON.into(),
            headers: vec![
                ("event-id".into(), "forged".into()),
                (TRACEPARENT.into(), "00-abc-def-01".into()),
            ],
            created_at: Utc::now(),
            attempts: 0,
        };
        let headers = record.wire_headers();
        assert_eq!(
            headers[0],
            ("event-id".into(), record.id.hyphenated().to_string())
        );
        assert_eq!(headers[1], ("event-type".into(), "Created".into()));
        assert_eq!(
            headers[2],
            ("content-type".into(), CONTENT_TYPE_JSON.into())
        );
        assert_eq!(headers[3], (TRACEPARENT.into(), "00-abc-def-01".into()));
        assert_eq!(headers.len(), 4);
    }
}
