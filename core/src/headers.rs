//! The Kafka header names of an Eventful message, and the content-type values.
//!
//! Every event the outbox publishes carries the **envelope** headers [`EVENT_ID`],
//! [`EVENT_TYPE`] and [`CONTENT_TYPE`], written from the outbox row (a user header with one
//! of those names is dropped, see [`is_reserved`]), then the user's headers in the order
//! they were added. The consumer runtime reads the envelope back: a message without a valid
//! `event-id` or a non-empty `event-type` is dead-lettered. [`TRACEPARENT`] carries the W3C
//! trace context and [`CAUSATION_ID`] the id of the event a participant handled when it
//! emitted this one. Dead letters sent to a topic carry the `dead-letter-*` headers below.
//!
//! The saga crate's command correlation headers (`saga-id`, `saga-step`, …) are its own
//! protocol between its coordinator and its participants: they live in
//! `eventful_saga::headers`.
//!
//! ```
//! use eventful_core::headers;
//!
//! let wire = [("event-id", "0190e5a0-0000-7000-8000-000000000000"), ("traceparent", "00-…")];
//! let id = wire.iter().find(|(name, _)| *name == headers::EVENT_ID).map(|(_, v)| *v);
//! assert!(id.is_some());
//! assert!(headers::is_reserved(headers::CONTENT_TYPE));
//! assert!(!headers::is_reserved(headers::TRACEPARENT));
//! ```

/// The event id, a hyphenated UUID (a UUIDv7 from the outbox): the deduplication key of
/// every consumer.
pub const EVENT_ID: &str = "event-id";
/// The event type, the key under which a consumer registers its handler.
pub const EVENT_TYPE: &str = "event-type";
/// The payload's media type: [`CONTENT_TYPE_JSON`] or [`CONTENT_TYPE_BYTES`].
pub const CONTENT_TYPE: &str = "content-type";
/// The W3C trace context of the operation that recorded the event.
pub const TRACEPARENT: &str = "traceparent";
/// On an event emitted while handling another: the handled event's id.
pub const CAUSATION_ID: &str = "causation-id";

/// The envelope headers, written by the publisher from the event itself.
pub const RESERVED: [&str; 3] = [EVENT_ID, EVENT_TYPE, CONTENT_TYPE];

/// `true` for the envelope header names ([`RESERVED`]): a user header so named is not
/// published, so it cannot forge the envelope.
pub fn is_reserved(name: &str) -> bool {
    RESERVED.contains(&name)
}

/// [`CONTENT_TYPE`] of a JSON payload.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// [`CONTENT_TYPE`] of a raw byte payload.
pub const CONTENT_TYPE_BYTES: &str = "application/octet-stream";

/// On a dead letter sent to a topic: why the message could not be processed.
pub const DEAD_LETTER_ERROR: &str = "dead-letter-error";
/// On a dead letter sent to a topic: the name of the consumer that gave up.
pub const DEAD_LETTER_CONSUMER: &str = "dead-letter-consumer";
/// On a dead letter sent to a topic: the topic the message was read from.
pub const DEAD_LETTER_TOPIC: &str = "dead-letter-topic";
/// On a dead letter sent to a topic: the partition the message was read from.
pub const DEAD_LETTER_PARTITION: &str = "dead-letter-partition";
/// On a dead letter sent to a topic: the offset of the message in its partition.
pub const DEAD_LETTER_OFFSET: &str = "dead-letter-offset";

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are the wire contract: changing one breaks every deployed consumer.
    #[test]
    fn wire_names_are_stable() {
        assert_eq!(
            [
                EVENT_ID,
                EVENT_TYPE,
                CONTENT_TYPE,
                TRACEPARENT,
                CAUSATION_ID
            ],
            [
                "event-id",
                "event-type",
                "content-type",
                "traceparent",
                "causation-id"
            ]
        );
        assert_eq!(
            [CONTENT_TYPE_JSON, CONTENT_TYPE_BYTES],
            ["application/json", "application/octet-stream"]
        );
        assert_eq!(
            [
                DEAD_LETTER_ERROR,
                DEAD_LETTER_CONSUMER,
                DEAD_LETTER_TOPIC,
                DEAD_LETTER_PARTITION,
                DEAD_LETTER_OFFSET
            ],
            [
                "dead-letter-error",
                "dead-letter-consumer",
                "dead-letter-topic",
                "dead-letter-partition",
                "dead-letter-offset"
            ]
        );
    }

    #[test]
    fn only_the_envelope_is_reserved() {
        for name in RESERVED {
            assert!(is_reserved(name), "{name}");
        }
        for name in [TRACEPARENT, CAUSATION_ID, "Event-Id", "x-event-id", ""] {
            assert!(!is_reserved(name), "{name}");
        }
    }
}
