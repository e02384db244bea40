//! The inbox consumer runtime against the real PostgreSQL and the shared Apache Kafka broker,
//! each test on its own topics and consumer groups. Tests that generate load or abort
//! consumers mid-flight are named `serial_` and run alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventful_idempotency::{
    ConsumerOptions, DeadLetter, Delivery, EventHandler, EventMeta, HandlerError, InboxConsumer,
    Outcome, UnknownEventType,
};
use eventful_test_support::{kafka, wait_until, TestDatabase};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(serde::Deserialize)]
struct Payload {
    n: i64,
    #[serde(default)]
    poison: bool,
}

/// Writes one row per application into `effects` (no unique constraint: duplicates would show).
struct RecordEffect {
    instance: &'static str,
}

#[async_trait]
impl EventHandler for RecordEffect {
    type Payload = Payload;

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &EventMeta,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        if payload.poison {
            return Err(HandlerError::permanent(format!(
                "poisoned order {}",
                payload.n
            )));
        }
        sqlx::query(
            "INSERT INTO effects (event_id, n, key, partition, \"offset\", instance) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(event.id)
        .bind(payload.n)
        .bind(&event.key)
        .bind(event.partition)
        .bind(event.offset)
        .bind(self.instance)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Fails transiently `failures` times for event `target`, then behaves like `RecordEffect`.
struct Flaky {
    inner: RecordEffect,
    target: Uuid,
    failures: u32,
    attempts: Arc<Mutex<HashMap<Uuid, u32>>>,
}

#[async_trait]
impl EventHandler for Flaky {
    type Payload = Payload;

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &EventMeta,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(event.id).or_default();
            *n += 1;
            *n
        };
        // Write first, then fail: the rollback must discard the write.
        self.inner.handle(tx, event, payload).await?;
        if event.id == self.target && attempt <= self.failures {
            return Err(HandlerError::transient(format!("flaky attempt {attempt}")));
        }
        Ok(())
    }
}

async fn database() -> TestDatabase {
    let db = TestDatabase::create_with_pool_size(20).await;
    eventful_idempotency::migrate(&db.pool).await.unwrap();
    sqlx::query(
        "CREATE TABLE effects (seq bigserial PRIMARY KEY, event_id uuid NOT NULL, n bigint NOT NULL, \
         key text NOT NULL, partition int NOT NULL, \"offset\" bigint NOT NULL, instance text NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db
}

fn options(brokers: &str, group: &str) -> ConsumerOptions {
    // Generous session timeout: the machine and the shared broker are loaded by other suites.
    ConsumerOptions::new(brokers, group, group)
        .set("session.timeout.ms", "30000")
        .set("heartbeat.interval.ms", "1000")
}

/// Every delivery reported by one consumer instance.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Delivery>>>);

impl Log {
    fn count(&self, f: impl Fn(&Delivery) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|d| f(d)).count()
    }
    fn all(&self) -> Vec<Delivery> {
        self.0.lock().unwrap().clone()
    }
}

fn start(
    brokers: &str,
    group: &str,
    topic: &str,
    pool: &PgPool,
    handler: impl EventHandler<Payload = Payload>,
    log: &Log,
    configure: impl FnOnce(
        eventful_idempotency::InboxConsumerBuilder,
    ) -> eventful_idempotency::InboxConsumerBuilder,
) -> (
    CancellationToken,
    JoinHandle<Result<(), eventful_idempotency::Error>>,
) {
    let log = log.clone();
    let builder = InboxConsumer::builder(options(brokers, group), pool.clone())
        .topic(topic)
        .handler("OrderPlaced", handler)
        .backoff(eventful_idempotency::Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        ))
        .on_delivery(move |delivery| {
            log.0.lock().unwrap().push(delivery);
            async {}
        });
    let consumer = configure(builder).build().unwrap();
    let cancel = CancellationToken::new();
    (cancel.clone(), consumer.spawn(cancel))
}

struct Event {
    id: Option<String>,
    event_type: &'static str,
    key: String,
    payload: Vec<u8>,
}

