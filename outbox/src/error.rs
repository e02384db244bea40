//! The crate's error type.

/// Everything that can go wrong in the outbox, the relay and the publishers.
///
/// Use [`Error::is_retryable`] to tell transient failures (worth trying again) from permanent
/// ones (retrying cannot help). The relay parks an event at once on a permanent publish error
/// and retries it with backoff on a retryable one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PostgreSQL query failed. Retryable unless it is a constraint violation or a bad
    /// statement.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The payload could not be serialized to JSON. Permanent.
    #[error("cannot serialize the event payload to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The outbox or relay configuration is invalid (for example a schema name that is not a
    /// plain SQL identifier). Permanent.
    #[error("invalid configuration: {0}")]
    Config(String),
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
            Error::Database(e) => match e {
                sqlx::Error::Database(db) => {
                    // Serialization failures, deadlocks, lock timeouts, and connection-class
                    // errors are transient; constraint violations and syntax errors are not.
                    let code = db.code();
                    let code = code.as_deref().unwrap_or("");
                    code.starts_with("40")
                        || code.starts_with("08")
                        || code.starts_with("55")
                        || code.starts_with("57")
                }
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                _ => false,
            },
            Error::PublishRetryable(_) => true,
            Error::Serialize(_) | Error::Config(_) | Error::PublishPermanent(_) => false,
        }
    }
}
