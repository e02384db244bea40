//! The outbox while something holds the xmin horizon (custom harness).
//!
//! PostgreSQL cannot remove a dead row version while any transaction that might still see it
//! is open: a report, a replication slot or a forgotten `BEGIN` holds the *xmin horizon*, and
//! a queue table that UPDATEs and DELETEs its rows then grows dead tuples and bloated indexes
//! until the transaction ends. This bench measures what that does to the outbox.
//!
//! Run with `cargo bench --bench outbox_xmin` (PostgreSQL from `DATABASE_URL`; a private
//! Apache Kafka broker from the jars of `scripts/services install`). Phases, one table:
//!
//! 1. a second session opens `BEGIN ISOLATION LEVEL REPEATABLE READ` and takes a snapshot
//!    (skip with `OUTBOX_XMIN_HOLD=0` for the control run);
//! 2. **drain at start**: a backlog of `OUTBOX_XMIN_DRAIN` events (default 20000) committed
//!    in one transaction, timed from commit until the broker acknowledged the last one;
//! 3. **steady**: writers commit one event per transaction at `OUTBOX_XMIN_RATE` events/s
//!    (default 1000) for `OUTBOX_XMIN_SECONDS` (default 300) while the relay publishes and
//!    rotates the outbox's slots (its default, every 10,000 events); every
//!    `OUTBOX_XMIN_SAMPLE` seconds (default 30) a row: dead and live tuples, heap and index
//!    size, and commit → ack p50/p99 of that window;
//! 4. **drain at end**: the same backlog again.
//!
//! Reading it: compare the end drain with the start drain (throughput loss) and the last
//! window with the first (size, dead tuples, p99). The load average is printed in the header.

// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventful_outbox::CancellationToken;
use eventful_outbox::{KafkaPublisher, NewEvent, Outbox, Relay};
use eventful_test_support::{kafka, KafkaBroker, TestDatabase};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

#[path = "common/ack_clock.rs"]
mod ack_clock;
use ack_clock::{env_usize, AckClock};

fn event(topic: &str, i: usize) -> NewEvent {
    let payload = format!(
        "{{\"order_id\":\"order-{i}\",\"customer\":\"c-{}\",\"total_cents\":{},\"currency\":\"EUR\",\"lines\":3}}",
        i % 997,
        1000 + i % 50_000
    );
    NewEvent::bytes(
        topic,
        format!("order-{}", i % 1000),
        "OrderPlaced",
        payload.into_bytes(),
    )
}

/// The table's footprint as PostgreSQL reports it.
struct Footprint {
    live: i64,
    dead: i64,
    heap_bytes: i64,
    index_bytes: i64,
}

async fn footprint(pool: &PgPool, outbox: &Outbox) -> anyhow::Result<Footprint> {
    // The cumulative statistics are flushed by each backend about once a second; the sizes
    // are exact. Summed over the table's partitions (the slots), or the table itself when it
    // has none (the layout before schema version 3).
    let table = outbox.qualified_table();
    let (live, dead, heap_bytes, index_bytes): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(s.n_live_tup), 0)::bigint, coalesce(sum(s.n_dead_tup), 0)::bigint, \
                sum(pg_relation_size(t.relid))::bigint, sum(pg_indexes_size(t.relid))::bigint \
         FROM pg_partition_tree($1::regclass) t \
         LEFT JOIN pg_stat_user_tables s ON s.relid = t.relid \
         WHERE t.isleaf",
    )
    .bind(&table)
    .fetch_one(pool)
    .await?;
    Ok(Footprint {
        live,
        dead,
        heap_bytes,
        index_bytes,
    })
}

struct Bench {
    pool: PgPool,
    outbox: Outbox,
    topic: String,
    acks: Arc<Mutex<HashMap<Uuid, Instant>>>,
    count: Arc<AtomicUsize>,
    next: AtomicUsize,
}

