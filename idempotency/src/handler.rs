//! The typed event handler a consumer registers per event type.

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::EventMeta;

/// A boxed error carried by [`HandlerError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Handles one event type inside the transaction that also records the event as processed.
///
/// The runtime calls [`EventHandler::handle`] at most once per event **that commits**: it opens
/// a transaction, records the event id with the [`ProcessedEvents`](crate::ProcessedEvents)
/// guard, and calls the handler only for the first delivery; the handler's writes on `tx`
/// commit together with the guard's record. Returning an error rolls both back.
///
/// The inbox runtime may share that transaction with other events of the same partition
/// (a batch, see `InboxConsumerBuilder::max_batch`, feature `kafka`):
/// the handler sees their earlier writes, and if it fails the batch is rolled back and its
/// other events are applied again without it, so their handlers may run more than once
/// (only one run commits).
///
/// ```
/// use eventful_idempotency::{EventHandler, EventMeta, HandlerError};
///
/// #[derive(serde::Deserialize)]
/// struct OrderCreated { order_id: uuid::Uuid, total_cents: i64 }
///
/// struct CountOrders;
///
/// #[async_trait::async_trait]
/// impl EventHandler for CountOrders {
///     type Payload = OrderCreated;
///
///     async fn handle(
///         &self,
///         tx: &mut sqlx::PgConnection,
///         event: &EventMeta,
///         order: OrderCreated,
///     ) -> Result<(), HandlerError> {
///         if order.total_cents < 0 {
///             return Err(HandlerError::permanent(format!("negative total in {}", event.id)));
///         }
///         sqlx::query("INSERT INTO order_totals (order_id, cents) VALUES ($1, $2)")
///             .bind(order.order_id)
///             .bind(order.total_cents)
///             .execute(&mut *tx)
///             .await?; // sqlx errors convert: data/integrity errors are permanent, others transient
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// The payload type, decoded from the message (JSON unless the content type is
    /// `application/octet-stream`, see [`EventMeta::decode`]).
    type Payload: serde::de::DeserializeOwned + Send;

    /// Applies the event's effects using `tx` (an open transaction).
    ///
    /// Return [`HandlerError::Transient`] for failures worth retrying (the partition waits
    /// and retries the same event with backoff) and [`HandlerError::Permanent`] for events
    /// that can never succeed (they go to the dead-letter destination).
    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &EventMeta,
        payload: Self::Payload,
    ) -> Result<(), HandlerError>;

    /// Whether the runtime should hand this handler runs of events through
    /// [`handle_batch`](Self::handle_batch) (default `false`: one [`handle`](Self::handle)
    /// call per event). Return `true` when you override `handle_batch`. A run is traced as
    /// one `inbox.messages` span, so the events' own trace contexts are not its parents.
    fn applies_batches(&self) -> bool {
        false
    }

    /// Applies several first deliveries of this event type that follow each other in one
    /// partition, in offset order, on one open transaction (the inbox runtime's batch, see
    /// `InboxConsumerBuilder::max_batch`); called only when
    /// [`applies_batches`](Self::applies_batches) says so. The default calls
    /// [`handle`](Self::handle) for each in turn; override it to apply them with fewer
    /// statements.
    ///
    /// The contract is `handle`'s, per event. On failure return the position (in `events`)
    /// of the event that failed with its error: the runtime rolls the whole transaction back,
    /// applies the events before it again as a batch, and retries or dead-letters the failing
    /// one alone (through `handle`).
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: Vec<(&EventMeta, Self::Payload)>,
    ) -> Result<(), BatchFailure> {
        for (index, (event, payload)) in events.into_iter().enumerate() {
            self.handle(tx, event, payload)
                .await
                .map_err(|error| BatchFailure { index, error })?;
        }
        Ok(())
    }

    /// Called once when a consumer registering this handler is built, with that consumer's
    /// name (the scope of its processed-event guard): an error refuses the configuration
    /// ([`Error::Config`](crate::Error::Config)) instead of letting the handler misbehave on
    /// every event. The default accepts any name.
    fn check_consumer(&self, consumer_name: &str) -> Result<(), BoxError> {
        let _ = consumer_name;
        Ok(())
    }
}

/// Which event of a [`EventHandler::handle_batch`] call failed, and how.
#[derive(Debug, thiserror::Error)]
#[error("event {index} of the batch failed: {error}")]
#[non_exhaustive]
pub struct BatchFailure {
    /// Position of the failing event in the batch.
    pub index: usize,
    /// Its error: decides between retrying and dead-lettering, as from `handle`.
    #[source]
    pub error: HandlerError,
}

impl BatchFailure {
    /// The event at `index` failed with `error`.
    pub fn new(index: usize, error: HandlerError) -> Self {
        BatchFailure { index, error }
    }
}

/// How a handler failed: decides between retrying and dead-lettering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// Worth retrying (lost connection, timeout, lock conflict, a dependency that is down):
    /// the runtime rolls back and retries the same event with backoff; later events of the
    /// same partition wait.
    #[error("transient: {0}")]
    Transient(#[source] BoxError),
    /// Can never succeed (invalid data, violated invariant): the runtime rolls back, writes
    /// the event to the dead-letter destination and moves on.
    #[error("permanent: {0}")]
    Permanent(#[source] BoxError),
}

impl HandlerError {
    /// A transient failure.
    pub fn transient(error: impl Into<BoxError>) -> HandlerError {
        HandlerError::Transient(error.into())
    }

    /// A permanent failure.
    pub fn permanent(error: impl Into<BoxError>) -> HandlerError {
        HandlerError::Permanent(error.into())
    }

    /// `true` for [`HandlerError::Transient`].
    pub fn is_transient(&self) -> bool {
        matches!(self, HandlerError::Transient(_))
    }
}

impl From<sqlx::Error> for HandlerError {
    /// Transient when [`eventful_core::sqlstate::is_retryable`] says so (connection loss,
    /// serialization failure, deadlock, …), permanent otherwise (constraint violations, bad
    /// data or SQL, decode errors).
    fn from(error: sqlx::Error) -> Self {
        if eventful_core::sqlstate::is_retryable(&error) {
            HandlerError::Transient(Box::new(error))
        } else {
            HandlerError::Permanent(Box::new(error))
        }
    }
}

impl From<crate::Error> for HandlerError {
    /// Classified with [`crate::Error::is_retryable`].
    fn from(error: crate::Error) -> Self {
        if error.is_retryable() {
            HandlerError::Transient(Box::new(error))
        } else {
            HandlerError::Permanent(Box::new(error))
        }
    }
}

impl From<serde_json::Error> for HandlerError {
    /// JSON errors are permanent (the same input fails the same way).
    fn from(error: serde_json::Error) -> Self {
        HandlerError::Permanent(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sqlx_errors() {
        assert!(HandlerError::from(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!HandlerError::from(sqlx::Error::RowNotFound).is_transient());
        let json = serde_json::from_str::<u8>("x").unwrap_err();
        assert!(!HandlerError::from(json).is_transient());
        assert!(HandlerError::from(crate::Error::Database(sqlx::Error::PoolClosed)).is_transient());
        assert!(!HandlerError::from(crate::Error::Config("x".into())).is_transient());
    }
}
