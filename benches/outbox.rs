//! Outbox relay benchmark (custom harness: it measures end-to-end throughput and latency,
//! which criterion's per-iteration model does not fit).
//!
//! Run with `cargo bench --bench outbox` (needs PostgreSQL and Kafka's jars from
//! `scripts/services install`; the bench starts its own private Apache Kafka broker so that
//! other traffic on the shared broker does not skew it). It prints one table:
//!
//! - **raw producer** (the ceiling): the same messages (key, ~120-byte JSON payload, the
//!   three contract headers) sent by a bare rdkafka `FutureProducer` configured like the
//!   relay's (idempotent, `acks=all`, `linger.ms=2`), once with every send in flight and once
//!   1000 at a time like a relay batch; no database involved. The better run is the ceiling;
//! - **relay xN drain**: N relays on one table; a backlog of events is committed in one
//!   transaction and the clock runs from that commit until the broker acknowledged the last
//!   event (events/s commit → ack), with the ratio to the ceiling;
//! - **relay xN steady**: writers commit events at a fixed rate; per-event latency from
//!   `commit()` returning to the delivery report (p50 / p99). Up to 500 events/s each
//!   transaction holds one event; above that a transaction holds `ceil(rate / 500)` events
//!   (the row says `k ev/tx`), because with `synchronous_commit` on every commit waits for a
//!   WAL flush and single-event commits top out near 1,500/s on this machine: a service
//!   writing 5,000 events/s commits several per transaction (a request writing its events
//!   together) or runs many more connections.
//!
//! Sizes: `OUTBOX_BENCH_EVENTS` (default 20000), `OUTBOX_BENCH_RATES` events/s (default
//! `300,5000`: one steady row per rate; the row's events/s shows what was achieved),
//! `OUTBOX_BENCH_SECONDS` of steady load (default 8), `OUTBOX_BENCH_RELAYS` fleets to run
//! (default `1,3`), `OUTBOX_BENCH_DRAIN=0` skips the raw-producer and drain rows (steady rows
//! only), `OUTBOX_BENCH_EVENTS_PER_TX` fixes the events per steady transaction (`1` gives the
//! old one-event-per-transaction rows), `OUTBOX_BENCH_LINGER_MS` overrides the relays'
//! `linger.ms`. A full run takes 1–3 minutes.
//!
//! Reading it: `ratio` is relay drain events/s over the ceiling (target ≥ 50%); the steady
//! rows' p99 is the commit → ack latency at moderate load (target < 50 ms). Figures move a
//! lot with machine load: note the load average printed in the header.

// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventful_outbox::CancellationToken;
use eventful_outbox::{Error, KafkaPublisher, NewEvent, Outbox, Relay};
use eventful_test_support::{kafka, KafkaBroker, TestDatabase};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use uuid::Uuid;

#[path = "common/ack_clock.rs"]
mod ack_clock;
use ack_clock::{env_usize, AckClock};

/// A JSON payload of about 120 bytes, rendered by hand.
fn payload(i: usize) -> String {
    format!(
        "{{\"order_id\":\"order-{i}\",\"customer\":\"c-{}\",\"total_cents\":{},\"currency\":\"EUR\",\"lines\":3}}",
        i % 997,
        1000 + i % 50_000
    )
}

fn key(i: usize) -> String {
    format!("order-{}", i % 1000)
}

struct Row {
    scenario: String,
    events: usize,
    seconds: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// Sends `n` messages with a bare producer, keeping at most `window` in flight (all of them
/// when `None`).
async fn raw_producer(
    brokers: &str,
    topic: &str,
    n: usize,
    window: Option<usize>,
) -> anyhow::Result<Row> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000")
        .create()?;
    let send_all = |range: std::ops::Range<usize>| -> anyhow::Result<Vec<_>> {
        let mut deliveries = Vec::with_capacity(range.len());
        for i in range {
            let id = Uuid::now_v7().hyphenated().to_string();
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "event-id",
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: "event-type",
                    value: Some("OrderPlaced"),
                })
                .insert(Header {
                    key: "content-type",
                    value: Some("application/json"),
                });
            let body = payload(i);
            let k = key(i);
            let record = FutureRecord::to(topic)
                .key(&k)
                .payload(&body)
                .headers(headers);
            match producer.send_result(record) {
                Ok(d) => deliveries.push(d),
                Err((e, _)) => anyhow::bail!("enqueue failed: {e}"),
            }
        }
        Ok(deliveries)
    };
    async fn await_all(deliveries: Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
        for d in futures::future::join_all(deliveries).await {
            match d {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => anyhow::bail!("delivery failed: {e}"),
                Err(_) => anyhow::bail!("producer dropped"),
            }
        }
        Ok(())
    }
    // Warm up the connections, metadata and the idempotent producer id.
    await_all(send_all(0..500)?).await?;
    let started = Instant::now();
    let window = window.unwrap_or(n).max(1);
    let mut from = 0;
    while from < n {
        let to = (from + window).min(n);
        await_all(send_all(from..to)?).await?;
        from = to;
    }
    let scenario = match window {
        w if w >= n => "raw producer, all in flight".to_owned(),
        w => format!("raw producer, {w} in flight"),
    };
    Ok(Row {
        scenario,
        events: n,
        seconds: started.elapsed().as_secs_f64(),
        p50_ms: None,
        p99_ms: None,
    })
}

