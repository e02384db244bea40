#![doc = include_str!("../README.md")]
//!
//! ## Design
//!
//! **Sequence order is not commit order** — a `BIGSERIAL` taken by a transaction that
//! commits later may appear after a relay has looked past it. So:
//!
//! - `record` first takes a transaction-scoped advisory lock on the event key
//!   (`pg_advisory_xact_lock(hash(table, key))`), then inserts. Two transactions recording
//!   the same key serialize until the first commits, so **for one key, `seq` order is
//!   commit order**. Different keys do not wait for each other (up to hash collisions of a
//!   64-bit hash). `record_all` locks all its keys up front in a fixed order (no deadlock
//!   between two `record_all` calls). The cost: a transaction that records key K holds K's
//!   lock until it ends, so keep such transactions short.
//! - The relay never keeps a "last seen seq" cursor. It selects pending rows by their state
//!   (`published_at IS NULL`), oldest first, so a late-committing row is simply picked up by
//!   a later batch — and by the lock above it cannot be *older* than a published row of its
//!   own key.
//!
//! **Several relays.** Every row stores a key-hash partition (64 partitions, FNV-1a of the
//! key). Relays lease partitions in `<table>_leases` (owner, epoch, expiry) and heartbeat in
//! `<table>_relays`. Each relay renews its leases every `ttl/4` and rebalances towards
//! `ceil(64 / live relays)` partitions, claiming free or expired leases
//! (`FOR UPDATE SKIP LOCKED`) and releasing surplus ones only *between* rounds, when no
//! publish is in flight (a published batch may still await its mark, which needs no
//! lease: it records only what the broker acknowledged). A batch
//! selects rows only from partitions whose lease this relay holds with at least `ttl/4`
//! left — checked in the same `SELECT`. So all events of one key are published by one relay
//! at a time, and `SKIP LOCKED` races between relays cannot reorder a key. A crashed relay
//! stops heartbeating; its leases expire after `ttl` and the survivors' next rebalance
//! (within `ttl/4`) claims them.
//!
//! Should a relay stall for longer than its lease in the middle of a batch (a frozen VM), a
//! survivor may take over and send the same events while the stalled sends complete: both
//! send contiguous runs of a key's pending events in seq order starting at the oldest
//! unmarked one, so the topic gets duplicates but the first occurrences stay in order.
//! Marking is not fenced because it cannot be wrong: only acknowledged events are marked.
//!
//! **Slots.** The table is `PARTITION BY LIST (slot)` with two partitions (schema version
//! 3). Rows are inserted into the current slot; once `rotate_after` events were recorded
//! since the last rotation, a relay rotates ([`rotation`]): it locks the other slot (every
//! writer and reader of it has finished), copies its unpublished rows into the current slot
//! with every column kept, `TRUNCATE`s it and makes it current. The relay's statements go
//! through the parent table by seq, so a row carried over while its batch is in flight is
//! still marked. Without this, each published event leaves a dead row version (the mark)
//! and an index entry that the relay's scan of pending rows steps over until VACUUM removes
//! it — which it cannot while any session holds the xmin horizon: `cargo bench --bench
//! outbox_xmin` measured the table growing to 624,000 dead tuples and 179 MiB and the drain rate
//! falling by 38% in 5 minutes under an open snapshot before slots existed (the README has the
//! table, before and after).
//!
//! **Head-of-key.** A batch contains, per key, a prefix of its pending events in seq order,
//! excluding every key whose oldest pending event is waiting for a retry or is parked. After
//! the publisher returns, rows are marked published only up to the first failure of their
//! key; the failed row gets `attempts + 1`, `last_error` and `next_attempt_at` (backoff), or
//! is parked after `max_attempts` (or at once on a permanent error). Later rows of that key
//! stay pending and are sent after it. A parked event blocks only its own key; other keys
//! flow. [`Outbox::parked`] lists parked events, [`Outbox::redrive`] re-queues them.
//!
//! **Overlap under a backlog.** When a fetch returns a full batch, the relay fetches and
//! publishes the next batch while it marks this one. That fetch leaves out the rows being
//! marked and the keys whose publish just failed (their retry is still being recorded). If
//! the mark leaves rows of some keys pending (it failed, or rows could not be marked), the
//! batch published meanwhile is marked without its rows of those keys, and the relay fetches
//! again only once nothing is in flight: those keys go out again from their oldest pending
//! event, so the last message of each key on the topic is still its latest event. Below a
//! full batch the rounds stay serial: at a steady rate the extra fetches cost more latency
//! than the overlap saves.
//!
//! **Batches.** The Kafka publisher sends a batch in waves: each wave sends the oldest unsent
//! event of every key at once and awaits the delivery reports; a key's next event goes out
//! in the next wave, and only if this one was delivered. So a failed event is never
//! overtaken by a later event of its key (without this, the later one could travel in
//! another produce request and be appended although the earlier one was rejected), and a
//! batch costs one round trip per event of its busiest key; many keys travel together. A
//! broker rejects a whole produce request when one of its events is too large, so an event
//! rejected for good in a wave of several is sent once more alone before it is reported
//! failed: other keys are not parked with it. After a batch with failed deliveries the
//! producer is replaced by a fresh one (new producer id), because a broker that lost the
//! producer's sequence state during an outage may otherwise reject every later message.
//!
//! **Metrics.** [`Relay::metrics`] returns a [`RelayMetricsHandle`] whose snapshot has the
//! counters `published`, `retried`, `parked`, `batches`, the partitions held, and the gauges
//! `pending`, `parked_pending` and `oldest_pending_age` (refreshed every heartbeat);
//! [`Outbox::stats`] answers the gauges on demand.
//!
//! **Wake-ups.** `record` issues `pg_notify` (delivered at commit), at most once per
//! `notify_at_most_every` (default 100 ms) per `Outbox` value; relays `LISTEN` and start a batch
//! within milliseconds. A relay that was notified or published a batch stays busy for
//! `busy_for` (default 1 s), looking at the table every `busy_poll_interval` (10 ms): that is
//! how it finds the events recorded without a `NOTIFY`. Idle, it polls every `poll_interval`
//! (default 1 s) in case a notification was lost. Why not a `NOTIFY` per transaction:
//! PostgreSQL serializes the commits of notifying transactions cluster-wide, holding the lock
//! through the WAL flush (`pgbench`, one-row inserts at 32 clients: 2,332 commits/s with a
//! `NOTIFY`, 7,298 without; see [`OutboxBuilder::notify_at_most_every`]).
//!
//! **Tracing.** Relays run in an `outbox.relay` span with one `outbox.relay.batch` span per
//! batch. The W3C `traceparent` header is either set per event ([`NewEvent::traceparent`])
//! or supplied by a function given to [`OutboxBuilder::traceparent_source`]; `record` adds
//! it to events that have none. With the `opentelemetry` feature that function is
//! `otel::current_traceparent` (see Tracing above).
//!
//! ## Failure modes
//!
//! | What fails | What happens |
//! |---|---|
//! | Caller's transaction rolls back | Its events vanish with it. |
//! | Relay crashes before marking | Rows stay pending; re-published by the next owner (duplicates). |
//! | A mark fails while the next batch was published (backlog) | Neither batch's rows of the failed keys are marked; both go out again, in order, after the error backoff. |
//! | Relay crashes holding leases | Partitions idle for at most ~`ttl + ttl/4`, then taken over. |
//! | Broker down / slow | Deliveries time out (`message.timeout.ms`), events back off per key (100 ms … 30 s, jitter), the producer is replaced, the table grows, everything drains in order later. |
//! | One event always fails | Parked after `max_attempts` (default 20); only its key waits; re-drive with [`Outbox::redrive`]. |
//! | PostgreSQL down | Batches fail and are retried every second; leases may expire and move. |
//! | LISTEN fails at start or its connection is lost | Polling every `poll_interval`; the relay tries a fresh `LISTEN` every second and looks at the table once it is back. |
//! | Marking a row fails for good (e.g. an over-long key from an older writer) | Marks are per statement, then row by row: only that row stays pending; the rest of the batch is marked. |
//! | Table growth | [`Retention`] deletes published rows older than `max_age` in bounded batches. |
//!
//! Known limits:
//! - a transaction recording key K blocks other transactions recording K until it ends;
//! - the number of partitions (64) is fixed by the schema;
//! - keys are at most [`MAX_KEY_LEN`] bytes;
//! - a batch with many events of one key takes one round trip per event of that key (at
//!   most one event per key is in flight).
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "test-utils")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-utils")))]
pub mod contract;
mod error;
mod event;
mod metrics;
mod migrate;
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub mod otel;
mod outbox;
pub mod publisher;
mod relay;
mod retention;
pub mod rotation;
mod sql;

