//! Event-driven sagas over PostgreSQL and Kafka: persisted **orchestration** with
//! compensation, and the **choreography** building block each service uses.
//!
//! ```no_run
//! use std::time::Duration;
//! use eventful_saga::{Command, Coordinator, SagaDefinition, Step};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { order_id: uuid::Uuid, sku: String, cents: i64 }
//!
//! # async fn run(pool: sqlx::PgPool) -> Result<(), eventful_saga::Error> {
//! let checkout = SagaDefinition::<Order>::new("checkout")
//!     .step(Step::new("reserve", Command::new("inventory", "ReserveStock", |o: &Order| o.sku.clone()))
//!         .compensate_with(Command::new("inventory", "ReleaseStock", |o: &Order| o.sku.clone()))
//!         .timeout(Duration::from_secs(10)))
//!     .step(Step::new("pay", Command::new("payments", "Charge", |o: &Order| o.cents))
//!         .compensate_with(Command::new("payments", "Refund", |o: &Order| o.cents)))
//!     .step(Step::new("ship", Command::new("shipping", "Ship", |o: &Order| o.order_id)));
//! let coordinator = Coordinator::builder(pool.clone(), eventful_outbox::Outbox::new())
//!     .reply_topic("saga-replies")
//!     .saga(checkout)
//!     .build()?;
//! coordinator.migrate().await?;
//! let _scanner = coordinator.spawn_deadline_scanner(tokio_util::sync::CancellationToken::new());
//!
//! let mut tx = pool.begin().await?;
//! let order = Order { order_id: uuid::Uuid::now_v7(), sku: "sku-1".into(), cents: 4200 };
//! let saga_id = coordinator.start(&mut tx, "checkout", &order).await?; // + ReserveStock in the outbox
//! tx.commit().await?;
//! // Replies arrive through the consumer runtime of eventful-idempotency:
//! // .handler(eventful_saga::REPLY_EVENT_TYPE, coordinator.reply_handler())
//! println!("{:?}", coordinator.inspect(saga_id).await?.status);
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Atomic transitions.** Starting a saga, and every transition, writes the instance, a
//!   history row and the next command (through `eventful-outbox`) in the caller's
//!   transaction: a command is published if and only if the transition committed.
//! - **One winner per transition.** Transitions are `UPDATE ... WHERE id = $1 AND version = $2`;
//!   of two replies racing on two connections for one instance exactly one advances it, the
//!   other gets [`Error::Conflict`] (retryable: handled again, it sees the new state).
//! - **Duplicates and late replies change nothing.** A reply whose event id was seen before
//!   (the `eventful-idempotency` guard, in the same transaction), that names a step or kind
//!   not in flight, that arrives after its step's deadline, or that targets a finished saga
//!   is ignored ([`ReplyOutcome::Ignored`]).
//! - **Compensation in reverse.** A failure reply for step *n* compensates the steps
//!   *n−1 … 0* that have a compensation, one at a time, highest first. A step whose deadline
//!   passes compensates steps *n … 0* — the step in flight too, since its missing reply says
//!   nothing about whether it took effect.
//! - **Compensations are retried until acknowledged.** Each is a command that must be
//!   answered by a compensation reply; it is re-sent (a new event) every
//!   `compensation_timeout` until acknowledged, and after a refusal with exponential
//!   back-off. Sagas end [`Completed`](SagaStatus::Completed) or
//!   [`Compensated`](SagaStatus::Compensated); there is no terminal failure state.
//! - **Restarts lose nothing.** All state is in PostgreSQL; a restarted coordinator (or
//!   another one) resumes every in-flight saga: replies still queued are applied, and the
//!   deadline scanner (`FOR UPDATE SKIP LOCKED`, bounded batches) drives the rest.
//! - **Correlation** by saga id: it is the Kafka key of every command and reply (one
//!   partition per saga, so a compensation never overtakes its action on the same topic)
//!   and travels in the [`headers`] with the step, kind and reply topic.
//! - `tracing` spans `saga.start`, `saga.reply`, `saga.deadline` carry `saga_id`.
//!
//! # Choreography
//!
//! A [`Participant`] handles one event type: it changes the service's state on
//! [`Emitter::conn`] and emits events with [`Emitter::emit`] in the same transaction as the
//! idempotency guard's record; register it on the `eventful-idempotency` consumer runtime
//! with one line: `.handler("OrderPlaced", eventful_saga::participant(outbox, ReserveStock))`.
//! A participant that answers saga commands reads [`Emitter::command`] and sends
//! [`Emitter::reply`].
//!
//! # Failure modes
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
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod choreography;
mod coordinator;
mod definition;
mod error;
mod machine;
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
pub use machine::IgnoreReason;
pub use migrate::{migrate, MIGRATOR};
pub use model::{HistoryEntry, Outcome, SagaInstance, SagaStatus, StepKind, Transition};
pub use reply::{headers, CommandContext, SagaReply, REPLY_EVENT_TYPE};
pub use reply_handler::ReplyHandler;
