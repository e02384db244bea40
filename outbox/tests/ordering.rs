//! Guarantee 3: per-key commit order on the topic with three relays running concurrently
//! on the same table, across a relay crash and slot rotations, with concurrent writers and
//! rollbacks; and when the broker rejects an event.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventful_outbox::{EventStatus, KafkaPublisher, NewEvent, Relay};
use eventful_test_support::{kafka, wait_until, KafkaBroker};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_three_relays_keep_per_key_commit_order_across_a_crash() {
    let (db, outbox) = common::setup().await;
    // The commit-order witness: a per-key counter incremented in the same transaction, after
    // the event is recorded. Its row lock is held until commit, so `n` follows the commit
    // order of same-key transactions.
    sqlx::query("CREATE TABLE counters (key TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    // A private broker: this test must not depend on other traffic on the shared one.
    let broker = KafkaBroker::start().await;
    let brokers = broker.brokers();
    let topic = format!("outbox-{}", Uuid::new_v4().simple());
    kafka::create_topic_on(&brokers, &topic, 4).await;
    let lease_ttl = Duration::from_millis(1500);
    let relay = |cancel: CancellationToken| {
        let relay = Relay::builder(
            db.pool.clone(),
            outbox.clone(),
            KafkaPublisher::new(&brokers).unwrap(),
        )
        .batch_size(40)
        .lease_ttl(lease_ttl)
        // Rotate every 40 events (about 15 times in this run), so rows are carried over
        // and slots emptied while writers commit, relays publish and one of them dies.
        .rotate_after(40)
        .build()
        .unwrap();
        let metrics = relay.metrics();
        (relay.spawn(cancel), metrics)
    };
    let cancel = CancellationToken::new();
    let (doomed, _) = relay(CancellationToken::new());
    let (r2, m2) = relay(cancel.clone());
    let (r3, m3) = relay(cancel.clone());

    let committed: Arc<Mutex<Vec<(String, i64, Uuid)>>> = Arc::default();
    let rolled_back = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let pool = db.pool.clone();
            let outbox = outbox.clone();
            let committed = committed.clone();
            let rolled_back = rolled_back.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for _ in 0..60 {
                    let (key, events, rollback) = {
                        let mut rng = rand::rng();
                        (
                            format!("key-{}", rng.random_range(0..12)),
                            rng.random_range(1..=2),
                            rng.random_bool(0.2),
                        )
                    };
                    let mut tx = pool.begin().await.unwrap();
                    let mut mine = Vec::new();
                    for _ in 0..events {
                        // Record first, then bump the witness: without the outbox's key lock,
                        // two transactions could take seqs in one order and commit in the
                        // other, and a relay seeing both would publish them in seq order.
                        let placeholder = NewEvent::json(
                            &topic,
                            &key,
                            "Counted",
                            &serde_json::json!({"writer": w}),
                        )
                        .unwrap();
                        let id = outbox.record(&mut *tx, placeholder).await.unwrap();
                        let pause = rand::rng().random_range(0..3u64);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        let n: i64 = sqlx::query_scalar(
                            "INSERT INTO counters (key, n) VALUES ($1, 1) \
                             ON CONFLICT (key) DO UPDATE SET n = counters.n + 1 RETURNING n",
                        )
                        .bind(&key)
                        .fetch_one(&mut *tx)
                        .await
                        .unwrap();
                        mine.push((key.clone(), n, id));
                    }
                    if rollback {
                        tx.rollback().await.unwrap();
                        rolled_back.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tx.commit().await.unwrap();
                        committed.lock().unwrap().extend(mine);
                    }
                }
            })
        })
        .collect();

    // Crash one relay in the middle of the traffic, then start a replacement.
    wait_until(
        "a third of the traffic is committed",
        Duration::from_secs(60),
        || async { committed.lock().unwrap().len() >= 200 },
    )
    .await;
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());
    let (r4, m4) = relay(cancel.clone());

    for w in writers {
        w.await.unwrap();
    }
    let committed = committed.lock().unwrap().clone();
    assert!(rolled_back.load(Ordering::Relaxed) > 0);
    let mut expected: HashMap<String, Vec<(i64, Uuid)>> = HashMap::new();
    for (key, n, id) in &committed {
        expected.entry(key.clone()).or_default().push((*n, *id));
    }
    let expected: HashMap<String, Vec<Uuid>> = expected
        .into_iter()
        .map(|(key, mut v)| {
            v.sort();
            // No gaps: rolled-back increments were rolled back too.
            assert!(
                v.iter().enumerate().all(|(i, (n, _))| *n == i as i64 + 1),
                "{key}: {v:?}"
            );
            (key, v.into_iter().map(|(_, id)| id).collect())
        })
        .collect();

    // Published rows go with their slot, so "all published" is "nothing left unpublished"
    // (every writer has finished) plus every committed event on the topic.
    wait_until(
        "every committed event is marked published",
        Duration::from_secs(60),
        || async { common::unpublished_count(&db).await == 0 },
    )
    .await;
    let all: HashSet<Uuid> = committed.iter().map(|(_, _, id)| *id).collect();
    let messages = common::read_topic(
        &brokers,
        &topic,
        &all,
        Duration::from_secs(60),
        Some(Duration::from_secs(1)),
    )
    .await;
    let on_topic: HashSet<Uuid> = messages.iter().map(common::event_id).collect();
    assert_eq!(
        on_topic, all,
        "exactly the committed events, no rolled-back one"
    );
    common::assert_first_occurrences_in_commit_order(&messages, &expected);
    let rotations = m2.snapshot().rotations + m3.snapshot().rotations + m4.snapshot().rotations;
    assert!(
        rotations >= 3,
        "the slots rotated during the run: {rotations}"
    );
    // The three live relays share the partitions.
    wait_until(
        "partitions are spread over the live relays",
        Duration::from_secs(10),
        || async {
            let parts = [
                m2.snapshot().partitions,
                m3.snapshot().partitions,
                m4.snapshot().partitions,
            ];
            parts.iter().sum::<u64>() == 64 && parts.iter().all(|p| *p > 0)
        },
    )
    .await;
    cancel.cancel();
    for r in [r2, r3, r4] {
        r.await.unwrap().unwrap();
    }
}