fn order(id: Uuid, n: i64, key: String) -> Event {
    Event {
        id: Some(id.hyphenated().to_string()),
        event_type: "OrderPlaced",
        key,
        payload: serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap(),
    }
}

/// Produces `events` in order per key (all sends started, then awaited together).
async fn produce(producer: &FutureProducer, topic: &str, events: &[Event]) {
    let sends = events.iter().map(|event| {
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-type",
                value: Some(event.event_type),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
            .insert(Header {
                key: "traceparent",
                value: Some("00-abc-def-01"),
            });
        if let Some(id) = &event.id {
            headers = headers.insert(Header {
                key: "event-id",
                value: Some(id.as_str()),
            });
        }
        producer.send(
            FutureRecord::to(topic)
                .key(event.key.as_str())
                .payload(event.payload.as_slice())
                .headers(headers),
            Duration::from_secs(30),
        )
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(e, _)| e).unwrap();
    }
}

/// `(offset, event_id, event_type, key, payload, headers, error)` of a dead letter.
type DeadLetterRow = (
    i64,
    Option<Uuid>,
    Option<String>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    serde_json::Value,
    String,
);

/// The shared broker (`KAFKA_BROKERS`); every test has its own topics and groups.
async fn shared_broker() -> String {
    let brokers = kafka::brokers();
    kafka::require_broker(&brokers).await;
    brokers
}

