//! The crate's error type.

/// Everything that can go wrong in the outbox, the relay and the publishers.
///
/// Use [`Error::is_retryable`] to tell transient failures (worth trying again) from permanent
/// ones (retrying cannot help). The relay parks an event at once on a permanent publish error
/// and retries it with backoff on a retryable one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PostgreSQL query failed. Retryable when the connection was lost or refused, on a
    /// serialization failure or deadlock, exhausted resources (SQLSTATE class 53, including
    /// `too_many_connections`), a server shutdown or restart, or a lock / statement timeout;
    /// permanent otherwise (constraint violations, bad statements, program limits).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
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
            Error::Database(e) => match e {
                sqlx::Error::Database(db) => {
                    sqlstate_is_retryable(db.code().as_deref().unwrap_or(""))
                }
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                _ => false,
            },
            Error::PublishRetryable(_) => true,
            Error::Serialize(_)
            | Error::Config(_)
            | Error::KeyTooLong { .. }
            | Error::PublishPermanent(_) => false,
        }
    }
}

/// Whether a PostgreSQL error with SQLSTATE `code` may succeed when tried again: lost or
/// refused connections, serialization failures and deadlocks, exhausted resources (disk,
/// memory, connection slots), shutdowns and restarts, lock and statement timeouts. Everything
/// else (constraint violations, bad data, bad SQL, program limits such as an oversized index
/// row) fails the same way again.
pub(crate) fn sqlstate_is_retryable(code: &str) -> bool {
    code.starts_with("08") // connection_exception
        || code.starts_with("53") // insufficient_resources, incl. 53300 too_many_connections
        || matches!(
            code,
            "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available (lock_timeout)
                | "57014" // query_canceled (statement_timeout)
                | "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now (starting up, recovery)
                | "57P05" // idle_session_timeout
        )
}

#[cfg(test)]
mod tests {
    use super::sqlstate_is_retryable;

    #[test]
    fn sqlstate_classification() {
        let table = [
            // Connection exceptions (class 08).
            ("08000", true),
            ("08003", true),
            ("08006", true),
            ("08001", true),
            ("08004", true),
            // Transaction rollbacks that a retry resolves.
            ("40001", true),
            ("40P01", true),
            // Insufficient resources (class 53), too_many_connections included.
            ("53000", true),
            ("53100", true),
            ("53200", true),
            ("53300", true),
            ("53400", true),
            // Operator intervention: shutdowns and "cannot connect now".
            ("57P01", true),
            ("57P02", true),
            ("57P03", true),
            ("57P05", true),
            // Lock and statement timeouts.
            ("55P03", true),
            ("57014", true),
            // Fail the same way again.
            ("23505", false),
            ("23503", false),
            ("22001", false),
            ("22P02", false),
            ("42P01", false),
            ("42601", false),
            ("54000", false),
            ("57P04", false),
            ("40002", false),
            ("55000", false),
            ("P0001", false),
            ("XX000", false),
            ("", false),
        ];
        let wrong: Vec<_> = table
            .iter()
            .filter(|(code, retryable)| sqlstate_is_retryable(code) != *retryable)
            .collect();
        assert!(
            wrong.is_empty(),
            "misclassified SQLSTATEs (code, expected): {wrong:?}"
        );
    }
}
