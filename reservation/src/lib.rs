#![doc = include_str!("../README.md")]
//!
//! ## Key layout and Redis Cluster
//!
//! ```text
//! <prefix>{<namespace>}:stock:<sku>  hash  available, held, sold
//! <prefix>{<namespace>}:res:<id>     string  <state>:<expires_at>:<items JSON>
//! <prefix>{<namespace>}:expiries     zset  id (or a group of ids held together) by deadline (unix ms)
//! <prefix>{<namespace>}:holds        string  number of holds not yet final
//! ```
//!
//! Every key carries the hash tag `{<namespace>}`, so all keys of a namespace are in one
//! cluster slot, and every script declares in `KEYS` each key it touches. Confirm,
//! release and the reaper therefore take two steps: read the reservation's items, then
//! settle it with their stock keys declared (the script re-checks that the record still
//! has those items, and the client reads again if not). Redis Cluster checks declared
//! keys *before* a script runs: during a slot migration a call is refused whole
//! (`TRYAGAIN`, retried) instead of failing halfway after some writes, and proxies that
//! route by `KEYS` see every key. The trade-off: one namespace (warehouse, tenant,
//! region) lives on one shard and is bounded by one Redis core, and a multi-SKU
//! reservation is all-or-nothing only **within** a namespace. Spread load by using many namespaces
//! (one [`RedisReservations`] each); a reservation across namespaces needs a saga.
//! [`RedisReservations::builder`] talks to one node and does not follow `MOVED`/`ASK`
//! redirects (point it at the node that owns the namespace's slot);
//! [`RedisReservations::builder_cluster`] connects to a Redis Cluster and routes every
//! call to the namespace's node, following redirects.
//!
//! # Coalescing
//!
//! Concurrent reserve / confirm / release / expire calls of one store (namespace) are
//! coalesced ([`coalesce`](RedisReservationsBuilder::coalesce), on by default): while a
//! batch is in flight the next calls queue, and go to Redis together as one script
//! invocation that applies each call in order with its own semantics and its own result.
//! The batch sends each distinct (operation, ttl, items) once and each call as its record
//! key (runs of calls of one shape as a count); it
//! reads every record it needs with one `MGET` and writes them with one `MSET` (records
//! are strings for that reason), each stock hash once, and indexes the holds it makes with
//! one deadline as one member of the expiry index. A lone call is sent at once, as the
//! single-call script; batches are bounded by
//! [`max_batch`](RedisReservationsBuilder::max_batch) calls and 4,096 keys, which bounds
//! the script's run time, and [`batches_in_flight`](RedisReservationsBuilder::batches_in_flight)
//! of them overlap. A batch that fails as a whole (connection loss, `BUSY`) gives each of
//! its callers a retryable error, retried by each caller with the same id.
//!
//! ## Failure modes
//!
//! - **Connection loss, Redis restart.** The connection reconnects by itself
//!   (`ConnectionManager`); failed calls are retried (same id) with backoff up to
//!   [`DEFAULT_MAX_ATTEMPTS`](redis::DEFAULT_MAX_ATTEMPTS) attempts, then returned as a
//!   retryable [`Error::Redis`] ([`Error::is_retryable`]). Scripts are called by SHA
//!   and reloaded on `NOSCRIPT` (the cache is empty after a restart).
//! - **`adjust_stock` is the exception**: a delta is not idempotent, so it is never
//!   retried automatically; after a retryable error read the stock (or use the
//!   idempotent `set_stock`).
//! - **A timed-out call may have run.** Retry it with the same reservation id: the
//!   answer is the same reservation, never a second hold.
//! - **Redis loses data.** What a restart keeps depends on the server's persistence:
//!   with `appendonly yes` + `appendfsync always` every acknowledged call survives a
//!   crash (tested: restart mid-run, the invariants hold); with `appendfsync everysec`
//!   (Redis' default) up to ~1 s of acknowledged calls can vanish; with no persistence
//!   everything is gone. Asynchronous replication means a **failover can lose
//!   acknowledged writes** too (use `WAIT`/`min-replicas-to-write` to narrow it). Each
//!   script is one atomic entry in the AOF, so what survives is always a consistent
//!   state — `available + held + sold` still balances — but it may be **older** than
//!   what clients were told: a confirmed sale may be back to a hold (then expire), or a
//!   hold may be gone. Treat Redis as the fast gate and keep the system of record (the
//!   order, in PostgreSQL) authoritative; reconcile stock from it after a data loss.
//! - **Nobody runs a reaper.** Stock of an expired hold still returns when the
//!   reservation is next touched (reserve-retry, confirm, release), but otherwise only
//!   a [`Reaper`] (or a call to `reap_expired`) returns it: run one per process.
//! - **Clock.** Deadlines are evaluated on Redis' clock; a server clock jump moves them.
//! - **A stock key deleted by hand** while holds exist is recreated by their settlement
//!   with only the returned quantities.
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod error;
mod memory;
mod model;
mod reaper;
mod store;

#[cfg(feature = "test-utils")]
pub mod contract;
#[cfg(feature = "redis")]
pub mod redis;

pub use error::Error;
/// The retry backoff every builder's `backoff` setter takes (from `eventful-core`).
pub use eventful_core::Backoff;
pub use memory::InMemoryReservations;
pub use model::{
    Reservation, ReservationState, StockLevel, DEFAULT_RETENTION, MAX_QUANTITY, MAX_STOCK, MAX_TTL,
};
pub use reaper::{Reaper, DEFAULT_REAP_BATCH, DEFAULT_REAP_INTERVAL};
pub use store::ReservationStore;
/// Re-exported: [`Reaper::spawn`] takes one.
pub use tokio_util::sync::CancellationToken;

#[cfg(feature = "redis")]
pub use crate::redis::{RedisReservations, RedisReservationsBuilder};