async fn topic_on(brokers: &str, partitions: i32) -> String {
    let topic = format!("inbox-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(brokers, &topic, partitions).await;
    topic
}

async fn effects(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// 1,000 events, each produced twice and every tenth three times, shuffled, consumed by two
/// instances of one group while the group rebalances (B joins mid-stream, A leaves
/// mid-stream): every effect is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_thousand_events_delivered_repeatedly_apply_once_across_two_consumers() {
    eventful_test_support::init_tracing();
    let db = database().await;
    let brokers = kafka::brokers();
    let topic = format!("inbox-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 4).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);

    let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
    let mut messages: Vec<(usize, u8)> = Vec::new();
    for i in 0..ids.len() {
        let copies = if i % 10 == 0 { 3 } else { 2 };
        for copy in 0..copies {
            messages.push((i, copy));
        }
    }
    {
        use rand::seq::SliceRandom as _;
        messages.shuffle(&mut rand::rng());
    }
    let total = messages.len();
    assert_eq!(total, 2100);
    let events: Vec<Event> = messages
        .iter()
        .map(|(i, _)| order(ids[*i], *i as i64, format!("customer-{}", i % 37)))
        .collect();

    let (log_a, log_b) = (Log::default(), Log::default());
    let (cancel_a, task_a) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "a" },
        &log_a,
        |b| b,
    );
    produce(&producer, &topic, &events[..total / 2]).await;
    wait_until(
        "A has processed 200 messages",
        Duration::from_secs(60),
        || {
            let log = log_a.clone();
            async move { log.count(|_| true) >= 200 }
        },
    )
    .await;
    let (cancel_b, task_b) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "b" },
        &log_b,
        |b| b,
    );
    // The second half arrives as a stream while B joins, so that both instances apply
    // part of it: produced at once, it can all be applied by A before the broker hands B
    // its partitions.
    for chunk in events[total / 2..].chunks(25) {
        produce(&producer, &topic, chunk).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_until(
        "B has processed 200 messages",
        Duration::from_secs(90),
        || {
            let log = log_b.clone();
            async move { log.count(|_| true) >= 200 }
        },
    )
    .await;
    // A leaves gracefully mid-stream; B takes over its partitions.
    cancel_a.cancel();
    task_a.await.unwrap().unwrap();

    let pool = db.pool.clone();
    wait_until("every event is applied", Duration::from_secs(120), || {
        let pool = pool.clone();
        async move { effects(&pool).await.1 == 1000 }
    })
    .await;
    // Wait until every delivery is accounted for, then check nothing was applied twice.
    let (la, lb) = (log_a.clone(), log_b.clone());
    wait_until(
        "every message is processed",
        Duration::from_secs(60),
        || {
            let (la, lb) = (la.clone(), lb.clone());
            async move { la.count(|_| true) + lb.count(|_| true) >= total }
        },
    )
    .await;
    cancel_b.cancel();
    task_b.await.unwrap().unwrap();

    let (rows, distinct) = effects(&db.pool).await;
    assert_eq!(
        (rows, distinct),
        (1000, 1000),
        "each effect applied exactly once"
    );
    let applied = log_a.count(|d| d.outcome == Outcome::Applied)
        + log_b.count(|d| d.outcome == Outcome::Applied);
    let duplicates = log_a.count(|d| d.outcome == Outcome::Duplicate)
        + log_b.count(|d| d.outcome == Outcome::Duplicate);
    assert_eq!(applied, 1000);
    assert!(
        duplicates >= total - 1000,
        "{duplicates} duplicates recognised"
    );
    assert!(
        log_a.count(|d| d.outcome == Outcome::Applied) > 0,
        "A applied events"
    );
    assert!(
        log_b.count(|d| d.outcome == Outcome::Applied) > 0,
        "B applied events"
    );
    // Per key, effects were applied in log order: sorted by the offset of each event's first
    // copy in its partition.
    let mut first_offset: HashMap<Uuid, i64> = HashMap::new();
    for d in log_a.all().into_iter().chain(log_b.all()) {
        let id = d.event_id.unwrap();
        let entry = first_offset.entry(id).or_insert(d.offset);
        *entry = (*entry).min(d.offset);
    }
    assert_eq!(first_offset.len(), 1000);
    let rows: Vec<(String, Uuid, i64)> =
        sqlx::query_as("SELECT key, event_id, \"offset\" FROM effects ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut applied_order: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for (key, id, offset) in rows {
        applied_order
            .entry(key)
            .or_default()
            .push((first_offset[&id], offset));
    }
    for (key, applied) in &applied_order {
        let mut sorted = applied.clone();
        sorted.sort();
        assert_eq!(
            applied, &sorted,
            "key {key}: effects applied out of log order"
        );
    }
    let (guard_rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM eventful_processed_events WHERE consumer = $1")
            .bind(&group)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(guard_rows, 1000);
}

/// The consumer dies after its PostgreSQL commit and before its offset is stored: on
/// restart the message is redelivered, the guard reports it as a duplicate, nothing is
/// applied twice, and the rest of the partition is processed.
#[tokio::test]
async fn serial_crash_between_db_commit_and_offset_commit_redelivers_a_duplicate() {
    eventful_test_support::init_tracing();
    let db = database().await;
    let brokers = kafka::brokers();
    let topic = format!("inbox-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 1).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let events: Vec<Event> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| order(*id, i as i64, "k".into()))
        .collect();
    produce(&producer, &topic, &events).await;

    // First run: the hook for event 3 signals and then never returns, so the worker is stuck
    // after COMMIT and before store_offset. Then the consumer task is aborted (crash).
    let victim = ids[3];
    let (crashed_tx, crashed_rx) = tokio::sync::oneshot::channel::<()>();
    let crashed_tx = Arc::new(Mutex::new(Some(crashed_tx)));
    let log_1 = Log::default();
    let consumer = InboxConsumer::builder(options(&brokers, &group), db.pool.clone())
        .topic(&topic)
        .handler("OrderPlaced", RecordEffect { instance: "first" })
        // One transaction per event: the batched path has its own test below.
        .max_batch(1)
        .on_delivery({
            let log = log_1.clone();
            move |delivery: Delivery| {
                let hit = delivery.event_id == Some(victim);
                log.0.lock().unwrap().push(delivery);
                let signal = if hit {
                    crashed_tx.lock().unwrap().take()
                } else {
                    None
                };
                async move {
                    if let Some(signal) = signal {
                        let _ = signal.send(());
                        std::future::pending::<()>().await;
                    }
                }
            }
        })
        .build()
        .unwrap();
    let task = consumer.spawn(CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(60), crashed_rx)
        .await
        .unwrap()
        .unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(effects(&db.pool).await, (4, 4), "events 0..=3 committed");

    // Restart in the same group.
    let log_2 = Log::default();
    let (cancel, task) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "second" },
        &log_2,
        |b| b,
    );
    let pool = db.pool.clone();
    wait_until(
        "all six events are applied",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move { effects(&pool).await.0 >= 6 }
        },
    )
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();

    let redelivered: Vec<Delivery> = log_2
        .all()
        .into_iter()
        .filter(|d| d.event_id == Some(victim))
        .collect();
    assert_eq!(redelivered.len(), 1, "the victim was redelivered once");
    assert_eq!(
        redelivered[0].outcome,
        Outcome::Duplicate,
        "and recognised as a duplicate"
    );
    assert_eq!(effects(&db.pool).await, (6, 6), "nothing applied twice");
    let applied_second: Vec<Uuid> = log_2
        .all()
        .into_iter()
        .filter(|d| d.outcome == Outcome::Applied)
        .map(|d| d.event_id.unwrap())
        .collect();
    assert_eq!(applied_second, vec![ids[4], ids[5]]);
}

