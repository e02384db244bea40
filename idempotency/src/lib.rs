//! Exactly-once **effects** for at-least-once consumers and retried HTTP requests.
//!
//! Kafka delivers every event at least once, and clients retry requests: this crate makes
//! each one take effect once, by recording it in the same PostgreSQL transaction as its
//! effects.
//!
//! ```no_run
//! use eventful_idempotency::{
//!     async_trait, CancellationToken, ConsumerOptions, EventHandler, EventMeta, HandlerError,
//!     InboxConsumer,
//! };
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPlaced { order_id: uuid::Uuid, total_cents: i64 }
//!
//! struct Invoice;
//!
//! #[async_trait]
//! impl EventHandler for Invoice {
//!     type Payload = OrderPlaced;
//!     async fn handle(&self, tx: &mut sqlx::PgConnection, _event: &EventMeta, order: OrderPlaced)
//!         -> Result<(), HandlerError> {
//!         sqlx::query("INSERT INTO invoices (order_id, cents) VALUES ($1, $2)")
//!             .bind(order.order_id).bind(order.total_cents)
//!             .execute(&mut *tx).await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), eventful_idempotency::Error> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/shop").await?;
//! eventful_idempotency::migrate(&pool).await?;
//! let options = ConsumerOptions::new("127.0.0.1:9092", "billing", "billing");
//! let inbox = InboxConsumer::builder(options, pool)
//!     .topic("orders")
//!     .handler("OrderPlaced", Invoice)
//!     .build()?;
//! let cancel = CancellationToken::new();
//! let task = inbox.spawn(cancel.clone());
//! // ... on shutdown:
//! cancel.cancel();
//! task.await.ok();
//! # Ok(()) }
//! ```
//!
//! Three pieces:
//! - [`ProcessedEvents`], the guard: `check_and_record(&mut tx, event_id)` inside your own
//!   transaction answers [`Processed::First`] or [`Processed::Duplicate`]. Usable without
//!   Kafka (any transport that carries an event id).
//! - [`InboxConsumer`] (feature `kafka`, default): a Kafka consumer runtime around the guard
//!   with typed handlers registered per event type, dead letters and graceful shutdown.
//! - [`IdempotencyLayer`] (feature `axum`): `Idempotency-Key` handling for HTTP APIs.
//!
//! # Wire contract (what the consumer parses)
//! One Kafka message per event, as written by `eventful-outbox`: key = the event's ordering
//! key; payload = the event bytes; headers `event-id` (UUID), `event-type`, `content-type`
//! (`application/json` or `application/octet-stream`) plus any user headers.
//!
//! # Guarantees
//! - **Effects once per event and consumer name**: the guard's row and the handler's writes
//!   commit in one transaction; a redelivery finds the row and applies nothing. Two
//!   deliveries racing on two connections: the second waits on the primary key and sees
//!   `Duplicate` (or `First` if the first rolled back), never both `First`.
//! - **At-least-once consumption**: an offset is stored only after its transaction
//!   committed (or the message was dead-lettered / skipped); librdkafka commits stored
//!   offsets periodically, for revoked partitions on rebalance, and on close.
//! - **Order per partition**: one worker per partition, its messages in offset order (several
//!   of them in one transaction when the partition is behind, see
//!   [`InboxConsumerBuilder::max_batch`]); a transient failure blocks its partition (retried
//!   with exponential backoff and jitter) but not the others.
//! - **HTTP**: for one key, scope and request, the handler runs at most once per TTL: any
//!   response it gave (5xx included) is replayed; a request that did not answer (timeout,
//!   disconnect, panic, crash) is reported as abandoned, not run again. Only `429` and
//!   responses marked [`http::ReleaseKey`] free the key. Concurrent retries get `409`,
//!   different requests `422`.
//!
//! # Failure modes
//! | failure | what happens |
//! |---|---|
//! | crash after COMMIT, before the offset commit | redelivered, guard says `Duplicate`, nothing applied (for every event of the committed batch) |
//! | a handler fails inside a batch | the batch is rolled back; the events before it are applied again as a batch, the failing one is retried or dead-lettered alone, the rest go on |
//! | crash before COMMIT | transaction rolled back; redelivered and applied then |
//! | rebalance while a message is in flight | it finishes; the new owner may redeliver it: `Duplicate` |
//! | handler returns [`HandlerError::Transient`], PostgreSQL down | retried with backoff, partition waits (optionally dead-lettered after [`InboxConsumerBuilder::max_attempts`]) |
//! | missing/invalid `event-id`, payload not decodable, [`HandlerError::Permanent`] | written to the dead-letter destination ([`DeadLetter`]) with the error; the partition moves on |
//! | handler panics (e.g. an out-of-bounds index) | caught per event, transaction rolled back, retried with backoff, dead-lettered with the panic message after [`InboxConsumerBuilder::max_panic_attempts`] (3); the partition moves on |
//! | unknown event type | skipped by default, or dead-lettered ([`UnknownEventType`]) |
//! | guard records purged too early ([`ProcessedEvents::purge_older_than`]) | a later redelivery applies again: keep retention above topic retention |
//! | HTTP request dropped mid-flight (timeout layer, client gone) or handler panicked | key marked abandoned, never released: retries get `409 idempotency_key_abandoned` (outcome unknown), or run again with [`IdempotencyLayer::rerun_abandoned`] |
//! | HTTP process crashed mid-request | key stays in flight: `409 idempotency_key_in_use` until [`IdempotencyLayer::in_flight_timeout`], then abandoned as above |
//! | HTTP response larger than [`IdempotencyLayer::max_body_bytes`] | returned whole; the key keeps the status only: retries get `409 idempotency_response_not_stored` |
//!
//! Dead-lettered events are not recorded by the guard: replaying them (after a fix) works.
//! The schema is created by [`migrate`] (plain `CREATE .. IF NOT EXISTS` files from
//! `migrations/`, applied under an advisory lock).
#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod error;
mod event;
mod guard;
mod handler;
mod migrate;
pub mod store;

pub use error::Error;
pub use event::{DecodeError, EnvelopeError, EventMeta};
/// The Kafka header names and content types of a consumed event (from `eventful-core`).
pub use eventful_core::headers;
pub use guard::{Processed, ProcessedEvents};
pub use handler::{BoxError, EventHandler, HandlerError};
pub use migrate::{apply_idempotent_schema, migrate};

/// Re-exported so handler implementations need no extra dependency.
pub use async_trait::async_trait;
pub use store::{InMemoryStore, PostgresStore, ProcessedStore};
/// Re-exported: the consumer runtime and the retention task take one.
pub use tokio_util::sync::CancellationToken;

#[cfg(feature = "kafka")]
pub mod consumer;
#[cfg(feature = "kafka")]
pub use consumer::{
    ConsumerOptions, DeadLetter, Delivery, InboxConsumer, InboxConsumerBuilder, Outcome,
    UnknownEventType,
};

#[cfg(feature = "test-utils")]
pub mod contract;

#[cfg(feature = "axum")]
pub mod http;
#[cfg(feature = "axum")]
pub use http::IdempotencyLayer;
