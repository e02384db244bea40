//! Work in progress.
#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used)]
