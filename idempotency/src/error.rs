//! The crate's error type.

/// Everything that can go wrong in `eventful-idempotency`.
///
/// [`Error::is_retryable`] separates failures worth retrying (a lost connection, a
/// serialization conflict, a broker hiccup) from permanent ones (bad configuration, a value
/// that cannot be serialized).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PostgreSQL error (connection, query, constraint).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedded schema could not be applied.
    #[error("migration failed: {0}")]
    Migration(#[source] sqlx::Error),
    /// A stored result or payload could not be (de)serialized.
    #[error("serialization error: {0}")]
    Serialization(#[from] serde_json::Error),
    /// A Kafka client error.
    #[cfg(feature = "kafka")]
    #[error("kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A consumer's partition worker panicked outside the handler (a bug in the runtime or
    /// the delivery hook): the consumer left its group and stopped.
    #[cfg(feature = "kafka")]
    #[error("partition worker panicked: {0}")]
    WorkerPanicked(String),
    /// The configuration is invalid (empty consumer name, no topic, no handler, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// `true` when retrying the same operation later may succeed.
    ///
    /// Database errors are retryable unless PostgreSQL reported a data or integrity problem
    /// (SQLSTATE classes `22` and `23`, except serialization failures and deadlocks which are
    /// retryable); Kafka errors are retryable; configuration and serialization errors are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) | Error::Migration(e) => sqlx_is_retryable(e),
            #[cfg(feature = "kafka")]
            Error::Kafka(_) => true,
            #[cfg(feature = "kafka")]
            Error::WorkerPanicked(_) => false,
            Error::Serialization(_) | Error::Config(_) => false,
        }
    }
}

/// Classifies a sqlx error: `false` for data and integrity errors (SQLSTATE classes 22, 23,
/// 42) and decode errors, which fail the same way again; `true` otherwise (connection loss,
/// serialization failures, deadlocks). Shared by the crates built on this one.
pub fn sqlx_is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            // 40001 serialization_failure, 40P01 deadlock_detected, 55P03 lock_not_available,
            // 57P01 admin_shutdown, 08xxx connection exceptions: retryable.
            !(code.starts_with("22") || code.starts_with("23") || code.starts_with("42"))
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::Configuration(_)
        | sqlx::Error::RowNotFound => false,
        _ => true,
    }
}
