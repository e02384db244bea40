//! Guarantee 2: a relay killed between "broker acknowledged" and "marked published" loses
//! nothing: after a restart the events are published again.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use eventful_outbox::{Error, KafkaPublisher, NewEvent, OutboxRecord, Publisher, Relay};
use eventful_test_support::{kafka, wait_until, KafkaBroker};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Publishes to Kafka, reports which events the broker acknowledged, then hangs forever, so
/// the test can kill the relay exactly between the acknowledgement and the mark.
struct AckThenHang {
    inner: KafkaPublisher,
    acked: Mutex<Option<oneshot::Sender<Vec<Uuid>>>>,
}

#[async_trait]
impl Publisher for AckThenHang {
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        let results = self.inner.publish_batch(events).await;
        let acked = events
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(e, _)| e.id)
            .collect();
        if let Some(tx) = self.acked.lock().unwrap().take() {
            let _ = tx.send(acked);
        }
        std::future::pending().await
    }
}

#[tokio::test]
async fn serial_relay_killed_between_broker_ack_and_mark_republishes_after_restart() {
    let (db, outbox) = common::setup().await;
    // A private broker: this test must not depend on other traffic on the shared one.
    let broker = KafkaBroker::start().await;
    let brokers = broker.brokers();
    let topic = format!("outbox-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 3).await;
    let mut expected: HashMap<String, Vec<Uuid>> = HashMap::new();
    for i in 0..50 {
        let key = format!("account-{}", i % 5);
        let mut tx = db.pool.begin().await.unwrap();
        let id = outbox
            .record(
                &mut *tx,
                NewEvent::json(&topic, &key, "Deposited", &i).unwrap(),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        expected.entry(key).or_default().push(id);
    }

    let (acked_tx, acked_rx) = oneshot::channel();
    let hanging = AckThenHang {
        inner: KafkaPublisher::new(&brokers).unwrap(),
        acked: Mutex::new(Some(acked_tx)),
    };
    let lease_ttl = Duration::from_secs(1);
    let first = Relay::builder(db.pool.clone(), outbox.clone(), hanging)
        .batch_size(20)
        .lease_ttl(lease_ttl)
        .build()
        .unwrap()
        .spawn(CancellationToken::new());
    let acked = tokio::time::timeout(Duration::from_secs(30), acked_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        acked.len(),
        20,
        "the first batch was acknowledged by the broker"
    );
    // Kill the relay now: acknowledged by the broker, not marked in the table.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(common::published_count(&db).await, 0, "nothing was marked");
    let on_topic = common::read_topic(
        &brokers,
        &topic,
        &acked.iter().copied().collect(),
        Duration::from_secs(30),
        None,
    )
    .await;
    assert!(
        on_topic.len() >= 20,
        "the acknowledged events really are on the topic"
    );

    // More events arrive while no relay runs.
    for i in 50..60 {
        let key = format!("account-{}", i % 5);
        let mut tx = db.pool.begin().await.unwrap();
        let id = outbox
            .record(
                &mut *tx,
                NewEvent::json(&topic, &key, "Deposited", &i).unwrap(),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        expected.entry(key).or_default().push(id);
    }

    // Restart: a new relay takes over once the dead one's leases expire.
    let cancel = CancellationToken::new();
    let second = Relay::builder(
        db.pool.clone(),
        outbox.clone(),
        KafkaPublisher::new(&brokers).unwrap(),
    )
    .lease_ttl(lease_ttl)
    .build()
    .unwrap()
    .spawn(cancel.clone());
    wait_until(
        "every event is marked published",
        Duration::from_secs(30),
        || async { common::published_count(&db).await == 60 },
    )
    .await;
    let all: HashSet<Uuid> = expected.values().flatten().copied().collect();
    let messages = common::read_topic(
        &brokers,
        &topic,
        &all,
        Duration::from_secs(30),
        Some(Duration::from_secs(1)),
    )
    .await;
    common::assert_first_occurrences_in_commit_order(&messages, &expected);
    // The acknowledged-but-unmarked batch went out twice; everything else once.
    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for m in &messages {
        *counts.entry(common::event_id(m)).or_default() += 1;
    }
    for id in &all {
        let want = if acked.contains(id) { 2 } else { 1 };
        assert_eq!(counts[id], want, "copies of {id}");
    }
    cancel.cancel();
    second.await.unwrap().unwrap();
}
