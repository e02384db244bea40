//! [`Relay`]: the background task that publishes recorded events and marks them published.

mod lease;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use eventful_core::Backoff;

use crate::event::RecordRow;
use crate::metrics::RelayMetricsHandle;
use crate::rotation::{Rotation, RotationPolicy};
use crate::{Error, Outbox, OutboxRecord, Publisher};
use lease::Leases;

/// Session settings for the fetch's transaction (see `Relay::fetch`), followed by `$extra`.
macro_rules! fetch_planner_settings {
    ($extra:literal) => {
        concat!(
            "SELECT set_config('enable_sort', 'off', true), ",
            "set_config('enable_bitmapscan', 'off', true), set_config('jit', 'off', true)",
            $extra
        )
    };
}

const FETCH_PLANNER_SETTINGS: &str = fetch_planner_settings!("");

/// The same, for a fetch that leaves rows out: planned for its own arguments, so that
/// PostgreSQL hashes the rows to leave out (a generic plan compares every row with each of
/// them: measured 6 ms instead of about 2 for 1,000 of them).
const FETCH_PLANNER_SETTINGS_SKIPPING: &str =
    fetch_planner_settings!(", set_config('plan_cache_mode', 'force_custom_plan', true)");

/// Builder for [`Relay`]; see each method for its default.
pub struct RelayBuilder {
    pool: PgPool,
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    config: Config,
}

#[derive(Clone, Debug)]
struct Config {
    batch_size: usize,
    poll_interval: Duration,
    lease_ttl: Duration,
    max_attempts: u32,
    backoff: Backoff,
    error_backoff: Duration,
    listen: bool,
    busy_poll: Duration,
    busy_for: Duration,
    rotation: RotationPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(10),
            max_attempts: 20,
            backoff: Backoff::default(),
            error_backoff: Duration::from_secs(1),
            listen: true,
            busy_poll: Duration::from_millis(10),
            busy_for: Duration::from_secs(1),
            rotation: RotationPolicy::default(),
        }
    }
}

impl std::fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("outbox", &self.outbox)
            .field("config", &self.config)
            .finish()
    }
}

impl RelayBuilder {
    /// Events fetched and handed to the publisher at once (default 500).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.config.batch_size = batch_size;
        self
    }

    /// Polling fallback: how long the relay waits for a notification before looking at the
    /// table anyway (default 1 s). Bounds the delay after a lost notification.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// Lease time-to-live (default 10 s). A crashed relay's partitions are taken over after
    /// at most about `ttl + ttl/4`; leases are renewed every `ttl/4`.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// Failed attempts after which an event is parked (default 20: with the default backoff
    /// about 3 to 6 minutes of retry delays, plus the time each attempt takes — up to
    /// `message.timeout.ms` when the broker does not answer).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts;
        self
    }

    /// Retry delays of a failing event: `base · 2^(n-1)` capped at `max`, with equal jitter
    /// ([`Backoff`]; default 100 ms → 30 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Whether to `LISTEN` for new events (default `true`). With `false` the relay only
    /// polls every [`poll_interval`](Self::poll_interval).
    pub fn listen(mut self, listen: bool) -> Self {
        self.config.listen = listen;
        self
    }

    /// While busy, how often the relay looks at the table without being notified (default
    /// 10 ms). Writers send at most one `NOTIFY` per
    /// [`OutboxBuilder::notify_at_most_every`](crate::OutboxBuilder::notify_at_most_every)
    /// (100 ms by default): the events they record in between are found by these looks.
    pub fn busy_poll_interval(mut self, interval: Duration) -> Self {
        self.config.busy_poll = interval;
        self
    }

    /// How long the relay stays busy after a notification or a batch (default 1 s): keep it
    /// longer than the writers' `notify_at_most_every`. An idle relay costs nothing; a busy
    /// one runs an empty fetch every `busy_poll_interval`.
    pub fn busy_for(mut self, duration: Duration) -> Self {
        self.config.busy_for = duration;
        self
    }

    /// Rotate the outbox's slots once this many events were recorded since the last rotation
    /// (default 10,000; see [`crate::rotation`]). The table then holds about one to two times
    /// this many published rows (and their dead versions, whatever holds the xmin horizon),
    /// and a published event stays visible to [`Outbox::status`] until then. Lower it for a
    /// smaller table under a held horizon; raise it to keep published events for longer.
    pub fn rotate_after(mut self, events: u64) -> Self {
        self.config.rotation.min_events = events.max(1);
        self
    }

    /// Skip a rotation while the slot to be emptied has more than this many unpublished rows
    /// (default 1,000): they would be copied, and a relay that far behind gains nothing from
    /// rotating. Parked events count too: re-drive or inspect them when there are many.
    pub fn max_carry(mut self, rows: u64) -> Self {
        self.config.rotation.max_carry = rows;
        self
    }

    /// Whether this relay rotates the slots (default `true`). With `false`, published rows
    /// stay until something else rotates ([`Outbox::rotate`]) or deletes them
    /// ([`Retention`](crate::Retention)).
    pub fn rotation(mut self, enabled: bool) -> Self {
        self.config.rotation.enabled = enabled;
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<Relay, Error> {
        let c = &self.config;
        if c.batch_size == 0 || c.batch_size > 10_000 {
            return Err(Error::Config("batch_size must be in 1..=10000".into()));
        }
        if c.lease_ttl < Duration::from_millis(400) {
            return Err(Error::Config("lease_ttl must be at least 400 ms".into()));
        }
        if c.max_attempts == 0 {
            return Err(Error::Config("max_attempts must be at least 1".into()));
        }
        if c.busy_poll.is_zero() {
            return Err(Error::Config("busy_poll_interval must be > 0".into()));
        }
        if c.poll_interval.is_zero() || c.backoff.base.is_zero() || c.backoff.max < c.backoff.base {
            return Err(Error::Config(
                "poll_interval and backoff base must be > 0 and backoff max >= base".into(),
            ));
        }
        let options = self.pool.connect_options();
        // PostgreSQL's default database is the user's name.
        let database = options.get_database().unwrap_or(options.get_username());
        let metrics = RelayMetricsHandle::new(database, &self.outbox.qualified_table());
        Ok(Relay {
            pool: self.pool,
            outbox: self.outbox,
            publisher: self.publisher,
            config: self.config,
            id: Uuid::new_v4(),
            metrics,
        })
    }
}