struct Fleet {
    db: TestDatabase,
    outbox: Outbox,
    topic: String,
    acks: Arc<Mutex<HashMap<Uuid, Instant>>>,
    count: Arc<AtomicUsize>,
    cancel: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
}

async fn start_fleet(brokers: &str, relays: usize) -> anyhow::Result<Fleet> {
    let db = TestDatabase::create_with_pool_size(30).await;
    let outbox = Outbox::new();
    outbox.migrate(&db.pool).await?;
    let topic = new_topic(brokers).await;
    let acks: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let mut handles = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..relays {
        let mut builder = KafkaPublisher::builder(brokers);
        if let Ok(ms) = std::env::var("OUTBOX_BENCH_LINGER_MS") {
            builder = builder.linger(Duration::from_millis(ms.parse()?));
        }
        let publisher = AckClock {
            inner: builder.build()?,
            acks: acks.clone(),
            count: count.clone(),
        };
        let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher)
            .batch_size(1000)
            .build()?;
        metrics.push(relay.metrics());
        handles.push(relay.spawn(cancel.clone()));
    }
    // Let the relays split the partitions before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let parts: Vec<u64> = metrics.iter().map(|m| m.snapshot().partitions).collect();
        if parts.iter().sum::<u64>() == 64 && parts.iter().all(|p| *p >= 64 / relays as u64 - 2) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "relays did not balance: {parts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Fleet {
        db,
        outbox,
        topic,
        acks,
        count,
        cancel,
        handles,
    })
}

impl Fleet {
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

