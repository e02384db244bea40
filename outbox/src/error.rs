//! The crate's error type.

/// Everything that can go wrong in the outbox, the relay and the publishers.
///
/// Use [`Error::is_retryable`] to tell transient failures (worth trying again) from permanent
/// ones (retrying cannot help). The relay parks an event at once on a permanent publish error
/// and retries it with backoff on a retryable one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PostgreSQL query failed. Retryable or not by
    /// [`eventful_core::sqlstate::is_retryable`]: connection, pool and I/O failures and an
    /// allow-list of SQLSTATEs (serialization failure, deadlock, exhausted resources,
    /// shutdowns, lock and statement timeouts) are retryable; constraint violations, bad
    /// statements and program limits are not.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be migrated (see [`eventful_core::migrate`]).
    #[error("migration failed: {0}")]
    Migration(#[from] eventful_core::migrate::MigrateError),
    /// The payload could not be serialized to JSON. Permanent.
    #[error("cannot serialize the event payload to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The outbox or relay configuration is invalid (for example a schema name that is not a
    /// plain SQL identifier). Permanent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An event's key is longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes; nothing was
    /// recorded. Permanent: shorten the key (for example hash a long natural key).
    #[error("event key is {len} bytes long; the maximum is {max} bytes")]
    KeyTooLong {
        /// Length of the rejected key in bytes (UTF-8).
        len: usize,
        /// The maximum, [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
        max: usize,
    },
    /// The publisher could not deliver an event but a later attempt may succeed (broker
    /// unreachable, timeout, leader change, queue full).
    #[error("publishing failed (retryable): {0}")]
    PublishRetryable(String),
    /// The publisher rejected an event for good (message too large, invalid topic, not
    /// authorized). The relay parks such an event without further attempts.
    #[error("publishing failed (permanent): {0}")]
    PublishPermanent(String),
}

impl Error {
    /// `true` when trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => eventful_core::sqlstate::is_retryable(e),
            Error::Migration(e) => e.is_retryable(),
            Error::PublishRetryable(_) => true,
            Error::Serialize(_)
            | Error::Config(_)
            | Error::KeyTooLong { .. }
            | Error::PublishPermanent(_) => false,
        }
    }
}
