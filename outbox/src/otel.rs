//! The W3C `traceparent` of the current span, for [`OutboxBuilder::traceparent_source`]
//! (feature `opentelemetry`; from `eventful_core::otel`).
//!
//! ```
//! let outbox = eventful_outbox::Outbox::builder()
//!     .traceparent_source(eventful_outbox::otel::current_traceparent)
//!     .build()?;
//! # Ok::<(), eventful_outbox::Error>(())
//! ```
//!
//! [`OutboxBuilder::traceparent_source`]: crate::OutboxBuilder::traceparent_source

pub use eventful_core::otel::{current_traceparent, traceparent_of};
