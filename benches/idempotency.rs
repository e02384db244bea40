//! Guard overhead: handler throughput with and without the processed-event guard, in one run.
//!
//! Run with `cargo bench --bench idempotency` (PostgreSQL required; the last section starts a
//! private Apache Kafka broker, skipped when `BENCH_SKIP_KAFKA=1`).
//!
//! Every row runs the same handler: one `INSERT` into an effects table inside a transaction.
//! - `no guard`: `BEGIN; INSERT effect; COMMIT`
//! - `guard, first delivery`: `BEGIN; check_and_record → First; INSERT effect; COMMIT`
//! - `guard, duplicate`: `BEGIN; check_and_record → Duplicate; COMMIT` (nothing applied)
//! - `inbox runtime, batch N`: the full consumer (Kafka fetch, envelope, guard, handler,
//!   offsets), 4 partitions, timed from the first to the last applied event, with
//!   `max_batch(N)` (`batch 1` is one transaction per event; the batch sizes come from
//!   `BENCH_INBOX_BATCHES`, default `1,64`), each on its own cold topic;
//! - `broker read`: the ceiling for that row, a bare `StreamConsumer` reading an identical
//!   topic (both topics read cold, right after being filled).
//!
//! Each database row is measured sequentially (1 connection) and with 8 concurrent
//! connections; modes are interleaved over 3 rounds and the median round is reported, so
//! machine noise hits all modes alike. Read the "overhead" column as the throughput lost to
//! the guard's extra `INSERT .. ON CONFLICT` round trip.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventful_idempotency::{
    async_trait, CancellationToken, ConsumerOptions, EventHandler, EventMeta, HandlerError,
    InboxConsumer, ProcessedEvents,
};
use eventful_test_support::{kafka, KafkaBroker, TestDatabase};
use sqlx::PgPool;
use uuid::Uuid;

const EVENTS: usize = 2_000;
/// Events per topic in the Kafka section: enough that a batched inbox runs for a while.
const INBOX_EVENTS: usize = 20_000;
const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    NoGuard,
    GuardFirst,
    GuardDuplicate,
}

