//! Slot rotation (migration 3): published rows go with their slot, unpublished ones are
//! carried over unchanged, and nothing a writer, a relay or a long transaction is doing at
//! the time is lost.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventful_outbox::{
    Error, EventStatus, InMemoryPublisher, NewEvent, Outbox, OutboxRecord, Publisher, Relay,
    Rotation,
};
use eventful_test_support::{wait_until, TestDatabase};
use sqlx::Connection as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn record(db: &TestDatabase, outbox: &Outbox, key: &str) -> Uuid {
    let mut tx = db.pool.begin().await.unwrap();
    let id = outbox
        .record(&mut *tx, NewEvent::bytes("t", key, "E", b"x".to_vec()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

/// Rows in each slot: (slot 0, slot 1).
async fn rows_per_slot(db: &TestDatabase) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM eventful_outbox_slot0), \
                (SELECT count(*) FROM eventful_outbox_slot1)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn current_slot(db: &TestDatabase) -> i16 {
    sqlx::query_scalar("SELECT current FROM eventful_outbox_slot")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A rotation only ever empties the slot that is not current, and only after at least
/// `min_events` were recorded since the previous one.
#[tokio::test]
async fn rotation_empties_the_other_slot_and_makes_it_current() {
    let (db, outbox) = common::setup().await;
    assert_eq!(current_slot(&db).await, 0);
    for i in 0..5 {
        record(&db, &outbox, &format!("k{i}")).await;
    }
    assert_eq!(rows_per_slot(&db).await, (5, 0));
    assert_eq!(
        outbox.rotate(&db.pool, 10, 1000).await.unwrap(),
        Rotation::NotDue
    );
    // Slot 1 is empty: rotating carries nothing and makes it current.
    assert_eq!(
        outbox.rotate(&db.pool, 5, 1000).await.unwrap(),
        Rotation::Rotated {
            carried: 0,
            current: 1
        }
    );
    for i in 0..3 {
        record(&db, &outbox, &format!("k{i}")).await;
    }
    assert_eq!(rows_per_slot(&db).await, (5, 3));
    // Slot 0's five events are unpublished: with max_carry 4 it is backlogged.
    assert_eq!(
        outbox.rotate(&db.pool, 0, 4).await.unwrap(),
        Rotation::Backlogged { unpublished: 5 }
    );
    sqlx::query("UPDATE eventful_outbox SET published_at = now() WHERE slot = 0 AND seq <= 3")
        .execute(&db.pool)
        .await
        .unwrap();
    // Three published rows go; the two unpublished ones are carried into slot 1.
    assert_eq!(
        outbox.rotate(&db.pool, 0, 4).await.unwrap(),
        Rotation::Rotated {
            carried: 2,
            current: 0
        }
    );
    assert_eq!(rows_per_slot(&db).await, (0, 5));
    let seqs: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM eventful_outbox WHERE published_at IS NULL ORDER BY seq",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(seqs, vec![4, 5, 6, 7, 8], "carried rows keep their seq");
    // New events go to the new current slot, after the carried ones.
    record(&db, &outbox, "k9").await;
    assert_eq!(rows_per_slot(&db).await, (1, 5));
}

/// A parked event survives any number of rotations with its attempts and error, keeps the
/// later events of its key behind it, and is published (then the others, in order) when
/// re-driven.
#[tokio::test]
async fn a_parked_event_survives_rotations_and_is_redriven_in_order() {
    let (db, outbox) = common::setup().await;
    let memory = InMemoryPublisher::new();
    let poisoned = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let poisoned = poisoned.clone();
        memory.fail_when(move |r| {
            (r.key == "bad" && poisoned.load(std::sync::atomic::Ordering::SeqCst))
                .then(|| Error::PublishPermanent("rejected".into()))
        });
    }
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), memory.clone())
        .poll_interval(Duration::from_millis(50))
        .rotate_after(10)
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());

    let parked = record(&db, &outbox, "bad").await;
    let behind = record(&db, &outbox, "bad").await;
    wait_until("the event is parked", Duration::from_secs(10), || async {
        matches!(
            outbox.status(&db.pool, parked).await.unwrap(),
            Some(EventStatus::Parked { .. })
        )
    })
    .await;
    // Traffic on other keys, in bursts that each make a rotation due.
    let mut others = Vec::new();
    for burst in 0..4u64 {
        for i in 0..10 {
            others.push(record(&db, &outbox, &format!("good-{i}")).await);
        }
        wait_until("the burst's rotation", Duration::from_secs(10), || async {
            metrics.snapshot().rotations > burst
        })
        .await;
    }
    wait_until(
        "the others are published",
        Duration::from_secs(10),
        || async { common::unpublished_count(&db).await == 2 },
    )
    .await;
    assert!(metrics.snapshot().carried >= 2, "{:?}", metrics.snapshot());
    match outbox.status(&db.pool, parked).await.unwrap() {
        Some(EventStatus::Parked {
            attempts,
            last_error,
        }) => {
            assert_eq!(attempts, 1);
            assert!(last_error.unwrap().contains("rejected"));
        }
        other => panic!("parked event after rotations: {other:?}"),
    }
    assert_eq!(
        outbox.status(&db.pool, behind).await.unwrap(),
        Some(EventStatus::Pending { attempts: 0 })
    );
    assert_eq!(outbox.parked(&db.pool, 10).await.unwrap().len(), 1);
    // Every other event went out once.
    let published = memory.messages();
    for id in &others {
        assert_eq!(published.iter().filter(|m| m.event_id == *id).count(), 1);
    }

    poisoned.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(outbox.redrive(&db.pool, parked).await.unwrap());
    wait_until("the key is drained", Duration::from_secs(10), || async {
        common::unpublished_count(&db).await == 0
    })
    .await;
    let order: Vec<Uuid> = memory
        .messages()
        .iter()
        .filter(|m| m.key == "bad")
        .map(|m| m.event_id)
        .collect();
    assert_eq!(order, vec![parked, behind]);
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// A writer whose transaction is still open in a slot that is due to be emptied holds the
/// rotation off (`Busy`, after a short lock timeout, without blocking anyone for long); once
/// it commits, its event is carried over and published, not truncated away.
#[tokio::test]
async fn an_open_writer_in_the_slot_to_empty_is_waited_for_not_lost() {
    let (db, outbox) = common::setup().await;
    // The writer records into slot 0 and stays open.
    let mut writer = db.pool.begin().await.unwrap();
    let late = outbox
        .record(
            &mut *writer,
            NewEvent::bytes("t", "late", "E", b"x".to_vec()),
        )
        .await
        .unwrap();
    // 0 -> 1 does not touch slot 0.
    assert!(matches!(
        outbox.rotate(&db.pool, 0, 1000).await.unwrap(),
        Rotation::Rotated { current: 1, .. }
    ));
    // 1 -> 0 would empty slot 0, which the open writer holds.
    let started = std::time::Instant::now();
    assert_eq!(
        outbox.rotate(&db.pool, 0, 1000).await.unwrap(),
        Rotation::Busy
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "gave up quickly"
    );
    // Meanwhile other writers are not blocked (they write to slot 1).
    let other = record(&db, &outbox, "other").await;
    writer.commit().await.unwrap();
    assert_eq!(
        outbox.rotate(&db.pool, 0, 1000).await.unwrap(),
        Rotation::Rotated {
            carried: 1,
            current: 0
        }
    );

    let memory = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let handle = Relay::builder(db.pool.clone(), outbox.clone(), memory.clone())
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
        .spawn(cancel.clone());
    wait_until("both are published", Duration::from_secs(10), || async {
        common::unpublished_count(&db).await == 0
    })
    .await;
    let ids: Vec<Uuid> = memory.messages().iter().map(|m| m.event_id).collect();
    assert!(ids.contains(&late) && ids.contains(&other), "{ids:?}");
    assert_eq!(ids.len(), 2);
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// Holds the first batch inside the publisher until released.
struct Gate {
    inner: InMemoryPublisher,
    entered: Semaphore,
    release: Semaphore,
}

#[async_trait]
impl Publisher for Gate {
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        self.entered.add_permits(1);
        let _permit = self.release.acquire().await;
        self.inner.publish_batch(events).await
    }
}

