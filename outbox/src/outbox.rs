//! [`Outbox`]: names the table, records events in the caller's transaction, migrates the
//! schema, and answers operational queries (stats, parked events, re-drive, retention).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use eventful_core::headers::TRACEPARENT;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::event::NewEvent;
use crate::sql::{fnv1a64, Sql, PARTITIONS};
use crate::{Error, MAX_KEY_LEN};

/// Supplies the W3C `traceparent` of the current context for events that carry none.
pub type TraceparentSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The outbox table of one service: records events and answers operational queries.
///
/// Cheap to clone. [`Outbox::new`] uses `public.eventful_outbox`; [`Outbox::builder`] picks
/// another schema / table so several services can share one database.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    sql: Sql,
    traceparent: Option<TraceparentSource>,
    notify_every: Duration,
    /// When this process last sent a `NOTIFY` (µs since `epoch`; 0: never).
    last_notify: AtomicU64,
    epoch: Instant,
}

/// A writer's claim on the `NOTIFY` of the current interval.
struct NotifyClaim {
    previous: u64,
    claimed: u64,
}

impl NotifyClaim {
    /// Undoes the claim, unless a later writer claimed since.
    fn give_back(self, last_notify: &AtomicU64) {
        let _ = last_notify.compare_exchange(
            self.claimed,
            self.previous,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Default of [`OutboxBuilder::notify_at_most_every`].
pub const DEFAULT_NOTIFY_INTERVAL: Duration = Duration::from_millis(100);

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("schema", &self.inner.sql.schema)
            .field("table", &self.inner.sql.table)
            .field("traceparent_source", &self.inner.traceparent.is_some())
            .finish()
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

/// Builder for [`Outbox`]. Defaults: schema `public`, table `eventful_outbox`, no
/// `traceparent` source, a `NOTIFY` at most every 100 ms.
#[derive(Clone, Default)]
pub struct OutboxBuilder {
    schema: Option<String>,
    table: Option<String>,
    traceparent: Option<TraceparentSource>,
    notify_every: Option<Duration>,
}

impl fmt::Debug for OutboxBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxBuilder")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .finish()
    }
}

impl OutboxBuilder {
    /// The schema (default `public`). Created by [`Outbox::migrate`] when missing. Must be a
    /// plain identifier: lowercase ASCII letters, digits and `_`, not starting with a digit.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The table (default `eventful_outbox`). The lease and relay tables are named
    /// `<table>_leases` and `<table>_relays`. Same identifier rules as [`Self::schema`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// A function returning the current W3C `traceparent` (for example from your
    /// OpenTelemetry context); called by `record` for events without a `traceparent` header.
    pub fn traceparent_source(
        mut self,
        source: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.traceparent = Some(Arc::new(source));
        self
    }

    /// How often this process's writers may wake the relays with a `NOTIFY` (default
    /// [`DEFAULT_NOTIFY_INTERVAL`], 100 ms; `Duration::ZERO`: every transaction that records
    /// an event).
    ///
    /// Why not every transaction: PostgreSQL serializes the commits of all transactions that
    /// sent a `NOTIFY`, across the whole cluster, and holds that lock through the commit's WAL
    /// flush, so they cannot share flushes. Measured with `pgbench`, one-row insert
    /// transactions: 2,718–2,976 commits/s with a `NOTIFY` against 6,280–6,401 without at 8
    /// clients, 2,332 against 7,298 at 32. A writer skips the `NOTIFY` within this interval
    /// of the last one: the relays woken by that one keep looking at the table every
    /// [`RelayBuilder::busy_poll_interval`](crate::RelayBuilder::busy_poll_interval) for
    /// [`RelayBuilder::busy_for`](crate::RelayBuilder::busy_for) (default 1 s; keep it
    /// longer than this interval), and find the event.
    ///
    /// The interval is kept per `Outbox` value (its clones share it; separate values, e.g.
    /// one per database, keep their own). A `NOTIFY` goes out only if its transaction
    /// commits: when the recording statement fails, the next writer sends one instead; but a
    /// transaction that rolls back later, or commits long after recording (waiting on a hot
    /// key's lock), leaves the writers of its interval unannounced, and an idle relay finds
    /// their events at the next `NOTIFY` or its `poll_interval` (1 s by default) — under load
    /// the relays are busy anyway. `Duration::ZERO` restores one `NOTIFY` per transaction.
    pub fn notify_at_most_every(mut self, interval: Duration) -> Self {
        self.notify_every = Some(interval);
        self
    }