impl Bench {
    async fn wait_for(&self, total: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.count.load(Ordering::Relaxed) < total {
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {total} events acknowledged",
                self.count.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Commits `n` events in one transaction; events/s from the commit to the last ack.
    async fn drain(&self, n: usize) -> anyhow::Result<f64> {
        let before = self.count.load(Ordering::Relaxed);
        let first = self.next.fetch_add(n, Ordering::Relaxed);
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(n);
        for chunk in (first..first + n).collect::<Vec<_>>().chunks(2000) {
            let events: Vec<_> = chunk.iter().map(|&i| event(&self.topic, i)).collect();
            ids.extend(self.outbox.record_all(&mut *tx, events).await?);
        }
        tx.commit().await?;
        let committed = Instant::now();
        self.wait_for(before + n, Duration::from_secs(300)).await?;
        let acks = self.acks.lock().unwrap();
        let last = ids
            .iter()
            .filter_map(|id| acks.get(id))
            .max()
            .copied()
            .unwrap_or(committed);
        Ok(n as f64 / last.duration_since(committed).as_secs_f64())
    }

    /// One window of steady single-event commits at `rate`/s; commit → ack percentiles.
    async fn steady_window(&self, rate: usize, seconds: u64) -> anyhow::Result<(usize, f64, f64)> {
        let before = self.count.load(Ordering::Relaxed);
        let writers = 4;
        let per_writer = Duration::from_secs_f64(writers as f64 / rate as f64);
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let pool = self.pool.clone();
            let outbox = self.outbox.clone();
            let topic = self.topic.clone();
            let first = self
                .next
                .fetch_add(rate * seconds as usize, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                let mut commits: Vec<(Uuid, Instant)> = Vec::new();
                let mut tick = tokio::time::interval(per_writer);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = first;
                while Instant::now() < until {
                    tick.tick().await;
                    let mut tx = pool.begin().await?;
                    let id = outbox.record(&mut *tx, event(&topic, i)).await?;
                    tx.commit().await?;
                    commits.push((id, Instant::now()));
                    i += 1;
                }
                anyhow::Ok(commits)
            }));
        }
        let mut commits = Vec::new();
        for t in tasks {
            commits.extend(t.await??);
        }
        self.wait_for(before + commits.len(), Duration::from_secs(120))
            .await?;
        let acks = self.acks.lock().unwrap();
        let mut latencies: Vec<f64> = commits
            .iter()
            .map(|(id, at)| acks[id].saturating_duration_since(*at).as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        Ok((commits.len(), pct(0.50), pct(0.99)))
    }
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn run() -> anyhow::Result<()> {
    eventful_test_support::init_tracing();
    let hold = env_usize("OUTBOX_XMIN_HOLD", 1) != 0;
    let drain_n = env_usize("OUTBOX_XMIN_DRAIN", 20_000);
    let rate = env_usize("OUTBOX_XMIN_RATE", 1000);
    let seconds = env_usize("OUTBOX_XMIN_SECONDS", 300) as u64;
    let sample = env_usize("OUTBOX_XMIN_SAMPLE", 30).max(1) as u64;

    let broker = KafkaBroker::start().await;
    let brokers = broker.brokers();
    kafka::require_broker(&brokers).await;
    let db = TestDatabase::create_with_pool_size(30).await;
    let outbox = Outbox::new();
    outbox.migrate(&db.pool).await?;
    let topic = format!("bench-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 8).await;

    let bench = Bench {
        pool: db.pool.clone(),
        outbox: outbox.clone(),
        topic,
        acks: Arc::default(),
        count: Arc::new(AtomicUsize::new(0)),
        next: AtomicUsize::new(0),
    };
    let cancel = CancellationToken::new();
    let relay = Relay::builder(
        db.pool.clone(),
        outbox.clone(),
        AckClock {
            inner: KafkaPublisher::new(&brokers)?,
            acks: bench.acks.clone(),
            count: bench.count.clone(),
        },
    )
    .batch_size(1000)
    .build()?;
    let relay_metrics = relay.metrics();
    let relay = relay.spawn(cancel.clone());

    // No `Retention`: the relay's slot rotation (default: every 10,000 events) is what keeps
    // the table small. (Before schema version 3 this bench ran a Retention deleting rows
    // published more than 5 s ago, as a production deployment would.)

    // The session that holds the horizon: a snapshot taken and never released until the end.
    let mut holder = PgConnection::connect(&db.url).await?;
    if hold {
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut holder)
            .await?;
        sqlx::query("SELECT count(*) FROM pg_class")
            .execute(&mut holder)
            .await?;
    }

    bench.drain(500).await?; // warm-up: connections, metadata, producer id
    let start_rate = bench.drain(drain_n).await?;
    let mut windows = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let (events, p50, p99) = bench.steady_window(rate, sample).await?;
        let fp = footprint(&db.pool, &outbox).await?;
        eprintln!(
            "outbox_xmin: t={:>4.0}s events={events} p50={p50:.1} ms p99={p99:.1} ms dead={} heap={:.1} MiB index={:.1} MiB",
            started.elapsed().as_secs_f64(),
            fp.dead,
            mib(fp.heap_bytes),
            mib(fp.index_bytes)
        );
        windows.push((started.elapsed().as_secs_f64(), events, p50, p99, fp));
    }
    let end_rate = bench.drain(drain_n).await?;
    let end = footprint(&db.pool, &outbox).await?;
    if hold {
        sqlx::query("ROLLBACK").execute(&mut holder).await?;
    }
    cancel.cancel();
    relay.await??;

    println!();
    println!(
        "outbox under a held xmin horizon — hold {}, steady {rate} ev/s for {seconds} s, \
         {} cores, load avg {}",
        if hold { "ON" } else { "off (control)" },
        std::thread::available_parallelism().map_or(1, usize::from),
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    );
    println!(
        "{:>7} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "t (s)", "events", "p50 ms", "p99 ms", "live", "dead", "heap MiB", "index MiB"
    );
    for (t, events, p50, p99, fp) in &windows {
        println!(
            "{t:>7.0} {events:>8} {p50:>8.1} {p99:>8.1} {:>10} {:>10} {:>10.1} {:>10.1}",
            fp.live,
            fp.dead,
            mib(fp.heap_bytes),
            mib(fp.index_bytes)
        );
    }
    println!(
        "drain of {drain_n} (commit -> last ack): start {start_rate:.0} ev/s, end {end_rate:.0} ev/s \
         ({:+.0}%); at the end: {} dead tuples, heap {:.1} MiB, indexes {:.1} MiB",
        100.0 * (end_rate - start_rate) / start_rate,
        end.dead,
        mib(end.heap_bytes),
        mib(end.index_bytes)
    );
    let m = relay_metrics.snapshot();
    println!(
        "relay: {} published, {} slot rotations, {} rows carried over",
        m.published, m.rotations, m.carried
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}