/// The same crash with batches: the victim's batch committed, offsets stored only up to the
/// victim; after the restart every event is applied exactly once and what was committed
/// comes back as a duplicate.
#[tokio::test]
async fn serial_crash_between_batch_commit_and_offset_commit_redelivers_duplicates() {
    eventful_test_support::init_tracing();
    let db = database().await;
    let brokers = kafka::brokers();
    let topic = format!("inbox-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 1).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let events: Vec<Event> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| order(*id, i as i64, "k".into()))
        .collect();
    produce(&producer, &topic, &events).await;

    // First run (batched, the default): the hook for event 3 signals and then never returns,
    // so the worker is stuck after its batch's COMMIT and before event 3's offset is
    // stored. Then the consumer task is aborted (crash).
    let victim = ids[3];
    let (crashed_tx, crashed_rx) = tokio::sync::oneshot::channel::<()>();
    let crashed_tx = Arc::new(Mutex::new(Some(crashed_tx)));
    let log_1 = Log::default();
    let consumer = InboxConsumer::builder(options(&brokers, &group), db.pool.clone())
        .topic(&topic)
        .handler("OrderPlaced", RecordEffect { instance: "first" })
        .on_delivery({
            let log = log_1.clone();
            move |delivery: Delivery| {
                let hit = delivery.event_id == Some(victim);
                log.0.lock().unwrap().push(delivery);
                let signal = if hit {
                    crashed_tx.lock().unwrap().take()
                } else {
                    None
                };
                async move {
                    if let Some(signal) = signal {
                        let _ = signal.send(());
                        std::future::pending::<()>().await;
                    }
                }
            }
        })
        .build()
        .unwrap();
    let task = consumer.spawn(CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(60), crashed_rx)
        .await
        .unwrap()
        .unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // The victim's batch committed whole (events after it included, when they shared it).
    let committed = effects(&db.pool).await;
    assert!(
        committed.0 >= 4 && committed.0 == committed.1,
        "{committed:?}"
    );

    // Restart in the same group.
    let log_2 = Log::default();
    let (cancel, task) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "second" },
        &log_2,
        |b| b,
    );
    // Everything may already be committed: wait for the restarted consumer to settle the
    // last event instead.
    let last = ids[5];
    wait_until(
        "the restarted consumer settles the last event",
        Duration::from_secs(60),
        || {
            let log = log_2.clone();
            async move { log.count(|d| d.event_id == Some(last)) >= 1 }
        },
    )
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();

    let redelivered: Vec<Delivery> = log_2
        .all()
        .into_iter()
        .filter(|d| d.event_id == Some(victim))
        .collect();
    assert_eq!(redelivered.len(), 1, "the victim was redelivered once");
    assert_eq!(
        redelivered[0].outcome,
        Outcome::Duplicate,
        "and recognised as a duplicate"
    );
    assert_eq!(effects(&db.pool).await, (6, 6), "nothing applied twice");
    // Every event applied exactly once over both runs; what the first run committed (reported
    // or not) comes back, if at all, as a duplicate.
    let applied_first: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM effects WHERE instance = 'first'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(applied_first.len() as i64, committed.0);
    for delivery in log_2.all() {
        let id = delivery.event_id.unwrap();
        let expected = if applied_first.contains(&id) {
            Outcome::Duplicate
        } else {
            Outcome::Applied
        };
        assert_eq!(delivery.outcome, expected, "{delivery:?}");
    }
    let applied: Vec<i64> = sqlx::query_scalar("SELECT n FROM effects ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied, (0..6).collect::<Vec<i64>>(), "once each, in order");
}

