//! The guard's storage seam, for code that owns its transactions through the store: one
//! trait, a PostgreSQL backend and an in-memory twin.
//!
//! **Where it is used, and where it is not.** The consumer runtime
//! (`InboxConsumer`), the saga coordinator and your own handlers
//! use [`ProcessedEvents`](crate::ProcessedEvents) directly on a `sqlx` transaction, and the
//! HTTP layer keeps its own table of idempotency keys. That is deliberate: the guarantee is
//! that the guard's row and the handler's writes commit in **one** PostgreSQL transaction,
//! and a handler writes through `&mut PgConnection`; a trait with its own transaction type
//! cannot share that transaction without being PostgreSQL-only again, so routing the
//! runtime through it would add a layer and prove nothing.
//!
//! What the seam is for:
//! - **Embedded use without PostgreSQL**: a process whose state lives in memory (a cache
//!   filler, a projection rebuilt at start) deduplicates deliveries with [`InMemoryStore`],
//!   which has PostgreSQL's visibility and blocking rules (a racing record waits for the
//!   holder's transaction, then answers `Duplicate` or `First`).
//! - **Tests of code written against [`ProcessedStore`]**, with no database.
//! - **Proving the guard's SQL.** [`PostgresStore`] runs the very statements
//!   `ProcessedEvents` runs (the same functions), so the contract suite
//!   ([`crate::contract`], feature `test-utils`) that both backends pass checks the SQL the
//!   runtime relies on, racing deliveries included.
//!
//! ```
//! use eventful_idempotency::store::{InMemoryStore, ProcessedStore};
//! use eventful_idempotency::Processed;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), eventful_idempotency::Error> {
//! let store = InMemoryStore::new();
//! let event_id = uuid::Uuid::now_v7();
//! for delivery in 1..=2 {
//!     let mut tx = store.begin().await?;
//!     let seen = store.check_and_record(&mut tx, "projection", event_id).await?;
//!     assert_eq!(seen, if delivery == 1 { Processed::First } else { Processed::Duplicate });
//!     store.commit(tx).await?;
//! }
//! # Ok(()) }
//! ```

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
