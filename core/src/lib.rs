//! # eventful-core
//!
//! What every Eventful crate must agree on, defined once (the `sqlx-core` / `apalis-core`
//! pattern): the outbox writes what the consumer runtime reads, and every crate retries the
//! same failures the same way.
//!
//! ```
//! use std::time::Duration;
//! use eventful_core::{headers, sqlstate, Backoff};
//!
//! // The envelope the outbox writes and the consumer runtime reads.
//! assert_eq!(headers::EVENT_ID, "event-id");
//! // A serialization failure is retried, a unique violation is not.
//! assert!(sqlstate::is_retryable_sqlstate("40001"));
//! assert!(!sqlstate::is_retryable_sqlstate("23505"));
//! // Retries back off exponentially, with jitter, up to a cap.
//! assert!(Backoff::default().delay(20) <= Duration::from_secs(30));
//! ```
//!
//! - [`headers`]: the Kafka header names and content-type values of an Eventful message.
//! - [`sqlstate`]: which PostgreSQL errors are retryable (an explicit SQLSTATE allow-list;
//!   with the `sqlx` feature, `sqlstate::is_retryable` classifies a whole `sqlx::Error`).
//! - [`backoff`]: [`Backoff`], the exponential backoff with equal jitter used by the relay,
//!   the consumer runtime, the reservation store and the saga coordinator.
//! - `migrate` (feature `sqlx`): the versioned schema migrator every crate runs its
//!   migrations with, and that applications can run from their own tooling.
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backoff;
pub mod headers;
#[cfg(feature = "sqlx")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx")))]
pub mod migrate;
pub mod sqlstate;

pub use backoff::Backoff;