/// Unparseable messages, undecodable payloads, permanent handler errors and (with that
/// policy) unknown event types land in the dead-letter table with their error; the messages
/// after them are processed.
#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_table_and_the_partition_moves_on() {
    eventful_test_support::init_tracing();
    let db = database().await;
    let brokers = shared_broker().await;
    let topic = topic_on(&brokers, 1).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let good: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let poisoned = Uuid::now_v7();
    let bad_json = Uuid::now_v7();
    let unknown = Uuid::now_v7();
    let events = vec![
        order(good[0], 0, "k".into()),
        Event {
            id: None,
            event_type: "OrderPlaced",
            key: "k".into(),
            payload: b"{\"n\":1}".to_vec(),
        },
        Event {
            id: Some("not-a-uuid".into()),
            event_type: "OrderPlaced",
            key: "k".into(),
            payload: b"{\"n\":1}".to_vec(),
        },
        Event {
            id: Some(bad_json.to_string()),
            event_type: "OrderPlaced",
            key: "k".into(),
            payload: b"{\"n\": \"seven\"".to_vec(),
        },
        Event {
            id: Some(poisoned.to_string()),
            event_type: "OrderPlaced",
            key: "k".into(),
            payload: serde_json::to_vec(&serde_json::json!({"n": 2, "poison": true})).unwrap(),
        },
        Event {
            id: Some(unknown.to_string()),
            event_type: "OrderShipped",
            key: "k".into(),
            payload: b"{}".to_vec(),
        },
        order(good[1], 3, "k".into()),
        order(good[2], 4, "k".into()),
    ];
    produce(&producer, &topic, &events).await;
    let log = Log::default();
    let (cancel, task) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "a" },
        &log,
        |b| {
            b.unknown_event_types(UnknownEventType::DeadLetter)
                .dead_letter(DeadLetter::Table)
        },
    );
    let pool = db.pool.clone();
    wait_until(
        "the good events are applied",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move { effects(&pool).await.0 >= 3 }
        },
    )
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(effects(&db.pool).await, (3, 3));
    let rows: Vec<DeadLetterRow> = sqlx::query_as(
        "SELECT \"offset\", event_id, event_type, key, payload, headers, error \
             FROM eventful_dead_letters WHERE consumer = $1 AND topic = $2 ORDER BY \"offset\"",
    )
    .bind(&group)
    .bind(&topic)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 5, "{rows:?}");
    let offsets: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
    assert!(
        rows[0].6.contains("missing header `event-id`"),
        "{}",
        rows[0].6
    );
    assert!(rows[1].6.contains("invalid event-id"), "{}", rows[1].6);
    assert_eq!(rows[2].1, Some(bad_json));
    assert!(
        rows[2].6.contains("payload does not decode"),
        "{}",
        rows[2].6
    );
    assert_eq!(
        rows[2].4.as_deref(),
        Some(&b"{\"n\": \"seven\""[..]),
        "original payload kept"
    );
    assert_eq!(rows[3].1, Some(poisoned));
    assert!(rows[3].6.contains("poisoned order 2"), "{}", rows[3].6);
    assert_eq!(rows[4].2.as_deref(), Some("OrderShipped"));
    assert!(rows[4].6.contains("no handler"), "{}", rows[4].6);
    assert_eq!(rows[0].3.as_deref(), Some(&b"k"[..]));
    assert!(
        rows[0].5.to_string().contains("traceparent"),
        "headers kept"
    );
    assert_eq!(
        log.count(|d| matches!(d.outcome, Outcome::DeadLettered { .. })),
        5
    );
    // The poisoned event is not recorded as processed: nothing of it was applied.
    let (recorded,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM eventful_processed_events WHERE event_id = $1")
            .bind(poisoned)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 0);
}

