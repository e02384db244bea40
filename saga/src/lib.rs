#![doc = include_str!("../README.md")]
//!
//! ## Choreography
//!
//! A [`Participant`] handles one event type: it changes the service's state on
//! [`Emitter::conn`] and emits events with [`Emitter::emit`] in the same transaction as the
//! idempotency guard's record; register it on the `eventful-idempotency` consumer runtime
//! with one line: `.handler("OrderPlaced", eventful_saga::participant(outbox, ReserveStock))`.
//! A participant that answers saga commands reads [`Emitter::command`] and sends
//! [`Emitter::reply`].
//!
//! ## Failure modes
//!
//! - *Coordinator crash mid-transition*: the transaction rolls back; the reply is
//!   redelivered (its offset was not committed) and applied then.
//! - *Lost or slow participant*: the step's deadline passes and compensation begins; a
//!   reply arriving later is ignored.
//! - *Participant refuses a compensation or never answers*: it is re-sent until it does;
//!   watch `attempts` via [`Coordinator::inspect`]. Compensations must be idempotent and
//!   treat "nothing to undo" as success (a timed-out action may never have arrived).
//! - *Reordering across topics*: put a step's action and compensation on the same topic.
//! - *A saga whose data no longer fits its definition*: the scanner logs an error and
//!   postpones it by a minute instead of blocking others; replies for it fail permanently
//!   (dead-lettered by the runtime).
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod choreography;
mod coordinator;
mod definition;
mod error;
mod machine;
mod metrics;
mod migrate;
mod model;
mod reply;
mod reply_handler;
mod store;
mod timeout;

pub use choreography::{participant, Emitter, Participant, ParticipantHandler};
pub use coordinator::{
    Coordinator, CoordinatorBuilder, ReplyOutcome, DEFAULT_GUARD_NAME, DEFAULT_REPLY_TOPIC,
};
pub use definition::{
    Command, SagaDefinition, Step, DEFAULT_COMPENSATION_TIMEOUT, DEFAULT_STEP_TIMEOUT,
};
pub use error::Error;
/// The retry backoff every builder's `backoff` setter takes (from `eventful-core`).
pub use eventful_core::Backoff;
pub use machine::IgnoreReason;
pub use migrate::{migrate, MIGRATOR};
pub use model::{HistoryEntry, Outcome, SagaInstance, SagaStatus, StepKind, Transition};
pub use reply::{headers, CommandContext, SagaReply, REPLY_EVENT_TYPE};
pub use reply_handler::ReplyHandler;
/// Re-exported: [`Coordinator::spawn_deadline_scanner`] takes one.
pub use tokio_util::sync::CancellationToken;