/// Publishes the events of an [`Outbox`] through a [`Publisher`] and marks them published.
///
/// Run several relays on the same table for availability: they split the 64 key-hash
/// partitions between them through leases (see the crate docs for the design).
pub struct Relay {
    pool: PgPool,
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    config: Config,
    id: Uuid,
    metrics: RelayMetricsHandle,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("id", &self.id)
            .field("outbox", &self.outbox)
            .field("config", &self.config)
            .finish()
    }
}

/// A batch sent to the publisher, with one result per event, waiting to be marked.
struct Published {
    records: Vec<OutboxRecord>,
    results: Vec<Result<(), Error>>,
    fetch_ms: u64,
    publish_ms: u64,
    span: tracing::Span,
}

impl Published {
    /// The keys whose publish failed in this batch (an event without a result counts as
    /// failed, as when it is marked).
    fn failed_keys(&self) -> Vec<String> {
        let failed = (self.records.iter().enumerate())
            .filter(|(i, _)| !matches!(self.results.get(*i), Some(Ok(()))));
        let keys: HashSet<&str> = failed.map(|(_, record)| record.key.as_str()).collect();
        keys.into_iter().map(str::to_owned).collect()
    }
}

/// What marking a batch did.
struct Marked {
    /// The earliest retry it scheduled.
    next_retry: Option<Duration>,
    /// Keys with rows it could not mark (left pending, published again).
    left_pending: HashSet<String>,
}

impl Relay {
    /// A builder for a relay of `outbox` on `pool`, publishing through `publisher`.
    pub fn builder(pool: PgPool, outbox: Outbox, publisher: impl Publisher) -> RelayBuilder {
        RelayBuilder {
            pool,
            outbox,
            publisher: Arc::new(publisher),
            config: Config::default(),
        }
    }

    /// This relay's id (the owner of its leases).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// A handle on this relay's metrics, valid after [`spawn`](Self::spawn).
    pub fn metrics(&self) -> RelayMetricsHandle {
        self.metrics.clone()
    }

    /// Runs the relay on the tokio runtime until `cancel` fires.
    pub fn spawn(self, cancel: CancellationToken) -> JoinHandle<Result<(), Error>> {
        tokio::spawn(self.run(cancel))
    }

