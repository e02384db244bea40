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
    /// The embedded schema could not be applied (see [`eventful_core::migrate`]).
    #[error("migration failed: {0}")]
    Migration(#[from] eventful_core::migrate::MigrateError),
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
    /// Database errors are classified by [`eventful_core::sqlstate::is_retryable`]
    /// (connection, pool and I/O failures and an allow-list of SQLSTATEs such as
    /// serialization failures and deadlocks are retryable; data, integrity, SQL and other
    /// errors are not); Kafka errors are retryable; configuration and serialization errors
    /// are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => eventful_core::sqlstate::is_retryable(e),
            Error::Migration(e) => e.is_retryable(),
            #[cfg(feature = "kafka")]
            Error::Kafka(_) => true,
            #[cfg(feature = "kafka")]
            Error::WorkerPanicked(_) => false,
            Error::Serialization(_) | Error::Config(_) => false,
        }
    }
}
