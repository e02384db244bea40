//! HTTP `Idempotency-Key` support for axum (feature `axum`).
//!
//! [`IdempotencyLayer`] makes a retried request with the same `Idempotency-Key` return the
//! first response instead of running the handler again, the way payment APIs do:
//!
//! | situation | answer |
//! |---|---|
//! | first request with a key | the handler runs; its status, `content-type` and body are stored |
//! | retry, same key, same request (method, path+query, body) | the stored response, with `idempotency-replayed: true`; the handler does not run |
//! | same key, different request | `422` `{"error":"idempotency_key_mismatch",..}` |
//! | same key while the first request still runs | `409` `{"error":"idempotency_request_in_progress",..}` |
//! | key older than the TTL | treated as new (the key may be reused) |
//!
//! Keys are scoped by route (axum's `MatchedPath` when the layer is added with
//! `Router::route_layer`, else the request path) plus method, and by caller (see
//! [`IdempotencyLayer::caller_header`] / [`IdempotencyLayer::caller_fn`]); two callers
//! can use the same key independently.
//!
//! Stored: every non-`5xx` response, `4xx` included (a retried invalid request gets the same
//! `400` back), with its status, `content-type` and body (other headers are not stored).
//!
//! Failures: a `5xx` response is **not** stored and the key is released, so the client can
//! retry a failed request with the same key. A request whose future is dropped (client went
//! away) releases its key too. A request whose process died leaves an in-flight key that
//! becomes claimable after [`IdempotencyLayer::in_flight_timeout`]. Requests without the
//! header pass through untouched (unless [`IdempotencyLayer::require_key`]).

mod layer;
mod store;

pub use layer::{IdempotencyLayer, IdempotencyService, IDEMPOTENCY_KEY, REPLAYED_HEADER};
