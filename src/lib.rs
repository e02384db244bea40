//! # Eventful
//!
#![doc = include_str!("lib.md")]
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