    /// Validates the names and builds the [`Outbox`].
    pub fn build(self) -> Result<Outbox, Error> {
        let schema = self.schema.unwrap_or_else(|| "public".to_owned());
        let table = self.table.unwrap_or_else(|| "eventful_outbox".to_owned());
        validate_identifier(&schema)?;
        validate_identifier(&table)?;
        // `<table>_migrations` is the longest derived name.
        if table.len() + "_migrations".len() > 63 {
            return Err(Error::Config(format!(
                "table name {table:?} is too long: at most 52 bytes"
            )));
        }
        Ok(Outbox::with(
            Sql::new(&schema, &table),
            self.traceparent,
            self.notify_every.unwrap_or(DEFAULT_NOTIFY_INTERVAL),
        ))
    }
}

fn validate_identifier(name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{name:?} is not a plain SQL identifier (lowercase letters, digits, _; at most 63 bytes)"
        )))
    }
}

/// Counts and ages of the outbox's unpublished events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Unpublished events that are not parked.
    pub pending: i64,
    /// Parked events (waiting for [`Outbox::redrive`]).
    pub parked: i64,
    /// Age of the oldest unpublished, unparked event.
    pub oldest_pending_age: Option<Duration>,
}

/// A parked event, as listed by [`Outbox::parked`].
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// Event id.
    pub id: Uuid,
    /// Position in the table.
    pub seq: i64,
    /// Destination topic.
    pub topic: String,
    /// Ordering key; later events of this key wait until this one is re-driven.
    pub key: String,
    /// Event type.
    pub event_type: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// Where one event stands, from [`Outbox::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventStatus {
    /// Not yet published; `attempts` failed attempts so far.
    Pending {
        /// Failed attempts so far.
        attempts: i32,
    },
    /// Parked after failing; see [`Outbox::parked`].
    Parked {
        /// Failed attempts.
        attempts: i32,
        /// The last publish error.
        last_error: Option<String>,
    },
    /// Acknowledged by the broker and marked.
    Published {
        /// When it was marked published.
        at: DateTime<Utc>,
        /// Failed attempts before it got through.
        attempts: i32,
    },
}

impl Outbox {
    /// The outbox in `public.eventful_outbox`.
    pub fn new() -> Outbox {
        Outbox::with(
            Sql::new("public", "eventful_outbox"),
            None,
            DEFAULT_NOTIFY_INTERVAL,
        )
    }

