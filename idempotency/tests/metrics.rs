//! The inbox's instruments in the `metrics` facade (feature `metrics`), read from a
//! process-wide recorder, against the real PostgreSQL and Kafka. Each test has its own
//! topic and consumer group (the labels), so parallel tests read only their own series.

use std::time::Duration;

use async_trait::async_trait;
use eventful_idempotency::{ConsumerOptions, EventHandler, EventMeta, HandlerError, InboxConsumer};
use eventful_test_support::metrics::{counter, gauge, histogram, install};
use eventful_test_support::{kafka, wait_until, TestDatabase};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(serde::Deserialize)]
struct Payload {
    n: i64,
}

/// Applies nothing but waits for the gate on event `n == 1` (when there is a gate).
struct Gated(Option<watch::Receiver<bool>>);

#[async_trait]
impl EventHandler for Gated {
    type Payload = Payload;

    async fn handle(
        &self,
        _tx: &mut sqlx::PgConnection,
        _event: &EventMeta,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        if let (1, Some(gate)) = (payload.n, &self.0) {
            let mut gate = gate.clone();
            let _ = gate.wait_for(|open| *open).await;
        }
        Ok(())
    }
}

/// Sends an `OrderPlaced` with `id` (no `event-id` header when `None`: a malformed envelope).
async fn send(producer: &FutureProducer, topic: &str, id: Option<Uuid>, n: i64) {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "event-type",
        value: Some("OrderPlaced"),
    });
    let id = id.map(|id| id.to_string());
    if let Some(id) = &id {
        headers = headers.insert(Header {
            key: "event-id",
            value: Some(id.as_str()),
        });
    }
    let payload = serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap();
    producer
        .send(
            FutureRecord::to(topic)
                .key("k")
                .payload(&payload)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

async fn setup() -> (TestDatabase, String, String, FutureProducer) {
    install();
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    eventful_idempotency::migrate(&db.pool).await.unwrap();
    let brokers = kafka::brokers();
    kafka::require_broker(&brokers).await;
    let topic = kafka::create_topic(1).await;
    let group = format!("inbox-metrics-{}", Uuid::new_v4().simple());
    (db, topic, group, kafka::producer(&brokers))
}

fn consumer(db: &TestDatabase, topic: &str, group: &str, handler: Gated) -> InboxConsumer {
    let options = ConsumerOptions::new(kafka::brokers(), group, group)
        .set("session.timeout.ms", "30000")
        .set("statistics.interval.ms", "100");
    InboxConsumer::builder(options, db.pool.clone())
        .topic(topic)
        .handler("OrderPlaced", handler)
        .build()
        .unwrap()
}

/// Three events, a redelivered copy of one and a malformed message: applied 3, duplicates 1,
/// dead letters 1, and one handler latency sample per handler run (3).
#[tokio::test]
async fn outcomes_and_handler_latency_reach_the_recorder() {
    let (db, topic, group, producer) = setup().await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        send(&producer, &topic, Some(*id), n as i64 + 10).await;
    }
    send(&producer, &topic, Some(ids[0]), 10).await;
    send(&producer, &topic, None, 99).await;

    let cancel = CancellationToken::new();
    let handle = consumer(&db, &topic, &group, Gated(None)).spawn(cancel.clone());
    let labels = [("consumer", group.as_str()), ("topic", topic.as_str())];
    wait_until("five messages settled", Duration::from_secs(30), || async {
        counter("eventful_inbox_applied_total", &labels)
            + counter("eventful_inbox_duplicates_total", &labels)
            + counter("eventful_inbox_dead_letters_total", &labels)
            == 5
    })
    .await;
    assert_eq!(counter("eventful_inbox_applied_total", &labels), 3);
    assert_eq!(counter("eventful_inbox_duplicates_total", &labels), 1);
    assert_eq!(counter("eventful_inbox_dead_letters_total", &labels), 1);
    assert_eq!(counter("eventful_inbox_skipped_total", &labels), 0);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM eventful_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 1, "the counted dead letter is in the table");
    let latencies = histogram(
        "eventful_inbox_handler_duration_seconds",
        &[("consumer", group.as_str()), ("event_type", "OrderPlaced")],
    );
    assert_eq!(
        latencies.len(),
        3,
        "one sample per handler run: {latencies:?}"
    );
    assert!(latencies.iter().all(|s| (0.0..30.0).contains(s)));
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// A handler stuck on the second event: the partition's lag gauge (from librdkafka's
/// statistics) shows the 10 unsettled messages, then drops to 0 once it goes on.
#[tokio::test]
async fn partition_lag_follows_the_unsettled_messages() {
    let (db, topic, group, producer) = setup().await;
    let (open, gate) = watch::channel(false);
    let cancel = CancellationToken::new();
    let handle = consumer(&db, &topic, &group, Gated(Some(gate))).spawn(cancel.clone());
    // Event 0 settles first (so a stored offset exists); event 1 blocks; 2..=10 wait.
    send(&producer, &topic, Some(Uuid::now_v7()), 0).await;
    let applied = [("consumer", group.as_str())];
    wait_until("event 0 is applied", Duration::from_secs(30), || async {
        counter("eventful_inbox_applied_total", &applied) == 1
    })
    .await;
    for n in 1..=10 {
        send(&producer, &topic, Some(Uuid::now_v7()), n).await;
    }
    let labels = [
        ("group", group.as_str()),
        ("topic", topic.as_str()),
        ("partition", "0"),
    ];
    wait_until(
        "the lag gauge shows 10 unsettled messages",
        Duration::from_secs(30),
        || async { gauge("eventful_inbox_lag", &labels) == Some(10.0) },
    )
    .await;
    open.send(true).unwrap();
    wait_until("the lag drops to 0", Duration::from_secs(30), || async {
        gauge("eventful_inbox_lag", &labels) == Some(0.0)
    })
    .await;
    wait_until(
        "all 11 events are applied",
        Duration::from_secs(30),
        || async { counter("eventful_inbox_applied_total", &applied) == 11 },
    )
    .await;
    cancel.cancel();
    handle.await.unwrap().unwrap();
}
