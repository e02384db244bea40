//! HTTP `Idempotency-Key` support for axum (feature `axum`).
//!
//! [`IdempotencyLayer`] makes a retried request with the same `Idempotency-Key` return the
//! first response instead of running the handler again, the way payment APIs do:
//!
//! The contract, modelled on Stripe's: **the handler runs at most once per key** (scope and
//! TTL). A key is only ever forgotten when the response says nothing was done.
//!
//! | situation | answer |
//! |---|---|
//! | first request with a key | the key is claimed `in_flight` with the request's fingerprint; the handler runs; its status, `content-type` and body are stored (any status, `4xx` and `5xx` included: the handler may have committed before failing) |
//! | retry, same key, same request (method, path+query, body) | the stored response, with `idempotency-replayed: true`; the handler does not run |
//! | same key, different request | `422` `{"error":"idempotency_key_mismatch",..}` |
//! | same key while the first request still runs | `409` `{"error":"idempotency_key_in_use",..}` with `Retry-After: 1` |
//! | same key after the first request was interrupted: its future dropped (a timeout layer answering `504`, the client went away), its handler panicked, or it has been in flight longer than [`IdempotencyLayer::in_flight_timeout`] (crashed process) | `409` `{"error":"idempotency_key_abandoned",..}`: the outcome is unknown and the handler will not run again for this key; check the resource, then use a new key. With [`IdempotencyLayer::rerun_abandoned`] the retry runs the handler instead. A request that was only slow (past the timeout) and then finishes still stores its response, which later retries get |
//! | the response body exceeded [`IdempotencyLayer::max_body_bytes`] (or failed while streaming) | the client gets it as is; the key records the status only; a retry gets `409` `{"error":"idempotency_response_not_stored","status":..}` |
//! | the handler's response is `429`, or carries [`ReleaseKey`] (nothing was done) | returned, not stored; the key is released so a retry runs the handler |
//! | key older than the TTL | treated as new (the key may be reused) |
//!
//! Answers of the layer itself (`400` missing/invalid key, `413` request too large, `409`,
//! `422`, `503` store unavailable) come before the handler runs and store nothing.
//!
//! Keys are scoped by route (axum's `MatchedPath` when the layer is added with
//! `Router::route_layer`, else the request path) plus method, and by caller (see
//! [`IdempotencyLayer::caller_header`] / [`IdempotencyLayer::caller_fn`]); two callers
//! can use the same key independently. Only status, `content-type` and body are stored
//! (other headers are not). Requests without the header pass through untouched (unless
//! [`IdempotencyLayer::require_key`]).
//!
//! Put timeout layers *outside* this one: a timeout inside it turns into a stored `504`;
//! outside, it drops the request and the key is reported abandoned. Keep
//! [`IdempotencyLayer::in_flight_timeout`] above that timeout.

mod layer;
mod store;

pub use layer::{
    IdempotencyLayer, IdempotencyService, ReleaseKey, IDEMPOTENCY_KEY, REPLAYED_HEADER,
};