/// Per-key order when the broker rejects an event (too large for the topic): the relay parks
/// it, marks published only what the broker acknowledged, and keeps the later event of its
/// key pending and off the topic, while other keys in the same batches are published.
#[tokio::test]
async fn broker_rejection_parks_the_event_and_holds_back_only_its_key() {
    let brokers = kafka::brokers();
    for batch_messages in ["10000", "1"] {
        let (db, outbox) = common::setup().await;
        let topic = common::create_small_topic(&brokers, 1, 1024).await;
        let record = |key: &str, payload: Vec<u8>| {
            let (pool, outbox, topic) = (db.pool.clone(), outbox.clone(), topic.clone());
            let key = key.to_owned();
            async move {
                let mut tx = pool.begin().await.unwrap();
                let id = outbox
                    .record(&mut *tx, NewEvent::bytes(&topic, key, "E", payload))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                id
            }
        };
        let a1 = record("a", vec![7; 4096]).await;
        let a2 = record("a", b"a2".to_vec()).await;
        let b1 = record("b", b"b1".to_vec()).await;
        let c1 = record("c", b"c1".to_vec()).await;
        let b2 = record("b", b"b2".to_vec()).await;
        let publisher = KafkaPublisher::builder(&brokers)
            .set("batch.num.messages", batch_messages)
            .build()
            .unwrap();
        let cancel = CancellationToken::new();
        let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher)
            .build()
            .unwrap();
        let metrics = relay.metrics();
        let handle = relay.spawn(cancel.clone());
        wait_until(
            "a1 is parked and the other keys are published",
            Duration::from_secs(20),
            || async {
                let m = metrics.snapshot();
                m.parked == 1 && m.published == 3
            },
        )
        .await;
        assert!(
            matches!(
                outbox.status(&db.pool, a1).await.unwrap(),
                Some(EventStatus::Parked { attempts: 1, .. })
            ),
            "batch.num.messages={batch_messages}"
        );
        assert_eq!(
            outbox.status(&db.pool, a2).await.unwrap(),
            Some(EventStatus::Pending { attempts: 0 }),
            "batch.num.messages={batch_messages}"
        );
        let on_topic = common::read_topic(
            &brokers,
            &topic,
            &[b1, c1, b2].into(),
            Duration::from_secs(15),
            Some(Duration::from_secs(2)),
        )
        .await;
        let ids: Vec<Uuid> = on_topic.iter().map(common::event_id).collect();
        assert_eq!(ids, vec![b1, c1, b2], "batch.num.messages={batch_messages}");
        cancel.cancel();
        handle.await.unwrap().unwrap();
    }
}