async fn one(pool: &PgPool, guard: &ProcessedEvents, mode: Mode, id: Uuid) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let apply = match mode {
        Mode::NoGuard => true,
        Mode::GuardFirst | Mode::GuardDuplicate => {
            guard.check_and_record(&mut tx, id).await?.is_first()
        }
    };
    if apply {
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Events per second for `ids` split over `concurrency` workers.
async fn run(
    pool: &PgPool,
    guard: &ProcessedEvents,
    mode: Mode,
    ids: Arc<Vec<Uuid>>,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (pool, guard, ids) = (pool.clone(), guard.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for id in ids.iter().skip(worker).step_by(concurrency) {
                one(&pool, &guard, mode, *id).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(ids.len() as f64 / started.elapsed().as_secs_f64())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

struct Effect(Arc<AtomicUsize>);

#[async_trait]
impl EventHandler for Effect {
    type Payload = sqlx::types::JsonValue;

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &EventMeta,
        _: Self::Payload,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
            .bind(event.id)
            .execute(&mut *tx)
            .await?;
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Produces `events` enveloped messages to a fresh 4-partition topic.
async fn fill_topic(brokers: &str, events: usize) -> anyhow::Result<String> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let topic = format!("bench-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(brokers, &topic, 4).await;
    let producer = kafka::producer(brokers);
    let ids: Vec<String> = (0..events).map(|_| Uuid::now_v7().to_string()).collect();
    let sends = ids.iter().enumerate().map(|(i, id)| {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "event-type",
                value: Some("Tick"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        let key = format!("k{}", i % 64);
        let payload = format!("{{\"n\":{i}}}");
        let producer = &producer;
        let topic = &topic;
        async move {
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(&key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    for result in futures::future::join_all(sends).await {
        result?;
    }
    Ok(topic)
}

/// Ceiling: a bare StreamConsumer reading the topic (no database), messages/s from the
/// first message on.
async fn raw_read_rate(brokers: &str, topic: &str, events: usize) -> anyhow::Result<f64> {
    use futures::StreamExt as _;
    use rdkafka::consumer::Consumer as _;
    let consumer = kafka::consumer(brokers, &format!("raw-{}", Uuid::new_v4().simple()));
    consumer.subscribe(&[topic])?;
    let mut stream = consumer.stream();
    let mut started = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for _ in 0..events {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("bare consumer did not finish within 120 s"))?;
        next.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        started.get_or_insert_with(Instant::now);
    }
    let elapsed = started.map(|t| t.elapsed()).unwrap_or_default();
    Ok(events.saturating_sub(1) as f64 / elapsed.as_secs_f64())
}

async fn inbox_throughput(
    brokers: &str,
    pool: &PgPool,
    topic: &str,
    events: usize,
    max_batch: usize,
) -> anyhow::Result<f64> {
    let applied = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let group = format!("bench-{}", Uuid::new_v4().simple());
    let consumer =
        InboxConsumer::builder(ConsumerOptions::new(brokers, &group, &group), pool.clone())
            .topic(topic)
            .handler("Tick", Effect(applied.clone()))
            .max_batch(max_batch)
            .on_delivery({
                let first = first.clone();
                move |_| {
                    first
                        .lock()
                        .map(|mut f| *f.get_or_insert_with(Instant::now))
                        .ok();
                    async {}
                }
            })
            .build()?;
    let cancel = CancellationToken::new();
    let task = consumer.spawn(cancel.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while applied.load(Ordering::SeqCst) < events {
        anyhow::ensure!(
            Instant::now() < deadline,
            "inbox did not finish within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = first
        .lock()
        .ok()
        .and_then(|f| *f)
        .map(|t| t.elapsed())
        .unwrap_or_default();
    cancel.cancel();
    task.await??;
    Ok(events.saturating_sub(1) as f64 / elapsed.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let db = TestDatabase::create_with_pool_size(16).await;
    let guard = ProcessedEvents::new("bench");
    guard.migrate(&db.pool).await?;
    sqlx::query("CREATE TABLE effects (id bigserial PRIMARY KEY, event_id uuid NOT NULL)")
        .execute(&db.pool)
        .await?;

    println!("eventful-idempotency guard overhead ({EVENTS} events per measurement, median of {ROUNDS} interleaved rounds)");
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "mode", "1 conn ev/s", "8 conns ev/s", "overhead"
    );
    let modes = [
        ("no guard", Mode::NoGuard),
        ("guard, first delivery", Mode::GuardFirst),
        ("guard, duplicate", Mode::GuardDuplicate),
    ];
    let mut results = vec![(Vec::new(), Vec::new()); modes.len()];
    for _ in 0..ROUNDS {
        for concurrency in [1, 8] {
            // First deliveries use fresh ids; duplicates replay the ids just recorded.
            let ids: Arc<Vec<Uuid>> = Arc::new((0..EVENTS).map(|_| Uuid::now_v7()).collect());
            for (i, (_, mode)) in modes.iter().enumerate() {
                let rate = run(&db.pool, &guard, *mode, ids.clone(), concurrency).await?;
                if concurrency == 1 {
                    results[i].0.push(rate)
                } else {
                    results[i].1.push(rate)
                }
            }
        }
    }
    let baseline = (median(results[0].0.clone()), median(results[0].1.clone()));
    for (i, (name, _)) in modes.iter().enumerate() {
        let (one, eight) = (median(results[i].0.clone()), median(results[i].1.clone()));
        let overhead = if i == 0 {
            "-".to_owned()
        } else {
            format!(
                "{:+.0}% / {:+.0}%",
                (one / baseline.0 - 1.0) * 100.0,
                (eight / baseline.1 - 1.0) * 100.0
            )
        };
        println!("{name:<28} {one:>12.0} {eight:>12.0} {overhead:>12}");
    }
    if std::env::var("BENCH_SKIP_KAFKA").is_ok_and(|v| v == "1") {
        println!(
            "{:<28} {:>12}",
            "inbox runtime", "skipped (BENCH_SKIP_KAFKA=1)"
        );
    } else {
        // Two topics with the same content, both read cold: the bare consumer is the
        // broker's ceiling for the inbox.
        // A private broker (SQLite storage), so other suites' load on the shared one does
        // not skew the figure.
        let broker = KafkaBroker::start().await;
        let brokers = broker.brokers();
        let batches: Vec<usize> = std::env::var("BENCH_INBOX_BATCHES")
            .unwrap_or_else(|_| "1,64".into())
            .split(',')
            .map(|b| b.trim().parse())
            .collect::<Result<_, _>>()?;
        let raw_topic = fill_topic(&brokers, INBOX_EVENTS).await?;
        let mut inbox_topics = Vec::new();
        for _ in &batches {
            inbox_topics.push(fill_topic(&brokers, INBOX_EVENTS).await?);
        }
        let raw = match raw_read_rate(&brokers, &raw_topic, INBOX_EVENTS).await {
            Ok(raw) => {
                println!(
                    "{:<28} {:>25.0}   (ceiling: bare StreamConsumer, no DB, cold topic)",
                    "broker read", raw
                );
                Some(raw)
            }
            Err(e) => {
                println!("{:<28} {:>25}   ({e})", "broker read", "failed");
                None
            }
        };
        for (batch, topic) in batches.iter().zip(&inbox_topics) {
            let name = format!("inbox runtime, batch {batch}");
            match inbox_throughput(&brokers, &db.pool, topic, INBOX_EVENTS, *batch).await {
                Ok(rate) => {
                    let share = raw
                        .map(|raw| format!("{:.1}% of broker read; ", rate / raw * 100.0))
                        .unwrap_or_default();
                    println!(
                        "{name:<28} {rate:>25.0}   ({share}4 partitions: fetch, envelope, guard, handler, offsets; cold topic)"
                    )
                }
                Err(e) => println!("{name:<28} {:>25}   ({e})", "failed"),
            }
        }
    }
    Ok(())
}
