#![doc = include_str!("../README.md")]
//!
//! ## Wire contract (what the consumer parses)
//! One Kafka message per event, as written by `eventful-outbox`: key = the event's ordering
//! key; payload = the event bytes; headers `event-id` (UUID), `event-type`, `content-type`
//! (`application/json` or `application/octet-stream`) plus any user headers.
//!
//! ## The `ProcessedStore` seam
//! The runtime, the saga coordinator and the HTTP layer call PostgreSQL directly, on
//! purpose: the guard's record must share the handler's `sqlx` transaction. The
//! [`store::ProcessedStore`] trait, its [`store::InMemoryStore`] twin and the contract suite
//! serve embedded use without PostgreSQL and tests, and prove the guard's SQL
//! ([`store::PostgresStore`] runs the same statements); see [`store`].
//!
//! ## Failure modes
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
//! The schema is created and upgraded by [`migrate`]: the `.sql` files of `migrations/`,
//! applied by the versioned [`MIGRATOR`] (`eventful_core::migrate`: each version once, under
//! an advisory lock, recorded as component `eventful-idempotency`).
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod error;
mod event;
mod guard;
mod handler;
mod migrate;
mod retention;
pub mod store;

pub use error::Error;
pub use event::{DecodeError, EnvelopeError, EventMeta};
/// The Kafka header names and content types of a consumed event (from `eventful-core`).
pub use eventful_core::headers;
/// The retry backoff every builder's `backoff` setter takes (from `eventful-core`).
pub use eventful_core::Backoff;
pub use guard::{Processed, ProcessedEvents};
pub use handler::{BatchFailure, BoxError, EventHandler, HandlerError};
pub use migrate::{migrate, MIGRATOR};
pub use retention::Retention;

/// Re-exported so handler implementations need no extra dependency.
pub use async_trait::async_trait;
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