    /// Runs the relay until `cancel` fires: finishes the batch in flight, gives its leases
    /// back (so other relays take over at once) and returns. Fails only if it cannot
    /// register at start (for example when the table was not migrated).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let span = tracing::info_span!("outbox.relay", relay_id = %self.id, table = %self.outbox.qualified_table());
        async move {
            let leases = self.leases();
            leases.heartbeat().await?;
            leases.rebalance(&Mutex::new(())).await?;
            let listener = if self.config.listen {
                match self.listener().await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        // Retried by the listen loop; the relay polls meanwhile.
                        tracing::warn!(error = %e, "LISTEN failed; polling until it works");
                        None
                    }
                }
            } else {
                None
            };
            let batch_lock = Mutex::new(());
            let wake = Notify::new();
            // One task, four loops: aborting the task stops the heartbeat too, so a killed
            // relay's leases really expire.
            tokio::select! {
                () = self.work_loop(&cancel, &batch_lock, &wake) => {}
                () = self.heartbeat_loop() => {}
                () = self.rebalance_loop(&batch_lock, &wake) => {}
                () = self.listen_loop(listener, &wake) => {}
                () = self.rotation_loop() => {}
            }
            if let Err(e) = leases.release_all().await {
                tracing::warn!(error = %e, "could not release leases; they expire after the TTL");
            }
            tracing::info!("relay stopped");
            Ok(())
        }
        .instrument(span)
        .await
    }

    fn leases(&self) -> Leases<'_> {
        Leases {
            pool: &self.pool,
            sql: self.outbox.sql(),
            relay_id: self.id,
            ttl: self.config.lease_ttl,
            metrics: &self.metrics,
        }
    }

    async fn listener(&self) -> Result<PgListener, Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(self.outbox.channel()).await?;
        Ok(listener)
    }

    /// Fetch, publish, mark; then wait for a notification, a claimed partition, a due retry
    /// or the polling interval. While there is a backlog (the batch was full), the next batch
    /// is fetched and published while this one's marks are written (a drain of 60,000 events
    /// went from 19–26k to 26–33k events/s; at a steady rate the overlap's extra fetches cost
    /// more latency than they save, so the rounds stay serial there).
    ///
    /// Per-key order with the overlap: the fetch leaves out the rows being marked and the
    /// keys whose publish just failed (their retry is being recorded). Should the mark leave
    /// rows of some keys pending (it failed, or some rows could not be marked), the batch
    /// published meanwhile is marked without its rows of those keys, and the next fetch waits
    /// until nothing is in flight: those keys then go out again from their oldest pending
    /// event, in order, and the topic's last event of each key is still its latest. Both
    /// halves of a round run under the batch lock; marking needs no lease (it only records
    /// what the broker acknowledged), so a partition released between rounds is safe.
    async fn work_loop(&self, cancel: &CancellationToken, batch_lock: &Mutex<()>, wake: &Notify) {
        let no_keys = HashSet::new();
        let mut unmarked: Option<Published> = None;
        let mut retry_at: Option<tokio::time::Instant> = None;
        // Until when the relay looks at the table every `busy_poll` (see `busy_for`).
        let mut busy_until = tokio::time::Instant::now();
        loop {
            if cancel.is_cancelled() {
                if let Some(batch) = unmarked.take() {
                    let _guard = batch_lock.lock().await;
                    let _ = self.settle(self.mark(&batch, &no_keys).await, &mut retry_at);
                }
                return;
            }
            let (marked, next) = {
                let _guard = batch_lock.lock().await;
                let (skip_seqs, skip_keys): (Vec<i64>, Vec<String>) =
                    unmarked.as_ref().map_or_else(Default::default, |b| {
                        (b.records.iter().map(|r| r.seq).collect(), b.failed_keys())
                    });
                tokio::join!(
                    async {
                        match &unmarked {
                            Some(batch) => Some(self.mark(batch, &no_keys).await),
                            None => None,
                        }
                    },
                    self.fetch_and_publish(&skip_seqs, &skip_keys),
                )
            };
            let marked_batch = unmarked.take();
            // A mark or fetch error: wait `error_backoff` before the next round.
            let mut errored = false;
            // Keys with rows the mark left pending: the next batch's rows of them stay pending.
            let left_pending = match marked {
                Some(outcome) => self.settle(outcome, &mut retry_at).unwrap_or_else(|| {
                    // The mark failed: every row of its batch is pending.
                    errored = true;
                    marked_batch
                        .iter()
                        .flat_map(|b| b.records.iter().map(|r| r.key.clone()))
                        .collect()
                }),
                None => HashSet::new(),
            };
            match next {
                Ok(batch) => {
                    if batch.is_some() {
                        busy_until = tokio::time::Instant::now() + self.config.busy_for;
                    }
                    unmarked = batch;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay batch failed");
                    errored = true;
                }
            }
            let full = unmarked
                .as_ref()
                .is_some_and(|b| b.records.len() >= self.config.batch_size);
            if full && !errored && left_pending.is_empty() {
                // A backlog: mark this batch while the next one is fetched and published.
                continue;
            }
            if let Some(batch) = unmarked.take() {
                let _guard = batch_lock.lock().await;
                let outcome = self.mark(&batch, &left_pending).await;
                errored |= self.settle(outcome, &mut retry_at).is_none();
            }
            if full && !errored {
                // Still a backlog; rows left pending go out again from the oldest of each key.
                continue;
            }
            let now = tokio::time::Instant::now();
            let wait = if errored {
                self.config.error_backoff
            } else {
                let until_retry = retry_at.take().map(|at| at.saturating_duration_since(now));
                let idle = until_retry.map_or(self.config.poll_interval, |d| {
                    d.min(self.config.poll_interval)
                });
                if now < busy_until {
                    idle.min(self.config.busy_poll)
                } else {
                    idle
                }
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = wake.notified() => {
                    busy_until = tokio::time::Instant::now() + self.config.busy_for;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Takes a mark's outcome into account: records the earliest retry it scheduled, logs its
    /// error. Returns the keys it left rows of pending, or `None` when it failed.
    fn settle(
        &self,
        marked: Result<Marked, Error>,
        retry_at: &mut Option<tokio::time::Instant>,
    ) -> Option<HashSet<String>> {
        match marked {
            Ok(marked) => {
                if let Some(delay) = marked.next_retry {
                    let at = tokio::time::Instant::now() + delay;
                    *retry_at = Some(retry_at.map_or(at, |earlier| earlier.min(at)));
                }
                Some(marked.left_pending)
            }
            Err(e) => {
                tracing::warn!(error = %e, "marking a published batch failed; its events go out again");
                None
            }
        }
    }

    /// Turns `NOTIFY`s into wake-ups. Runs on its own so a notification is never lost to a
    /// cancelled receive; `Notify` keeps one permit, so notifications that arrive during a
    /// batch coalesce into a single extra look at the table.
    ///
    /// Without a working `LISTEN` (it failed at start, or its connection broke), it tries
    /// again every `error_backoff` on a fresh connection (the relay polls meanwhile), and
    /// wakes the work loop once it listens again: notifications sent in between are lost.
    async fn listen_loop(&self, listener: Option<PgListener>, wake: &Notify) {
        if !self.config.listen {
            return std::future::pending().await;
        }
        let mut listener = listener;
        loop {
            let Some(current) = listener.as_mut() else {
                tokio::time::sleep(self.config.error_backoff).await;
                match self.listener().await {
                    Ok(fresh) => {
                        tracing::info!("LISTEN is back");
                        listener = Some(fresh);
                        wake.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN failed again; polling until it works");
                    }
                }
                continue;
            };
            match current.try_recv().await {
                Ok(Some(_)) => wake.notify_one(),
                // The connection was lost and sqlx re-established it (and re-LISTENed):
                // look at the table for what was notified in between.
                Ok(None) => wake.notify_one(),
                Err(e) => {
                    // Whatever state the old connection is in, start over on a fresh one.
                    tracing::warn!(error = %e, "LISTEN connection failed; polling until it is back");
                    listener = None;
                    wake.notify_one();
                }
            }
        }
    }

    /// Renews this relay's leases every `ttl/4`, independently of batches in flight (a slow
    /// broker must not make the leases lapse), and refreshes the gauges.
    async fn heartbeat_loop(&self) {
        let interval = self.config.lease_ttl / 4;
        let leases = self.leases();
        let mut ticks: u64 = 0;
        loop {
            tokio::time::sleep(interval).await;
            ticks += 1;
            if let Err(e) = leases.heartbeat().await {
                tracing::warn!(error = %e, "lease heartbeat failed");
            }
            if ticks % 4 == 1 {
                match self.outbox.stats(&self.pool).await {
                    Ok(s) => self
                        .metrics
                        .set_gauges(s.pending, s.parked, s.oldest_pending_age),
                    Err(e) => tracing::debug!(error = %e, "stats query failed"),
                }
            }
            if ticks.is_multiple_of(40) {
                if let Err(e) = leases.prune().await {
                    tracing::debug!(error = %e, "pruning dead relays failed");
                }
            }
        }
    }

    /// Claims or releases partitions every `ttl/4`; releases happen between rounds (under the
    /// batch lock), so a released partition never has a publish in flight. A published batch
    /// may still wait for its mark: marking needs no lease (it records only what the broker
    /// acknowledged), though a failure it records may count an attempt of a row the new
    /// owner is sending.
    async fn rebalance_loop(&self, batch_lock: &Mutex<()>, wake: &Notify) {
        let interval = self.config.lease_ttl / 4;
        let leases = self.leases();
        loop {
            tokio::time::sleep(interval).await;
            match leases.rebalance(batch_lock).await {
                Ok(n) if n > 0 => wake.notify_one(),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lease rebalance failed"),
            }
        }
    }

    /// Rotates the slots when due (any relay may; they serialize on the slot row).
    async fn rotation_loop(&self) {
        let policy = self.config.rotation;
        if !policy.enabled {
            return std::future::pending().await;
        }
        // A rotation that keeps being put off lets the table grow again: say so, once a
        // minute, at warn level.
        let mut put_off_since: Option<std::time::Instant> = None;
        let mut warned_at: Option<std::time::Instant> = None;
        loop {
            let outcome = self
                .outbox
                .rotate(&self.pool, policy.min_events, policy.max_carry)
                .await;
            let wait = match &outcome {
                Ok(Rotation::Rotated { carried, .. }) => {
                    self.metrics.add_rotation(*carried);
                    put_off_since = None;
                    policy.check
                }
                Ok(Rotation::NotDue) => {
                    put_off_since = None;
                    policy.check
                }
                // The slot is locked: wait a full second, so that a transaction holding it
                // does not make every check queue the relays' statements behind the lock.
                Ok(Rotation::Busy) => Duration::from_secs(1),
                Ok(Rotation::Backlogged { .. }) => policy.check,
                Err(e) => {
                    tracing::warn!(error = %e, "slot rotation failed");
                    self.config.error_backoff
                }
            };
            if let Ok(put_off @ (Rotation::Busy | Rotation::Backlogged { .. })) = &outcome {
                let since = *put_off_since.get_or_insert_with(std::time::Instant::now);
                let quiet = warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
                if since.elapsed() >= Duration::from_secs(60) && quiet {
                    warned_at = Some(std::time::Instant::now());
                    tracing::warn!(
                        outcome = ?put_off,
                        put_off_for_s = since.elapsed().as_secs(),
                        "outbox slot rotation keeps being put off (a long transaction on the \
                         outbox table, or more unpublished events than max_carry): the table grows"
                    );
                } else {
                    tracing::debug!(outcome = ?put_off, "slot rotation put off");
                }
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Up to `batch_size` pending events, leaving out the rows `skip_seqs` and the keys
    /// `skip_keys`.
    async fn fetch(
        &self,
        skip_seqs: &[i64],
        skip_keys: &[String],
    ) -> Result<Vec<OutboxRecord>, Error> {
        let sql = self.outbox.sql();
        // Only partitions whose lease has at least ttl/4 left: one renewal interval, so a
        // heartbeat that is late by up to half the TTL does not stall publishing.
        let margin_ms = self.config.lease_ttl.as_secs_f64() * 1000.0 / 4.0;
        // The planner must walk the slots' pending indexes in seq order and stop at the limit.
        // Slots are truncated often, so their statistics are often missing or stale, and the
        // parent is never analyzed by autovacuum: left alone, it sorts every pending row
        // instead (measured: 26–38 ms instead of 1.2 ms for 1,000 of 15,000 pending rows).
        // Without sorts or bitmap scans, the only plan is the ordered one; JIT is off because
        // the disabled paths' costs would otherwise trigger it (another 150 ms per fetch).
        let mut tx = self.pool.begin().await?;
        let settings = if skip_seqs.is_empty() && skip_keys.is_empty() {
            FETCH_PLANNER_SETTINGS
        } else {
            FETCH_PLANNER_SETTINGS_SKIPPING
        };
        sqlx::query(settings).execute(&mut *tx).await?;
        let rows: Vec<RecordRow> = sqlx::query_as(&sql.fetch)
            .bind(self.id)
            .bind(margin_ms)
            .bind(self.config.batch_size as i64)
            .bind(skip_seqs)
            .bind(skip_keys)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.into_iter().map(OutboxRecord::try_from).collect()
    }

    /// Fetches a batch (see [`Self::fetch`]) and publishes it; `None` when nothing is
    /// pending.
    async fn fetch_and_publish(
        &self,
        skip_seqs: &[i64],
        skip_keys: &[String],
    ) -> Result<Option<Published>, Error> {
        let fetch_started = std::time::Instant::now();
        let records = self.fetch(skip_seqs, skip_keys).await?;
        let fetch_ms = fetch_started.elapsed().as_millis() as u64;
        if records.is_empty() {
            return Ok(None);
        }
        let span = tracing::info_span!(
            "outbox.relay.batch",
            events = records.len(),
            published = tracing::field::Empty,
            failed = tracing::field::Empty,
        );
        self.metrics
            .counters
            .batches
            .fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let results = self
            .publisher
            .publish_batch(&records)
            .instrument(span.clone())
            .await;
        Ok(Some(Published {
            records,
            results,
            fetch_ms,
            publish_ms: started.elapsed().as_millis() as u64,
            span,
        }))
    }

    /// Marks a published batch: its delivered events published, the first failure of each
    /// key failed (retry or park); rows of the keys in `leave_pending` are left as they are.
    async fn mark(
        &self,
        batch: &Published,
        leave_pending: &HashSet<String>,
    ) -> Result<Marked, Error> {
        self.mark_batch(batch, leave_pending)
            .instrument(batch.span.clone())
            .await
    }

    async fn mark_batch(
        &self,
        batch: &Published,
        leave_pending: &HashSet<String>,
    ) -> Result<Marked, Error> {
        let started = std::time::Instant::now();
        let records = &batch.records;
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut published: Vec<i64> = Vec::new();
        let (mut f_seq, mut f_err, mut f_delay, mut f_park) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut next_retry: Option<Duration> = None;
        for (i, record) in records.iter().enumerate() {
            if leave_pending.contains(&record.key) {
                // An earlier row of this key was left pending: this one goes out after it.
                continue;
            }
            if failed_keys.contains(record.key.as_str()) {
                // An earlier event of this key failed: whatever happened to this one, it is
                // not marked and goes out again after the earlier one.
                continue;
            }
            let (error, retryable) = match batch.results.get(i) {
                Some(Ok(())) => {
                    published.push(record.seq);
                    continue;
                }
                Some(Err(error)) => (error.to_string(), error.is_retryable()),
                None => (
                    "the publisher returned fewer results than events".to_owned(),
                    true,
                ),
            };
            failed_keys.insert(&record.key);
            let attempts = u32::try_from(record.attempts).unwrap_or(0) + 1;
            let park = !retryable || attempts >= self.config.max_attempts;
            let delay = self.config.backoff.delay(attempts);
            if park {
                tracing::warn!(event_id = %record.id, key = %record.key, attempts, %error, "parking event");
            } else {
                tracing::debug!(event_id = %record.id, key = %record.key, attempts, %error, ?delay, "publish failed; will retry");
                next_retry = Some(next_retry.map_or(delay, |d| d.min(delay)));
            }
            f_seq.push(record.seq);
            f_err.push(error);
            f_delay.push(delay.as_secs_f64() * 1000.0);
            f_park.push(park);
        }

        // Successes and failures are marked by separate statements, each its own transaction:
        // a failure that cannot be recorded must not roll back the marks of the rest.
        let unmarked_published = self.mark_published(&published).await?;
        let failures = Failures {
            seq: f_seq,
            err: f_err,
            delay_ms: f_delay,
            park: f_park,
        };
        let unmarked_failed = self.mark_failed(&failures).await?;
        let unmarked: HashSet<i64> = unmarked_published
            .iter()
            .chain(&unmarked_failed)
            .copied()
            .collect();
        if !unmarked.is_empty() {
            // Those rows stay pending and go out again (after the error backoff, not at once).
            next_retry = Some(next_retry.map_or(self.config.error_backoff, |d| {
                d.min(self.config.error_backoff)
            }));
        }
        let left_pending = records
            .iter()
            .filter(|r| unmarked.contains(&r.seq) || leave_pending.contains(&r.key))
            .map(|r| r.key.clone())
            .collect();
        let published_len = published.len() - unmarked_published.len();

        // Approximate when a failure could not be recorded (counted as retried or parked
        // anyway); the warning logged for it is the signal.
        let failed = failures.seq.len();
        let parked = failures.park.iter().filter(|p| **p).count();
        self.metrics.add_batch(
            published_len as u64,
            (failed - parked) as u64,
            parked as u64,
        );
        batch.span.record("published", published_len);
        batch.span.record("failed", failed);
        tracing::debug!(
            events = records.len(),
            published = published_len,
            failed,
            fetch_ms = batch.fetch_ms,
            publish_ms = batch.publish_ms,
            mark_ms = started.elapsed().as_millis() as u64,
            "batch done"
        );
        Ok(Marked {
            next_retry,
            left_pending,
        })
    }
}

/// The failed events of a batch, as columns for `mark_failed`.
struct Failures {
    seq: Vec<i64>,
    err: Vec<String>,
    delay_ms: Vec<f64>,
    park: Vec<bool>,
}

impl Relay {
    /// Marks `seqs` published in one statement. Should that fail for a reason that a retry
    /// cannot fix (some row the statement cannot update), marks them one by one so that only
    /// the offending rows stay pending. Returns the rows that could not be marked. A retryable
    /// error (lost connection) fails the batch: every row stays pending and is re-sent.
    async fn mark_published(&self, seqs: &[i64]) -> Result<Vec<i64>, Error> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.outbox.sql().mark_published;
        let error = match sqlx::query(sql).bind(seqs).execute(&self.pool).await {
            Ok(_) => return Ok(Vec::new()),
            Err(e) => Error::from(e),
        };
        if error.is_retryable() {
            return Err(error);
        }
        tracing::warn!(%error, rows = seqs.len(), "marking published failed; marking row by row");
        let mut unmarked = Vec::new();
        for seq in seqs {
            if let Err(e) = sqlx::query(sql).bind([*seq]).execute(&self.pool).await {
                let error = Error::from(e);
                if error.is_retryable() {
                    return Err(error);
                }
                tracing::error!(seq, %error, "cannot mark a published event; it stays pending and will be published again");
                unmarked.push(*seq);
            }
        }
        Ok(unmarked)
    }

    /// Records the failures in one statement, or row by row when that fails for a reason a
    /// retry cannot fix (see [`Self::mark_published`]). A row whose failure cannot be
    /// recorded stays pending with its attempts unchanged, and the later events of its key
    /// stay behind it. Returns the rows whose failure could not be recorded.
    async fn mark_failed(&self, failures: &Failures) -> Result<Vec<i64>, Error> {
        if failures.seq.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.outbox.sql().mark_failed;
        let all = sqlx::query(sql)
            .bind(&failures.seq)
            .bind(&failures.err)
            .bind(&failures.delay_ms)
            .bind(&failures.park)
            .execute(&self.pool)
            .await;
        let error = match all {
            Ok(_) => return Ok(Vec::new()),
            Err(e) => Error::from(e),
        };
        if error.is_retryable() {
            return Err(error);
        }
        tracing::warn!(%error, rows = failures.seq.len(), "marking failures failed; marking row by row");
        let mut unmarked = Vec::new();
        for i in 0..failures.seq.len() {
            let one = sqlx::query(sql)
                .bind(&failures.seq[i..=i])
                .bind(&failures.err[i..=i])
                .bind(&failures.delay_ms[i..=i])
                .bind(&failures.park[i..=i])
                .execute(&self.pool)
                .await;
            if let Err(e) = one {
                let error = Error::from(e);
                if error.is_retryable() {
                    return Err(error);
                }
                tracing::error!(seq = failures.seq[i], %error, "cannot record an event's failure; it stays pending and is tried again");
                unmarked.push(failures.seq[i]);
            }
        }
        Ok(unmarked)
    }
}
