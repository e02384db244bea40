//! The crate's error type.

use eventful_core::sqlstate;
use uuid::Uuid;

/// Everything that can go wrong in `eventful-saga`.
///
/// [`Error::is_retryable`] separates failures worth retrying (lost connection, a concurrent
/// update of the same saga, a serialization failure) from permanent ones (an unknown saga
/// type, data that does not fit the definition, a malformed reply).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PostgreSQL error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedded schema could not be applied (see [`eventful_core::migrate`]).
    #[error("migration failed: {0}")]
    Migration(#[from] eventful_core::migrate::MigrateError),
    /// Recording a command in the outbox failed.
    #[error("outbox: {0}")]
    Outbox(#[from] eventful_outbox::Error),
    /// The idempotency guard failed.
    #[error("idempotency guard: {0}")]
    Idempotency(#[from] eventful_idempotency::Error),
    /// Another transaction advanced the same saga first (the version check failed).
    /// Roll back and handle the reply again: it will then be seen as late or duplicate.
    #[error("saga {saga_id} was updated concurrently (expected version {expected})")]
    Conflict {
        /// The saga.
        saga_id: Uuid,
        /// The version this transaction read.
        expected: i64,
    },
    /// No definition with this name is registered with the coordinator.
    #[error("unknown saga type {0:?}")]
    UnknownSagaType(String),
    /// A saga with this id already exists (see [`Coordinator::start_with_id`](crate::Coordinator::start_with_id)).
    #[error("saga {0} already exists")]
    AlreadyExists(Uuid),
    /// No saga with this id exists.
    #[error("saga {0} not found")]
    NotFound(Uuid),
    /// The saga data does not (de)serialize as the definition's data type.
    #[error("saga data: {0}")]
    Data(#[source] serde_json::Error),
    /// The definition is unusable (no steps, empty name, duplicate registration).
    #[error("invalid saga definition: {0}")]
    InvalidDefinition(String),
    /// A command or reply lacks correlation or does not decode.
    #[error("malformed saga message: {0}")]
    MalformedMessage(String),
    /// A stored value is not what this version of the crate wrote.
    #[error("corrupt saga row: {0}")]
    Corrupt(String),
    /// A reply consumer's name equals the coordinator's guard name: the consumer would
    /// record each reply's event id under that name first, and the guard would then ignore
    /// every reply as a duplicate. Refused when the consumer is built.
    #[error(
        "the reply consumer is named {0:?}, like the coordinator's duplicate guard: every reply \
         would be ignored as a duplicate; give the consumer another name (or the guard, with \
         CoordinatorBuilder::guard_name)"
    )]
    ConsumerIsGuard(String),
}

impl Error {
    /// `true` when retrying the same operation (in a new transaction) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => sqlstate::is_retryable(e),
            Error::Migration(e) => e.is_retryable(),
            Error::Outbox(e) => e.is_retryable(),
            Error::Idempotency(e) => e.is_retryable(),
            Error::Conflict { .. } => true,
            Error::UnknownSagaType(_)
            | Error::AlreadyExists(_)
            | Error::NotFound(_)
            | Error::Data(_)
            | Error::InvalidDefinition(_)
            | Error::MalformedMessage(_)
            | Error::Corrupt(_)
            | Error::ConsumerIsGuard(_) => false,
        }
    }
}