/// With the default policy unknown event types are skipped; with `DeadLetter::Topic` poison
/// messages are republished with the error in headers.
#[tokio::test]
async fn unknown_types_are_skipped_and_poison_goes_to_a_dead_letter_topic() {
    eventful_test_support::init_tracing();
    let db = database().await;
    let brokers = shared_broker().await;
    let topic = topic_on(&brokers, 1).await;
    let dlt = topic_on(&brokers, 1).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let ok = Uuid::now_v7();
    let poisoned = Uuid::now_v7();
    let events = vec![
        Event {
            id: Some(Uuid::now_v7().to_string()),
            event_type: "Unrelated",
            key: "k".into(),
            payload: b"{}".to_vec(),
        },
        Event {
            id: Some(poisoned.to_string()),
            event_type: "OrderPlaced",
            key: "k".into(),
            payload: serde_json::to_vec(&serde_json::json!({"n": 9, "poison": true})).unwrap(),
        },
        order(ok, 1, "k".into()),
    ];
    produce(&producer, &topic, &events).await;
    let log = Log::default();
    let (cancel, task) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "a" },
        &log,
        |b| b.dead_letter(DeadLetter::Topic(dlt.clone())),
    );
    let pool = db.pool.clone();
    wait_until("the good event is applied", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { effects(&pool).await.0 >= 1 }
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(log.count(|d| d.outcome == Outcome::Skipped), 1);
    let dead = kafka::read_all(&brokers, &dlt, 1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].header("event-id"),
        Some(poisoned.to_string().as_str())
    );
    assert_eq!(dead[0].header("dead-letter-topic"), Some(topic.as_str()));
    assert_eq!(dead[0].header("dead-letter-offset"), Some("1"));
    assert!(dead[0]
        .header("dead-letter-error")
        .unwrap()
        .contains("poisoned order 9"));
    assert_eq!(dead[0].key.as_deref(), Some(&b"k"[..]));
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM eventful_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 0,
        "nothing in the table when the topic is the destination"
    );
}

