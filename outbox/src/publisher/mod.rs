//! The [`Publisher`] seam between the relay and a broker, with a Kafka backend (feature
//! `kafka`) and an in-memory backend.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;

use async_trait::async_trait;

use crate::{Error, OutboxRecord};

/// Sends a batch of recorded events to a broker.
///
/// Contract (the relay relies on it; the suite in `eventful_outbox::contract`, feature
/// `test-utils`, checks it, and the in-memory and Kafka publishers pass it):
///
/// - returns exactly one result per event, in the order of `events`; `Ok(())` means the
///   broker acknowledged the event durably (for Kafka: the delivery report came back);
/// - events arrive in seq order, and events with the same key must reach the broker in that
///   order (same Kafka partition, sent in slice order);
/// - once an event of a key fails, the later events of that key **in the same batch** must
///   not be sent: report them as [`Error::PublishRetryable`]. (The relay re-sends them after
///   the failed one, so a consumer never sees a later event of a key before an earlier one.)
/// - should send events of different keys together (a batch should cost about one round
///   of latency per event of its busiest key, not one per event). A backend that cannot
///   stop a later send once an earlier one of the key fails at the broker (Kafka: a
///   delivery report arrives after the later event left) must keep one event per key in
///   flight.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `events`; one result per event, in order.
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>>;
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for std::sync::Arc<P> {
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        (**self).publish_batch(events).await
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Box<P> {
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        (**self).publish_batch(events).await
    }
}

/// The error reported for an event skipped because an earlier event of its key failed in
/// the same batch.
pub(crate) fn earlier_event_failed(key: &str) -> Error {
    Error::PublishRetryable(format!(
        "not sent: an earlier event of key {key:?} failed in the same batch"
    ))
}