pub use self::metrics::{RelayMetrics, RelayMetricsHandle};
pub use error::Error;
pub use event::{NewEvent, OutboxRecord};
/// The Kafka header names and content types of a published event (from `eventful-core`).
pub use eventful_core::headers;
/// The retry backoff every builder's `backoff` setter takes (from `eventful-core`).
pub use eventful_core::Backoff;
pub use outbox::{
    EventStatus, Outbox, OutboxBuilder, OutboxStats, ParkedEvent, TraceparentSource,
    DEFAULT_NOTIFY_INTERVAL,
};
#[cfg(feature = "kafka")]
pub use publisher::kafka::{KafkaPublisher, KafkaPublisherBuilder};
pub use publisher::memory::{InMemoryPublisher, PublishedMessage};
pub use publisher::Publisher;
pub use relay::{Relay, RelayBuilder};
pub use retention::Retention;
pub use rotation::Rotation;

/// The token that stops a [`Relay`] or [`Retention`] task (re-exported from `tokio-util`).
pub use tokio_util::sync::CancellationToken;

/// The longest event key [`Outbox::record`] accepts, in bytes (UTF-8). Longer keys are
/// refused with [`Error::KeyTooLong`]: a key is a Kafka message key and an ordering key, and
/// the relay indexes the keys of failing events, so it must stay small.
pub const MAX_KEY_LEN: usize = 1024;

/// The number of key-hash partitions relays share (fixed by the schema).
pub const PARTITIONS: i32 = sql::PARTITIONS;