/// A transient failure is retried with backoff (its writes rolled back each time) and the
/// partition waits: effects are applied in order, the flaky event once.
#[tokio::test]
async fn transient_errors_are_retried_in_order() {
    eventful_test_support::init_tracing();
    let db = database().await;
    let brokers = shared_broker().await;
    let topic = topic_on(&brokers, 1).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let events: Vec<Event> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| order(*id, i as i64, "k".into()))
        .collect();
    produce(&producer, &topic, &events).await;
    let attempts = Arc::new(Mutex::new(HashMap::new()));
    let handler = Flaky {
        inner: RecordEffect { instance: "a" },
        target: ids[4],
        failures: 3,
        attempts: attempts.clone(),
    };
    let log = Log::default();
    // A buffer of 2: while event 4 is retried the partition fills up and is paused, which
    // must not lose or reorder anything.
    let (cancel, task) = start(&brokers, &group, &topic, &db.pool, handler, &log, |b| {
        b.partition_buffer(2)
    });
    let pool = db.pool.clone();
    wait_until("all events are applied", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { effects(&pool).await.0 >= 10 }
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    let order: Vec<i64> = sqlx::query_scalar("SELECT n FROM effects ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(order, (0..10).collect::<Vec<i64>>(), "in order, once each");
    assert_eq!(attempts.lock().unwrap()[&ids[4]], 4);
    let flaky: Vec<Delivery> = log
        .all()
        .into_iter()
        .filter(|d| d.event_id == Some(ids[4]))
        .collect();
    assert_eq!(flaky.len(), 1);
    assert_eq!(flaky[0].attempts, 4);
    assert_eq!(flaky[0].outcome, Outcome::Applied);
}

/// `max_attempts` turns a transient failure that never clears into a dead letter.
#[tokio::test]
async fn exhausted_retries_are_dead_lettered() {
    let db = database().await;
    let brokers = shared_broker().await;
    let topic = topic_on(&brokers, 1).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let events: Vec<Event> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| order(*id, i as i64, "k".into()))
        .collect();
    produce(&producer, &topic, &events).await;
    let handler = Flaky {
        inner: RecordEffect { instance: "a" },
        target: ids[1],
        failures: u32::MAX,
        attempts: Arc::new(Mutex::new(HashMap::new())),
    };
    let log = Log::default();
    let (cancel, task) = start(&brokers, &group, &topic, &db.pool, handler, &log, |b| {
        b.max_attempts(3)
    });
    let pool = db.pool.clone();
    wait_until("the others are applied", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { effects(&pool).await.0 >= 2 }
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    let (error,): (String,) =
        sqlx::query_as("SELECT error FROM eventful_dead_letters WHERE event_id = $1")
            .bind(ids[1])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(error.contains("gave up after 3 attempts"), "{error}");
    assert_eq!(effects(&db.pool).await, (2, 2));
}

/// Graceful shutdown commits the offsets of everything processed: a restarted consumer of
/// the same group receives only new messages.
#[tokio::test]
async fn graceful_shutdown_commits_offsets() {
    let db = database().await;
    let brokers = shared_broker().await;
    let topic = topic_on(&brokers, 2).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let events: Vec<Event> = (0..20)
        .map(|i| order(Uuid::now_v7(), i, format!("k{i}")))
        .collect();
    produce(&producer, &topic, &events).await;
    let log_1 = Log::default();
    let (cancel, task) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "a" },
        &log_1,
        |b| b,
    );
    let pool = db.pool.clone();
    wait_until("20 applied", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { effects(&pool).await.0 >= 20 }
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();

    let log_2 = Log::default();
    let (cancel, task) = start(
        &brokers,
        &group,
        &topic,
        &db.pool,
        RecordEffect { instance: "b" },
        &log_2,
        |b| b,
    );
    let late = Uuid::now_v7();
    produce(&producer, &topic, &[order(late, 20, "k0".into())]).await;
    let pool = db.pool.clone();
    wait_until("the late event is applied", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { effects(&pool).await.0 >= 21 }
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    let seen: Vec<Option<Uuid>> = log_2.all().into_iter().map(|d| d.event_id).collect();
    assert_eq!(
        seen,
        vec![Some(late)],
        "no redelivery after a graceful shutdown"
    );
}

/// Blocks one event until the test heals it.
struct Blocked {
    inner: RecordEffect,
    target: Uuid,
    healed: Arc<std::sync::atomic::AtomicBool>,
    attempts: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait]
impl EventHandler for Blocked {
    type Payload = Payload;

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &EventMeta,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        use std::sync::atomic::Ordering;
        if event.id == self.target && !self.healed.load(Ordering::SeqCst) {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::transient("dependency down"));
        }
        self.inner.handle(tx, event, payload).await
    }
}

/// A partition stuck retrying does not hold up the others, and resumes in order once the
/// failure clears.
#[tokio::test]
async fn a_stuck_partition_does_not_block_the_others() {
    use std::sync::atomic::Ordering;
    let db = database().await;
    let brokers = shared_broker().await;
    let topic = topic_on(&brokers, 2).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let stuck: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let free: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    for (partition, ids) in [(0, &stuck), (1, &free)] {
        for (i, id) in ids.iter().enumerate() {
            let id = id.to_string();
            let payload = serde_json::json!({ "n": i }).to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "event-id",
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: "event-type",
                    value: Some("OrderPlaced"),
                });
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(partition)
                        .key(&format!("p{partition}"))
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let handler = Blocked {
        inner: RecordEffect { instance: "a" },
        target: stuck[1],
        healed: healed.clone(),
        attempts: attempts.clone(),
    };
    let log = Log::default();
    let (cancel, task) = start(&brokers, &group, &topic, &db.pool, handler, &log, |b| b);
    let pool = db.pool.clone();
    wait_until(
        "partition 1 is fully applied",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                let (n,): (i64,) =
                    sqlx::query_as("SELECT count(*) FROM effects WHERE partition = 1")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                n == 5
            }
        },
    )
    .await;
    let a = attempts.clone();
    wait_until(
        "the stuck event was retried",
        Duration::from_secs(30),
        || {
            let a = a.clone();
            async move { a.load(Ordering::SeqCst) >= 3 }
        },
    )
    .await;
    let on_stuck: Vec<i64> =
        sqlx::query_scalar("SELECT n FROM effects WHERE partition = 0 ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        on_stuck,
        vec![0],
        "partition 0 waits behind its failing event"
    );
    healed.store(true, Ordering::SeqCst);
    let pool = db.pool.clone();
    wait_until("partition 0 catches up", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { effects(&pool).await.0 == 10 }
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();
    let on_stuck: Vec<i64> =
        sqlx::query_scalar("SELECT n FROM effects WHERE partition = 0 ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        on_stuck,
        vec![0, 1, 2, 3, 4],
        "in order after the failure cleared"
    );
}

