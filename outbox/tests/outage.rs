//! Guarantee 5: the broker stops answering for 30 s (SIGSTOP on a private broker). Events
//! accumulate, the relay backs off instead of busy-looping, and everything drains in
//! commit order per key when the broker returns.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventful_outbox::{KafkaPublisher, NewEvent, Relay};
use eventful_test_support::{kafka, wait_until, KafkaBroker};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_broker_paused_for_30s_backs_off_and_drains_in_order() {
    let (db, outbox) = common::setup().await;
    let broker = KafkaBroker::start().await;
    let brokers = broker.brokers();
    let topic = format!("outage-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 3).await;

    let kafka = KafkaPublisher::builder(&brokers)
        .message_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let publisher = common::Recording::new(Arc::new(kafka));
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .backoff(eventful_outbox::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(4),
        ))
        .max_attempts(1000)
        .poll_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());

    let mut expected: HashMap<String, Vec<Uuid>> = HashMap::new();
    let mut n = 0;
    let mut record = |count: usize| {
        let events: Vec<NewEvent> = (0..count)
            .map(|_| {
                n += 1;
                NewEvent::json(&topic, format!("key-{}", n % 10), "Tick", &n).unwrap()
            })
            .collect();
        for e in &events {
            expected.entry(e.key().to_owned()).or_default().push(e.id());
        }
        let pool = db.pool.clone();
        let outbox = outbox.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox.record_all(&mut *tx, events).await.unwrap();
            tx.commit().await.unwrap();
        }
    };

    record(50).await;
    wait_until(
        "the first events are published",
        Duration::from_secs(60),
        || async { common::published_count(&db).await == 50 },
    )
    .await;

    broker.pause();
    let paused_at = Instant::now();
    let batches_before = publisher.batches.load(Ordering::Relaxed);
    // Keep committing during the outage.
    let mut recorded_during = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while paused_at.elapsed() < OUTAGE {
        tick.tick().await;
        record(5).await;
        recorded_during += 5;
    }
    let batches_during = publisher.batches.load(Ordering::Relaxed) - batches_before;
    let stats = outbox.stats(&db.pool).await.unwrap();
    let max_attempts: i32 = sqlx::query_scalar("SELECT max(attempts) FROM eventful_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    broker.resume();

    // Events accumulated instead of being dropped.
    assert!(
        stats.pending >= recorded_during as i64,
        "{stats:?}, recorded {recorded_during}"
    );
    assert_eq!(stats.parked, 0);
    assert!(stats.oldest_pending_age.unwrap() >= OUTAGE - Duration::from_secs(2));
    // Back-off: each attempt costs a 3 s delivery timeout plus a growing delay (0.2 s … 4 s),
    // so 30 s allow at most ~10 attempts per key and a few dozen batches; a busy loop on a
    // 200 ms poll would make hundreds.
    assert!(max_attempts >= 2, "failures were retried: {max_attempts}");
    assert!(
        max_attempts <= 12,
        "attempts per event during the outage: {max_attempts}"
    );
    assert!(
        batches_during <= 60,
        "{batches_during} publish calls during the outage"
    );
    assert!(metrics.snapshot().retried >= 2);

    let total = 50 + recorded_during as i64;
    wait_until(
        "everything drains after the broker returns",
        Duration::from_secs(90),
        || async { common::published_count(&db).await == total },
    )
    .await;
    let all: HashSet<Uuid> = expected.values().flatten().copied().collect();
    let messages = common::read_topic(&brokers, &topic, &all, Duration::from_secs(60), None).await;
    common::assert_first_occurrences_in_commit_order(&messages, &expected);
    eprintln!(
        "outage: {recorded_during} events recorded during {OUTAGE:?}, {batches_during} publish calls, \
         max attempts {max_attempts}, {} messages on the topic for {} events",
        messages.len(),
        all.len()
    );
    cancel.cancel();
    handle.await.unwrap().unwrap();
}
