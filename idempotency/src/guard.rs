//! The processed-event guard: dedup record and effects in one PostgreSQL transaction.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::store::postgres as pg;
use crate::Error;

/// Whether this transaction is the first to process an event.
///
/// A closed yes/no answer (deliberately not `#[non_exhaustive]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Processed {
    /// No committed (or concurrently committing) transaction has recorded the event: apply
    /// its effects in this transaction.
    First,
    /// The event was already processed: apply nothing.
    Duplicate,
}

impl Processed {
    /// `true` for [`Processed::First`].
    pub fn is_first(self) -> bool {
        self == Processed::First
    }
}

/// The processed-event guard of one consumer (cheap to clone).
///
/// Records `(consumer, event id)` in `eventful_processed_events` under a primary key, in the
/// caller's transaction:
///
/// - the first delivery inserts the row and gets [`Processed::First`]; the effects written in
///   the same transaction commit (or roll back) together with the row;
/// - a later delivery finds the row and gets [`Processed::Duplicate`];
/// - a delivery racing on another connection blocks on the primary key until the first
///   transaction ends: it gets `Duplicate` if the first committed, `First` if it rolled back.
///   Under `REPEATABLE READ`/`SERIALIZABLE` PostgreSQL may instead abort it with a
///   serialization failure, reported as a retryable [`Error::Database`].
///
/// Different consumer names are independent: each sees every event once.
#[derive(Debug, Clone)]
pub struct ProcessedEvents {
    consumer: Arc<str>,
}

impl ProcessedEvents {
    /// The guard of consumer `consumer` (e.g. `"billing"`); pick a stable name per logical
    /// consumer.
    pub fn new(consumer: impl Into<String>) -> ProcessedEvents {
        ProcessedEvents {
            consumer: Arc::from(consumer.into()),
        }
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Creates the crate's tables if needed (see [`crate::migrate`]).
    pub async fn migrate(&self, pool: &PgPool) -> Result<(), Error> {
        crate::migrate(pool).await
    }

    /// Records `event_id` as processed in the caller's transaction and says whether this is
    /// the first time (`INSERT .. ON CONFLICT DO NOTHING`).
    ///
    /// Call it inside a transaction (`&mut *tx`) before writing the effects; with autocommit
    /// the record would commit on its own and the guarantee is gone.
    #[tracing::instrument(level = "debug", skip(self, conn), fields(consumer = %self.consumer))]
    pub async fn check_and_record(
        &self,
        conn: &mut PgConnection,
        event_id: Uuid,
    ) -> Result<Processed, Error> {
        pg::check_and_record(conn, &self.consumer, event_id).await
    }

    /// Records every id of `event_ids` in one statement, in the caller's transaction, and
    /// returns those this call recorded: the first deliveries (as
    /// [`check_and_record`](Self::check_and_record) answers `First`). `event_ids` must not
    /// repeat. Rows are inserted in id order, so two overlapping batches wait for each other
    /// instead of deadlocking. The consumer runtime's batches use it.
    #[tracing::instrument(level = "debug", skip_all, fields(consumer = %self.consumer, events = event_ids.len()))]
    pub async fn check_and_record_many(
        &self,
        conn: &mut PgConnection,
        event_ids: &[Uuid],
    ) -> Result<Vec<Uuid>, Error> {
        pg::check_and_record_many(conn, &self.consumer, event_ids).await
    }

    /// Stores a small result with the record of `event_id` (in the caller's transaction), so
    /// a duplicate can answer with what the first delivery produced. Call it after
    /// [`check_and_record`](Self::check_and_record) returned `First`.
    pub async fn save_result<T: serde::Serialize + ?Sized>(
        &self,
        conn: &mut PgConnection,
        event_id: Uuid,
        result: &T,
    ) -> Result<(), Error> {
        let value = serde_json::to_value(result)?;
        pg::save_result(conn, &self.consumer, event_id, value).await
    }

    /// The result stored with `event_id` by [`save_result`](Self::save_result), if any.
    pub async fn stored_result<T: serde::de::DeserializeOwned>(
        &self,
        conn: &mut PgConnection,
        event_id: Uuid,
    ) -> Result<Option<T>, Error> {
        match pg::stored_result(conn, &self.consumer, event_id).await? {
            Some(value) => Ok(Some(serde_json::from_value(value)?)),
            None => Ok(None),
        }
    }

    /// Deletes this consumer's records older than `age`, `batch_size` rows per statement
    /// (each batch its own short transaction, so no long lock or xmin horizon), and returns
    /// how many were deleted.
    ///
    /// An event redelivered after its record was deleted is processed again: keep `age`
    /// well above the longest possible redelivery delay (topic retention, consumer lag).
    /// [`Retention`](crate::Retention) runs this periodically.
    pub async fn purge_older_than(
        &self,
        pool: &PgPool,
        age: Duration,
        batch_size: usize,
    ) -> Result<u64, Error> {
        pg::purge_older_than(pool, &self.consumer, age, batch_size).await
    }
}
