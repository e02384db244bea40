//! The envelope of a consumed event: the wire contract written by `eventful-outbox`.

use eventful_core::headers::{CONTENT_TYPE, CONTENT_TYPE_BYTES, EVENT_ID, EVENT_TYPE};
use uuid::Uuid;

/// What a handler learns about the event it handles, besides the typed payload.
///
/// Built by the consumer runtime from one Kafka message (see the crate docs for the wire
/// contract); [`EventMeta::parse`] does the same for any transport.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventMeta {
    /// The event id from the `event-id` header: the deduplication key.
    pub id: Uuid,
    /// The event type from the `event-type` header.
    pub event_type: String,
    /// The message key (ordering key, e.g. the aggregate id); empty when the message had none.
    pub key: String,
    /// The `content-type` header, if present.
    pub content_type: Option<String>,
    /// All headers of the message, including the three above, values decoded as UTF-8
    /// (lossily), in message order.
    pub headers: Vec<(String, String)>,
    /// The topic the event was read from.
    pub topic: String,
    /// The partition the event was read from.
    pub partition: i32,
    /// The offset of the message in its partition.
    pub offset: i64,
    /// The raw payload bytes (also decoded into the handler's typed payload).
    pub payload: Vec<u8>,
}

impl EventMeta {
    /// The value of header `name` (first occurrence, case-sensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Parses the envelope of one message.
    ///
    /// Fails with an [`EnvelopeError`] when the `event-id` header is missing or not a UUID,
    /// or the `event-type` header is missing or empty. Such a message is dead-lettered by the
    /// consumer runtime.
    pub fn parse(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        headers: Vec<(String, Vec<u8>)>,
        payload: Option<&[u8]>,
    ) -> Result<EventMeta, EnvelopeError> {
        let headers: Vec<(String, String)> = headers
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        let raw_id = find(EVENT_ID).ok_or(EnvelopeError::MissingHeader(EVENT_ID))?;
        let id = Uuid::parse_str(raw_id.trim()).map_err(|e| EnvelopeError::InvalidEventId {
            value: raw_id.clone(),
            reason: e.to_string(),
        })?;
        let event_type = find(EVENT_TYPE)
            .filter(|t| !t.is_empty())
            .ok_or(EnvelopeError::MissingHeader(EVENT_TYPE))?;
        let content_type = find(CONTENT_TYPE);
        Ok(EventMeta {
            id,
            event_type,
            key: key
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            content_type,
            headers,
            topic: topic.to_owned(),
            partition,
            offset,
            payload: payload.map(<[u8]>::to_vec).unwrap_or_default(),
        })
    }

    /// Decodes the payload into `T`.
    ///
    /// `application/octet-stream` payloads are offered to `T` as raw bytes (so
    /// `serde::de::IgnoredAny` or a bytes-accepting type works and the handler reads
    /// [`EventMeta::payload`]); every other content type (or none) is parsed as JSON.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, DecodeError> {
        if self.content_type.as_deref() == Some(CONTENT_TYPE_BYTES) {
            let deserializer =
                serde::de::value::BytesDeserializer::<serde::de::value::Error>::new(&self.payload);
            T::deserialize(deserializer).map_err(|e| DecodeError(e.to_string()))
        } else {
            serde_json::from_slice(&self.payload).map_err(|e| DecodeError(e.to_string()))
        }
    }
}

/// Why a message's envelope is not a valid event (it goes to the dead-letter destination).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A required header is missing (or empty).
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// The `event-id` header is not a UUID.
    #[error("invalid event-id header {value:?}: {reason}")]
    InvalidEventId {
        /// The header's value.
        value: String,
        /// The parser's complaint.
        reason: String,
    },
}

/// The payload could not be decoded into the handler's payload type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload does not decode: {0}")]
pub struct DecodeError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn parses_the_outbox_envelope() {
        let id = Uuid::now_v7();
        let meta = EventMeta::parse(
            "orders",
            3,
            42,
            Some(b"order-1"),
            headers(&[
                ("event-id", &id.to_string()),
                ("event-type", "OrderPlaced"),
                ("content-type", eventful_core::headers::CONTENT_TYPE_JSON),
                ("traceparent", "00-x-y-01"),
            ]),
            Some(br#"{"n":1}"#),
        )
        .unwrap();
        assert_eq!(meta.id, id);
        assert_eq!(meta.event_type, "OrderPlaced");
        assert_eq!(meta.key, "order-1");
        assert_eq!(
            (meta.topic.as_str(), meta.partition, meta.offset),
            ("orders", 3, 42)
        );
        assert_eq!(meta.header("traceparent"), Some("00-x-y-01"));
        let value: serde_json::Value = meta.decode().unwrap();
        assert_eq!(value["n"], 1);
    }

    #[test]
    fn rejects_missing_or_invalid_ids_and_types() {
        let parse = |pairs: &[(&str, &str)]| {
            EventMeta::parse("t", 0, 0, None, headers(pairs), None).unwrap_err()
        };
        assert_eq!(
            parse(&[("event-type", "X")]),
            EnvelopeError::MissingHeader(EVENT_ID)
        );
        assert!(matches!(
            parse(&[("event-id", "nope"), ("event-type", "X")]),
            EnvelopeError::InvalidEventId { .. }
        ));
        assert_eq!(
            parse(&[
                ("event-id", &Uuid::now_v7().to_string()),
                ("event-type", "")
            ]),
            EnvelopeError::MissingHeader(EVENT_TYPE)
        );
    }

    #[test]
    fn decodes_json_and_offers_raw_bytes() {
        let mut meta = EventMeta::parse(
            "t",
            0,
            0,
            None,
            headers(&[
                ("event-id", &Uuid::now_v7().to_string()),
                ("event-type", "X"),
            ]),
            Some(b"not json"),
        )
        .unwrap();
        assert!(meta.decode::<serde_json::Value>().is_err());
        meta.content_type = Some(CONTENT_TYPE_BYTES.to_owned());
        assert!(meta.decode::<serde::de::IgnoredAny>().is_ok());
        assert_eq!(meta.payload, b"not json");
    }
}