/// Events in flight in the relay while their slot is emptied are carried over, and the
/// relay's mark (by seq, through the parent table) still finds them: each is published once
/// and none stays pending.
#[tokio::test]
async fn events_in_flight_when_their_slot_is_emptied_are_marked_once() {
    let (db, outbox) = common::setup().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(record(&db, &outbox, &format!("k{}", i % 4)).await);
    }
    let gate = Arc::new(Gate {
        inner: InMemoryPublisher::new(),
        entered: Semaphore::new(0),
        release: Semaphore::new(0),
    });
    let cancel = CancellationToken::new();
    let handle = Relay::builder(db.pool.clone(), outbox.clone(), gate.clone())
        .poll_interval(Duration::from_millis(50))
        .rotation(false)
        .build()
        .unwrap()
        .spawn(cancel.clone());
    // The batch of 20 is inside the publisher.
    gate.entered.acquire().await.unwrap().forget();
    // Two rotations: the batch's rows go from slot 0 to slot 1 (carried), and slot 0 is
    // emptied.
    assert!(matches!(
        outbox.rotate(&db.pool, 0, 1000).await.unwrap(),
        Rotation::Rotated {
            carried: 0,
            current: 1
        }
    ));
    assert_eq!(
        outbox.rotate(&db.pool, 0, 1000).await.unwrap(),
        Rotation::Rotated {
            carried: 20,
            current: 0
        }
    );
    assert_eq!(rows_per_slot(&db).await, (0, 20));
    gate.release.add_permits(1000);
    wait_until("all marked", Duration::from_secs(10), || async {
        common::unpublished_count(&db).await == 0
    })
    .await;
    let published: Vec<Uuid> = gate.inner.messages().iter().map(|m| m.event_id).collect();
    assert_eq!(published, ids, "each once, in order");
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// While another session holds the xmin horizon (an open repeatable-read snapshot), the
/// table stays bounded: relays keep rotating, so published rows (and every dead version of
/// them) are truncated instead of piling up.
#[tokio::test]
async fn the_table_stays_bounded_while_a_snapshot_holds_the_horizon() {
    let (db, outbox) = common::setup().await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM pg_class")
        .execute(&mut holder)
        .await
        .unwrap();
    let memory = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), memory.clone())
        .poll_interval(Duration::from_millis(20))
        .rotate_after(100)
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());
    let mut max_rows = 0;
    for round in 0..10u64 {
        let mut tx = db.pool.begin().await.unwrap();
        let events = (0..100)
            .map(|i| NewEvent::bytes("t", format!("k{}", i % 10), "E", vec![round as u8; 200]));
        outbox.record_all(&mut *tx, events).await.unwrap();
        tx.commit().await.unwrap();
        // Each round of 100 makes a rotation due.
        wait_until(
            "the round is published and rotated",
            Duration::from_secs(10),
            || async {
                common::unpublished_count(&db).await == 0 && metrics.snapshot().rotations > round
            },
        )
        .await;
        let (a, b) = rows_per_slot(&db).await;
        max_rows = max_rows.max(a + b);
    }
    assert_eq!(memory.messages().len(), 1000);
    // Two slots of at most one round each: every rotation truncated published rows whose
    // dead versions the held snapshot would otherwise have kept.
    assert!(max_rows <= 200, "rows in the table: {max_rows}");
    // And so does the space: the 1,000 events' two versions each would take over 500 KiB.
    let heap: i64 = sqlx::query_scalar(
        "SELECT pg_relation_size('eventful_outbox_slot0') + pg_relation_size('eventful_outbox_slot1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    eprintln!("heap of both slots: {heap} bytes, max rows {max_rows}");
    assert!(heap <= 256 * 1024, "heap of both slots: {heap} bytes");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    cancel.cancel();
    handle.await.unwrap().unwrap();
}
