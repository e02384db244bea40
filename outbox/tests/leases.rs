//! Guarantee 4: relays share the work without publishing the same event concurrently, and a
//! dead relay's partitions are taken over within the lease bound.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventful_outbox::{KafkaPublisher, NewEvent, Relay};
use eventful_test_support::{kafka, wait_until, KafkaBroker};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_relays_never_publish_the_same_event_concurrently_and_take_over_a_dead_relay() {
    let (db, outbox) = common::setup().await;
    // A private broker: this test must not depend on other traffic on the shared one.
    let broker = KafkaBroker::start().await;
    let brokers = broker.brokers();
    let topic = format!("outbox-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 4).await;
    let publisher = common::Recording::new(Arc::new(KafkaPublisher::new(&brokers).unwrap()));
    let lease_ttl = Duration::from_secs(2);
    let cancel = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..3 {
        let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
            .batch_size(100)
            .lease_ttl(lease_ttl)
            .build()
            .unwrap();
        let id = relay.id();
        let metrics = relay.metrics();
        relays.push((id, metrics, relay.spawn(cancel.clone())));
    }
    wait_until(
        "the relays split the 64 partitions",
        Duration::from_secs(20),
        || async {
            let parts: Vec<u64> = relays
                .iter()
                .map(|(_, m, _)| m.snapshot().partitions)
                .collect();
            parts.iter().sum::<u64>() == 64 && parts.iter().all(|p| *p >= 15)
        },
    )
    .await;

    let record = |round: usize, count: usize| {
        let pool = db.pool.clone();
        let outbox = outbox.clone();
        let topic = topic.clone();
        async move {
            let mut ids = Vec::new();
            for chunk in 0..count / 10 {
                let events: Vec<NewEvent> = (0..10)
                    .map(|i| {
                        NewEvent::bytes(
                            &topic,
                            format!("key-{}", (chunk * 10 + i) % 60),
                            "E",
                            format!("{round}-{chunk}-{i}"),
                        )
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                ids.extend(outbox.record_all(&mut *tx, events).await.unwrap());
                tx.commit().await.unwrap();
            }
            ids
        }
    };
    let first_ids = record(0, 600).await;
    wait_until(
        "the first 600 events are published",
        Duration::from_secs(90),
        || async { common::published_count(&db).await == 600 },
    )
    .await;
    // No event was in flight in two batches at once, and each was acknowledged once.
    assert!(
        publisher.overlaps.lock().unwrap().is_empty(),
        "concurrent double publishing"
    );
    assert!(
        publisher.acks.lock().unwrap().values().all(|n| *n == 1),
        "an event was published twice"
    );
    let busy: Vec<u64> = relays
        .iter()
        .map(|(_, m, _)| m.snapshot().published)
        .collect();
    assert!(
        busy.iter().filter(|p| **p > 0).count() >= 2,
        "work is shared: {busy:?}"
    );

    // Kill relay 0; its leases stay in the table until they expire.
    let (dead_id, _, dead) = relays.remove(0);
    dead.abort();
    assert!(dead.await.unwrap_err().is_cancelled());
    let killed_at = Instant::now();
    let second_ids = record(1, 300).await;
    // Every partition is owned by a live relay again within TTL + one rebalance interval
    // (TTL/4); allow 2 s of scheduling slack on this shared 2-core machine.
    wait_until(
        "the dead relay's partitions are taken over",
        Duration::from_secs(30),
        || async {
            let (dead, live): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE owner = $1), \
                    count(*) FILTER (WHERE owner <> $1 AND expires_at > now()) \
             FROM eventful_outbox_leases",
            )
            .bind(dead_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            dead == 0 && live == 64
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover <= lease_ttl + lease_ttl / 4 + Duration::from_secs(2),
        "takeover took {takeover:?}"
    );
    wait_until(
        "the events of the dead relay's partitions are published too",
        Duration::from_secs(90),
        || async { common::published_count(&db).await == 900 },
    )
    .await;
    // Still no overlap and no second acknowledgement after the takeover.
    assert!(
        publisher.overlaps.lock().unwrap().is_empty(),
        "concurrent double publishing"
    );
    let acks = publisher.acks.lock().unwrap().clone();
    let all: HashSet<Uuid> = first_ids.iter().chain(&second_ids).copied().collect();
    assert_eq!(acks.len(), 900);
    assert!(
        acks.values().all(|n| *n == 1),
        "an event was published twice"
    );
    let messages = common::read_topic(
        &brokers,
        &topic,
        &all,
        Duration::from_secs(30),
        Some(Duration::from_secs(1)),
    )
    .await;
    assert_eq!(messages.len(), 900, "each event exactly once on the topic");
    cancel.cancel();
    for (_, _, r) in relays {
        r.await.unwrap().unwrap();
    }
}