    /// Commits `n` events in one transaction, then measures until the last is acknowledged.
    async fn drain(&self, label: &str, n: usize) -> anyhow::Result<Row> {
        let before = self.count.load(Ordering::Relaxed);
        let mut tx = self.db.pool.begin().await?;
        let mut ids = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
            let events: Vec<NewEvent> = chunk
                .iter()
                .map(|&i| {
                    NewEvent::bytes(&self.topic, key(i), "OrderPlaced", payload(i).into_bytes())
                })
                .collect();
            ids.extend(self.outbox.record_all(&mut *tx, events).await?);
        }
        tx.commit().await?;
        let committed = Instant::now();
        self.wait_for(before + n, Duration::from_secs(120)).await?;
        let acks = self.acks.lock().unwrap();
        let last = ids
            .iter()
            .filter_map(|id| acks.get(id))
            .max()
            .copied()
            .unwrap_or(committed);
        Ok(Row {
            scenario: label.into(),
            events: n,
            seconds: last.duration_since(committed).as_secs_f64(),
            p50_ms: None,
            p99_ms: None,
        })
    }

    /// `writers` tasks commit transactions of `per_tx` events at `rate` events/s in total for
    /// `seconds`; returns commit → ack latency percentiles.
    async fn steady(&self, label: &str, rate: usize, seconds: u64) -> anyhow::Result<Row> {
        let before = self.count.load(Ordering::Relaxed);
        let per_tx = events_per_transaction(rate);
        let txs = rate.div_ceil(per_tx);
        // Each writer commits one transaction at a time (1–2 ms each on an idle machine with
        // synchronous_commit on, 10–40 ms under load): one writer per 25 transactions/s, so
        // the offered rate is reached under load too. At most 24: the relays share the pool.
        let writers = (txs / 25).clamp(4, 24);
        let per_writer = Duration::from_secs_f64(writers as f64 / txs as f64);
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for w in 0..writers {
            let pool = self.db.pool.clone();
            let outbox = self.outbox.clone();
            let topic = self.topic.clone();
            tasks.push(tokio::spawn(async move {
                let mut commits: Vec<(Uuid, Instant)> = Vec::new();
                let mut tick = tokio::time::interval(per_writer);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = w * per_tx;
                while Instant::now() < until {
                    tick.tick().await;
                    let mut tx = pool.begin().await?;
                    let events: Vec<NewEvent> = (i..i + per_tx)
                        .map(|j| {
                            NewEvent::bytes(&topic, key(j), "OrderPlaced", payload(j).into_bytes())
                        })
                        .collect();
                    let ids = outbox.record_all(&mut *tx, events).await?;
                    tx.commit().await?;
                    let at = Instant::now();
                    commits.extend(ids.into_iter().map(|id| (id, at)));
                    i += writers * per_tx;
                }
                anyhow::Ok(commits)
            }));
        }
        let mut commits = Vec::new();
        for t in tasks {
            commits.extend(t.await??);
        }
        self.wait_for(before + commits.len(), Duration::from_secs(60))
            .await?;
        let acks = self.acks.lock().unwrap();
        let mut latencies: Vec<f64> = commits
            .iter()
            .map(|(id, at)| acks[id].saturating_duration_since(*at).as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        Ok(Row {
            scenario: label.into(),
            events: commits.len(),
            seconds: seconds as f64,
            p50_ms: Some(pct(0.50)),
            p99_ms: Some(pct(0.99)),
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        for h in self.handles {
            h.await??;
        }
        Ok(())
    }
}

async fn run() -> anyhow::Result<()> {
    eventful_test_support::init_tracing(); // RUST_LOG=eventful_outbox=debug shows each batch
                                           // A private broker (fresh SQLite file) so other test traffic on the shared one does not
                                           // skew the figures; it still shares the machine's CPUs.
    let broker = KafkaBroker::start().await;
    let brokers = broker.brokers();
    kafka::require_broker(&brokers).await;
    let n = env_usize("OUTBOX_BENCH_EVENTS", 20_000);
    // Steady rates, comma-separated (default 300 and 5000 events/s).
    let rates = env_list("OUTBOX_BENCH_RATES", "300,5000");
    let seconds = env_usize("OUTBOX_BENCH_SECONDS", 8) as u64;
    let started = Instant::now();

    let fleets = env_list("OUTBOX_BENCH_RELAYS", "1,3");
    let drain = std::env::var("OUTBOX_BENCH_DRAIN").map_or(true, |v| v != "0");

    let mut rows = Vec::new();
    if drain {
        let raw_topic = new_topic(&brokers).await;
        rows.push(raw_producer(&brokers, &raw_topic, n, None).await?);
        rows.push(raw_producer(&brokers, &raw_topic, n, Some(1000)).await?);
    }
    // The ceiling is the better of the two raw runs.
    let ceiling_rate = rows.iter().map(Row::rate).fold(0.0, f64::max);
    for relays in fleets {
        let fleet = start_fleet(&brokers, relays).await?;
        // Warm-up (not reported): connections, metadata, producer ids.
        fleet.drain("warm-up", 500).await?;
        if drain {
            rows.push(
                fleet
                    .drain(&format!("relay x{relays} drain (commit -> ack)"), n)
                    .await?,
            );
        }
        for &rate in &rates {
            rows.push(
                fleet
                    .steady(
                        &format!(
                            "relay x{relays} steady {rate} ev/s {} ev/tx",
                            events_per_transaction(rate)
                        ),
                        rate,
                        seconds,
                    )
                    .await?,
            );
        }
        fleet.stop().await?;
    }

    println!();
    println!(
        "outbox relay benchmark — broker {brokers}, {} cores, load avg {}",
        num_cpus(),
        loadavg()
    );
    println!(
        "{:<36} {:>8} {:>9} {:>11} {:>8} {:>8} {:>8}",
        "scenario", "events", "seconds", "events/s", "ratio", "p50 ms", "p99 ms"
    );
    for row in &rows {
        let ratio = if row.p50_ms.is_none() && row.scenario.starts_with("relay") {
            format!("{:.0}%", 100.0 * row.rate() / ceiling_rate)
        } else {
            "-".into()
        };
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        println!(
            "{:<36} {:>8} {:>9.2} {:>11.0} {:>8} {:>8} {:>8}",
            row.scenario,
            row.events,
            row.seconds,
            row.rate(),
            ratio,
            fmt(row.p50_ms),
            fmt(row.p99_ms)
        );
    }
    println!(
        "(ratio = relay drain events/s / best raw producer events/s; total bench time {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A comma-separated list of numbers from the environment (`default` if unset).
fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect()
}

/// Events per writer transaction at `rate` events/s: `OUTBOX_BENCH_EVENTS_PER_TX` if set,
/// else one up to 500/s, then enough to keep the commit rate near 500/s.
fn events_per_transaction(rate: usize) -> usize {
    env_usize("OUTBOX_BENCH_EVENTS_PER_TX", rate.div_ceil(500)).max(1)
}

async fn new_topic(brokers: &str) -> String {
    let name = format!("bench-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(brokers, &name, 8).await;
    name
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}