/// Panics (like an out-of-bounds index) on one event, records the others.
struct Panicky {
    inner: RecordEffect,
    target: Uuid,
    panics: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait]
impl EventHandler for Panicky {
    type Payload = Payload;

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &EventMeta,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        // Write first, then panic: the rollback must discard the write.
        self.inner.handle(tx, event, payload).await?;
        if event.id == self.target {
            self.panics
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let plan: Vec<u32> = Vec::new();
            let step = 3;
            let _ = plan[step];
        }
        Ok(())
    }
}

/// A handler that panics on one event does not kill its partition: the event is retried,
/// then dead-lettered with the panic message, the events after it are applied once, and
/// the consumer keeps consuming.
#[tokio::test]
async fn a_panicking_handler_dead_letters_its_event_and_the_partition_goes_on() {
    use std::sync::atomic::Ordering;
    eventful_test_support::init_tracing();
    let db = database().await;
    let brokers = shared_broker().await;
    let topic = topic_on(&brokers, 1).await;
    let group = format!("inbox-{}", Uuid::new_v4().simple());
    let producer = kafka::producer(&brokers);
    let (poison, good1, good2, late) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    produce(
        &producer,
        &topic,
        &[
            order(poison, 0, "k".into()),
            order(good1, 1, "k".into()),
            order(good2, 2, "k".into()),
        ],
    )
    .await;
    let panics = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let handler = Panicky {
        inner: RecordEffect { instance: "a" },
        target: poison,
        panics: panics.clone(),
    };
    let log = Log::default();
    let (cancel, task) = start(&brokers, &group, &topic, &db.pool, handler, &log, |b| b);
    let pool = db.pool.clone();
    wait_until(
        "good1 and good2 are applied",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move { effects(&pool).await.0 >= 2 }
        },
    )
    .await;
    // The consumer keeps consuming after the panic.
    produce(&producer, &topic, &[order(late, 3, "k".into())]).await;
    let pool = db.pool.clone();
    wait_until("the late event is applied", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move { effects(&pool).await.0 >= 3 }
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();

    let applied: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT event_id, count(*) FROM effects GROUP BY event_id ORDER BY min(seq)",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        applied,
        vec![(good1, 1), (good2, 1), (late, 1)],
        "the good events once each, nothing of the poison"
    );
    let (error,): (String,) = sqlx::query_as(
        "SELECT error FROM eventful_dead_letters WHERE consumer = $1 AND event_id = $2",
    )
    .bind(&group)
    .bind(poison)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(error.contains("panicked"), "{error}");
    assert!(error.contains("index out of bounds"), "{error}");
    assert!(
        panics.load(Ordering::SeqCst) >= 1,
        "the poison reached the handler"
    );
    let poisoned: Vec<Delivery> = log
        .all()
        .into_iter()
        .filter(|d| d.event_id == Some(poison))
        .collect();
    assert_eq!(poisoned.len(), 1);
    assert!(matches!(poisoned[0].outcome, Outcome::DeadLettered { .. }));
    assert_eq!(
        poisoned[0].attempts,
        panics.load(Ordering::SeqCst),
        "every attempt panicked"
    );
}