    fn with(sql: Sql, traceparent: Option<TraceparentSource>, notify_every: Duration) -> Outbox {
        Outbox {
            inner: Arc::new(Inner {
                sql,
                traceparent,
                notify_every,
                last_notify: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// A builder to choose the schema, the table and a `traceparent` source.
    pub fn builder() -> OutboxBuilder {
        OutboxBuilder::default()
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    /// Whether this transaction sends the `NOTIFY` (the first writer after the interval):
    /// `Some` with what to give back should its statement fail.
    fn claim_notify(&self) -> Option<NotifyClaim> {
        let interval = self.inner.notify_every.as_micros();
        if interval == 0 {
            // Every transaction notifies: nothing to claim or give back.
            return Some(NotifyClaim {
                previous: 0,
                claimed: 0,
            });
        }
        let now = u64::try_from(self.inner.epoch.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.inner.last_notify.load(Ordering::Relaxed);
        if last != 0 && u128::from(now.saturating_sub(last)) < interval {
            return None;
        }
        self.inner
            .last_notify
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|previous| NotifyClaim {
                previous,
                claimed: now,
            })
    }

    /// `schema.table` of the outbox table.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.inner.sql.schema, self.inner.sql.table)
    }

    /// The `LISTEN` channel the relays wait on (notified by every `record` on commit).
    pub fn channel(&self) -> &str {
        &self.inner.sql.channel
    }

    /// Creates or upgrades the outbox tables with [`Outbox::migrator`] (each version once;
    /// safe to call from several processes at once and at every start).
    #[tracing::instrument(skip_all, fields(table = %self.qualified_table()))]
    pub async fn migrate(&self, pool: &PgPool) -> Result<(), Error> {
        self.migrator().run(pool).await?;
        Ok(())
    }

    /// The migrations of this outbox's tables (rendered for its schema and table), for
    /// applications that run migrations from their own tooling: `pending(&pool)` lists what a
    /// deploy would apply, `run(&pool)` applies it. Versions are recorded under the component
    /// `eventful-outbox/<schema>.<table>` (see [`eventful_core::migrate`]).
    pub fn migrator(&self) -> eventful_core::migrate::Migrator {
        crate::migrate::migrator(&self.inner.sql)
    }

    /// Records one event in the caller's transaction; returns its id.
    ///
    /// Fails with [`Error::KeyTooLong`] (and writes nothing) when the key is longer than
    /// [`MAX_KEY_LEN`] bytes.
    ///
    /// Pass `&mut *tx` for a `sqlx::Transaction<'_, Postgres>`. The event becomes visible to
    /// the relay when, and only when, the transaction commits.
    ///
    /// Takes a transaction-scoped advisory lock on the event's key, so concurrent
    /// transactions recording the same key serialize until commit: that is what makes seq
    /// order equal commit order per key. Keep transactions that record events short, and
    /// record keys in a consistent order if one transaction records several keys through
    /// several calls (or use [`Outbox::record_all`], which locks them in a fixed order).
    pub async fn record(&self, conn: &mut PgConnection, event: NewEvent) -> Result<Uuid, Error> {
        let id = event.id;
        self.record_all(conn, std::iter::once(event)).await?;
        Ok(id)
    }

    /// Records several events in the caller's transaction, in the given order; returns their
    /// ids. Events of the same key are published in this order. Writes nothing if any key is
    /// longer than [`MAX_KEY_LEN`] bytes ([`Error::KeyTooLong`]).
    #[tracing::instrument(skip_all, fields(table = %self.qualified_table(), events))]
    pub async fn record_all(
        &self,
        conn: &mut PgConnection,
        events: impl IntoIterator<Item = NewEvent> + Send,
    ) -> Result<Vec<Uuid>, Error> {
        let mut events: Vec<NewEvent> = events.into_iter().collect();
        tracing::Span::current().record("events", events.len());
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Checked before anything is written, so a refused call leaves the transaction as
        // it was.
        if let Some(event) = events.iter().find(|e| e.key.len() > MAX_KEY_LEN) {
            return Err(Error::KeyTooLong {
                len: event.key.len(),
                max: MAX_KEY_LEN,
            });
        }
        if let Some(source) = &self.inner.traceparent {
            let mut current: Option<Option<String>> = None;
            for event in &mut events {
                if !event.has_header(TRACEPARENT) {
                    let value = current.get_or_insert_with(|| source()).clone();
                    if let Some(value) = value {
                        event.headers.push((TRACEPARENT.to_owned(), value));
                    }
                }
            }
        }
        let sql = &self.inner.sql;
        let mut locks: Vec<i64> = events
            .iter()
            .map(|e| sql.key_lock(&e.key))
            .collect::<Vec<_>>();
        locks.sort_unstable();
        locks.dedup();

        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut partitions = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut content_types = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        for e in events {
            ids.push(e.id);
            partitions.push(partition_of(&e.key));
            topics.push(e.topic);
            keys.push(e.key);
            types.push(e.event_type);
            payloads.push(e.payload);
            content_types.push(e.content_type.to_owned());
            headers.push(serde_json::to_string(&e.headers)?);
        }
        let claim = self.claim_notify();
        let locked = match claim {
            Some(_) => sqlx::query(&sql.lock_keys_and_notify)
                .bind(&locks)
                .bind(&sql.channel),
            None => sqlx::query(&sql.lock_keys).bind(&locks),
        }
        .execute(&mut *conn)
        .await;
        let inserted = match locked {
            Ok(_) => sqlx::query(&sql.insert)
                .bind(&ids)
                .bind(&topics)
                .bind(&keys)
                .bind(&partitions)
                .bind(&types)
                .bind(&payloads)
                .bind(&content_types)
                .bind(&headers)
                .execute(&mut *conn)
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = inserted {
            if let Some(claim) = claim {
                // This NOTIFY will not be delivered: let the next writer send one.
                claim.give_back(&self.inner.last_notify);
            }
            return Err(e.into());
        }
        Ok(ids)
    }

    /// Pending / parked counts and the age of the oldest pending event.
    pub async fn stats(&self, pool: &PgPool) -> Result<OutboxStats, Error> {
        #[derive(sqlx::FromRow)]
        struct Row {
            pending: i64,
            parked: i64,
            oldest_ms: Option<f64>,
        }
        let row: Row = sqlx::query_as(&self.inner.sql.stats)
            .fetch_one(pool)
            .await?;
        Ok(OutboxStats {
            pending: row.pending,
            parked: row.parked,
            oldest_pending_age: row
                .oldest_ms
                .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0)),
        })
    }

    /// The status of one event, or `None` if no such event is in the table (never recorded,
    /// rolled back, or deleted by retention).
    pub async fn status(&self, pool: &PgPool, id: Uuid) -> Result<Option<EventStatus>, Error> {
        #[derive(sqlx::FromRow)]
        struct Row {
            attempts: i32,
            published_at: Option<DateTime<Utc>>,
            parked_at: Option<DateTime<Utc>>,
            last_error: Option<String>,
        }
        let row: Option<Row> = sqlx::query_as(&self.inner.sql.status)
            .bind(id)
            .fetch_optional(pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let attempts = row.attempts;
        Ok(Some(match (row.published_at, row.parked_at) {
            (Some(at), _) => EventStatus::Published { at, attempts },
            (None, Some(_)) => EventStatus::Parked {
                attempts,
                last_error: row.last_error,
            },
            (None, None) => EventStatus::Pending { attempts },
        }))
    }

    /// Parked events in seq order (at most `limit`).
    pub async fn parked(&self, pool: &PgPool, limit: usize) -> Result<Vec<ParkedEvent>, Error> {
        Ok(sqlx::query_as(&self.inner.sql.parked)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await?)
    }

    /// Un-parks one event: its attempts restart from zero and the relay publishes it (and
    /// then the later events of its key) again. Returns `false` if it was not parked.
    pub async fn redrive(&self, pool: &PgPool, id: Uuid) -> Result<bool, Error> {
        let done = sqlx::query(&self.inner.sql.redrive)
            .bind(id)
            .bind(&self.inner.sql.channel)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Un-parks every parked event; returns how many.
    pub async fn redrive_all(&self, pool: &PgPool) -> Result<u64, Error> {
        let done = sqlx::query(&self.inner.sql.redrive_all)
            .bind(&self.inner.sql.channel)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes at most `limit` events published more than `older_than` ago; returns how
    /// many. [`Retention`](crate::Retention) calls this in a loop.
    pub async fn delete_published(
        &self,
        pool: &PgPool,
        older_than: Duration,
        limit: usize,
    ) -> Result<u64, Error> {
        let done = sqlx::query(&self.inner.sql.delete_published)
            .bind(older_than.as_secs_f64() * 1000.0)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }
}

/// The key-hash partition (0..64) of a key: fixed for the life of the table.
pub(crate) fn partition_of(key: &str) -> i32 {
    (fnv1a64(key.as_bytes()) % PARTITIONS as u64) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        assert!(Outbox::builder()
            .schema("orders")
            .table("outbox")
            .build()
            .is_ok());
        for bad in ["", "Orders", "1abc", "a-b", "a\"b", "x; drop table y"] {
            let err = Outbox::builder().table(bad).build().unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad:?}: {err}");
            assert!(!err.is_retryable());
        }
        assert!(Outbox::builder().table("a".repeat(53)).build().is_err());
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        assert_eq!(partition_of("order-1"), partition_of("order-1"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let p = partition_of(&format!("key-{i}"));
            assert!((0..PARTITIONS).contains(&p));
            seen.insert(p);
        }
        assert_eq!(seen.len(), PARTITIONS as usize, "all partitions are used");
    }

    #[test]
    fn channels_differ_per_table() {
        let a = Outbox::new();
        let b = Outbox::builder().schema("orders").build().unwrap();
        assert_ne!(a.channel(), b.channel());
        assert!(a.channel().len() <= 63);
    }
}
