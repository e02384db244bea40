//! # Eventful
//!
//! Data-consistency building blocks for services that talk over Kafka, one crate per
//! problem, re-exported here behind cargo features:
//!
//! | feature | crate | solves |
//! |---|---|---|
//! | `outbox` | [`eventful-outbox`](outbox) | dual writes: events committed with the data, relayed to Kafka |
//! | `idempotency` | [`eventful-idempotency`](idempotency) | duplicate delivery: each event takes effect once |
//! | `reservation` | [`eventful-reservation`](reservation) | overselling: atomic Redis-Lua stock holds |
//! | `saga` | [`eventful-saga`](saga) | flows across services: steps with compensations |
//!
//! `kafka` turns on the Kafka backends of every crate that is enabled, `redis` the Redis
//! reservation store, `axum` the HTTP `Idempotency-Key` layer, `full` everything.
//!
//! What the crates agree on is always there, as [`eventful::core`](core) (`eventful-core`):
//! the Kafka header names, which PostgreSQL errors are retryable, and the retry backoff.
//!
//! ```toml
//! eventful = { version = "0.1", features = ["outbox", "kafka"] }
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use eventful_core as core;

#[cfg(feature = "idempotency")]
#[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
#[doc(inline)]
pub use eventful_idempotency as idempotency;
#[cfg(feature = "outbox")]
#[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
#[doc(inline)]
pub use eventful_outbox as outbox;
#[cfg(feature = "reservation")]
#[cfg_attr(docsrs, doc(cfg(feature = "reservation")))]
#[doc(inline)]
pub use eventful_reservation as reservation;
#[cfg(feature = "saga")]
#[cfg_attr(docsrs, doc(cfg(feature = "saga")))]
#[doc(inline)]
pub use eventful_saga as saga;
