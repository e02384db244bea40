//! The guard's storage seam: one trait, a PostgreSQL backend and an in-memory twin.
//!
//! [`ProcessedEvents`](crate::ProcessedEvents) is the PostgreSQL guard applications use
//! inside their own transactions. [`ProcessedStore`] abstracts the same operations over a
//! backend-specific transaction so unit tests can run on [`InMemoryStore`]; both backends pass
//! the same contract suite (`eventful_idempotency::contract`, feature `test-utils`).

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::{Error, Processed};

pub mod memory;
pub mod postgres;

pub use memory::{InMemoryStore, InMemoryTx};
pub use postgres::PostgresStore;

/// Storage of processed-event records with transactional semantics.
///
/// Contract (checked by the shared suite):
/// - `check_and_record` returns `First` once per `(consumer, event id)` among committed
///   transactions; the record becomes visible to others on `commit` and disappears on
///   `rollback` (or drop of the transaction);
/// - a concurrent `check_and_record` of the same id waits until the recording transaction
///   ends, then answers `Duplicate` (committed) or `First` (rolled back);
/// - consumers are independent; results saved in a transaction commit with it;
/// - `purge_older_than` deletes records older than the age, in batches.
#[async_trait]
pub trait ProcessedStore: Send + Sync + 'static {
    /// An open transaction of this backend (rolled back when dropped).
    type Tx: Send + 'static;

    /// Opens a transaction.
    async fn begin(&self) -> Result<Self::Tx, Error>;
    /// Commits a transaction.
    async fn commit(&self, tx: Self::Tx) -> Result<(), Error>;
    /// Rolls a transaction back.
    async fn rollback(&self, tx: Self::Tx) -> Result<(), Error>;
    /// Records `event_id` for `consumer` in `tx`; see [`crate::ProcessedEvents::check_and_record`].
    async fn check_and_record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<Processed, Error>;
    /// Attaches `result` to the record of `event_id` in `tx`.
    async fn save_result(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: Uuid,
        result: serde_json::Value,
    ) -> Result<(), Error>;
    /// The result attached to the record of `event_id`, as seen by `tx`.
    async fn stored_result(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<Option<serde_json::Value>, Error>;
    /// Deletes `consumer`'s records older than `age`, `batch_size` at a time; returns the count.
    async fn purge_older_than(
        &self,
        consumer: &str,
        age: Duration,
        batch_size: usize,
    ) -> Result<u64, Error>;
}
