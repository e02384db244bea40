//! Recording: migrations, atomicity with the caller's transaction, configuration, headers.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use eventful_outbox::{
    Error, EventStatus, InMemoryPublisher, KafkaPublisher, NewEvent, Outbox, Relay, MAX_KEY_LEN,
};
use eventful_test_support::{kafka, wait_until, TestDatabase};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test]
async fn migrate_is_idempotent_and_safe_when_run_concurrently() {
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    let outbox = Outbox::builder()
        .schema("orders")
        .table("outbox")
        .build()
        .unwrap();
    let runs = (0..6).map(|_| {
        let pool = db.pool.clone();
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.migrate(&pool).await })
    });
    for run in futures::future::join_all(runs).await {
        run.unwrap().unwrap();
    }
    outbox.migrate(&db.pool).await.unwrap();
    // Versions are recorded per component in the shared migrations table.
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM eventful_schema_migrations \
         WHERE component = 'eventful-outbox/orders.outbox' ORDER BY version",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3]);
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.outbox_leases")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(leases, i64::from(eventful_outbox::PARTITIONS));
}

/// Guarantee 1 against the real broker: rolled-back events never reach the topic, committed
/// ones do. Rolled-back events are recorded *before* committed ones of the same keys, so by
/// the time the committed ones are on the topic the relay has had every chance to (wrongly)
/// publish the rolled-back ones.
#[tokio::test]
async fn rolled_back_events_are_never_published_and_committed_ones_are() {
    let (db, outbox) = common::setup().await;
    let brokers = kafka::brokers();
    let topic = kafka::create_topic(3).await;
    let cancel = CancellationToken::new();
    let relay = Relay::builder(
        db.pool.clone(),
        outbox.clone(),
        KafkaPublisher::new(&brokers).unwrap(),
    )
    .build()
    .unwrap()
    .spawn(cancel.clone());

    let mut committed: HashMap<String, Vec<Uuid>> = HashMap::new();
    let mut rolled_back = Vec::new();
    for round in 0..10 {
        for k in 0..5 {
            let key = format!("order-{k}");
            let mut tx = db.pool.begin().await.unwrap();
            let id = outbox
                .record(
                    &mut *tx,
                    NewEvent::json(&topic, &key, "Draft", &round).unwrap(),
                )
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            rolled_back.push(id);

            let mut tx = db.pool.begin().await.unwrap();
            let id = outbox
                .record(
                    &mut *tx,
                    NewEvent::json(&topic, &key, "Placed", &round).unwrap(),
                )
                .await
                .unwrap();
            tx.commit().await.unwrap();
            committed.entry(key).or_default().push(id);
        }
    }
    // A transaction dropped without commit rolls back too.
    {
        let mut tx = db.pool.begin().await.unwrap();
        let id = outbox
            .record(
                &mut *tx,
                NewEvent::bytes(&topic, "order-0", "Dropped", vec![1]),
            )
            .await
            .unwrap();
        rolled_back.push(id);
    }

    let all: HashSet<Uuid> = committed.values().flatten().copied().collect();
    let messages = common::read_topic(
        &brokers,
        &topic,
        &all,
        Duration::from_secs(30),
        Some(Duration::from_secs(1)),
    )
    .await;
    common::assert_first_occurrences_in_commit_order(&messages, &committed);
    assert_eq!(messages.len(), all.len(), "no duplicates without failures");
    for id in &rolled_back {
        assert_eq!(outbox.status(&db.pool, *id).await.unwrap(), None);
    }
    wait_until(
        "every committed row is marked",
        Duration::from_secs(10),
        || async { common::published_count(&db).await == all.len() as i64 },
    )
    .await;
    assert_eq!(common::row_count(&db).await, all.len() as i64);
    cancel.cancel();
    relay.await.unwrap().unwrap();
}

/// New events are picked up through LISTEN/NOTIFY: with a 60 s polling interval, each
/// committed event is still published well within a second.
#[tokio::test]
async fn notify_wakes_the_relay_within_milliseconds() {
    let (db, outbox) = common::setup().await;
    let publisher = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .poll_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());
    wait_until(
        "the relay holds every partition",
        Duration::from_secs(10),
        || async { metrics.snapshot().partitions == 64 },
    )
    .await;
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let mut tx = db.pool.begin().await.unwrap();
        outbox
            .record(
                &mut *tx,
                NewEvent::bytes("t", format!("k{i}"), "E", vec![i as u8]),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let committed = Instant::now();
        wait_until("the event is published", Duration::from_secs(5), || async {
            publisher.len() == i + 1
        })
        .await;
        worst = worst.max(committed.elapsed());
    }
    assert!(
        worst < Duration::from_millis(1000),
        "slowest pick-up {worst:?}"
    );
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn outboxes_with_different_tables_are_isolated() {
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    let orders = Outbox::builder()
        .schema("orders")
        .table("outbox")
        .build()
        .unwrap();
    let billing = Outbox::builder()
        .schema("billing")
        .table("outbox")
        .build()
        .unwrap();
    orders.migrate(&db.pool).await.unwrap();
    billing.migrate(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let a = orders
        .record(&mut *tx, NewEvent::bytes("t", "k", "E", vec![1]))
        .await
        .unwrap();
    let b = billing
        .record(&mut *tx, NewEvent::bytes("t", "k", "E", vec![2]))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let publisher = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let handle = Relay::builder(db.pool.clone(), orders.clone(), publisher.clone())
        .build()
        .unwrap()
        .spawn(cancel.clone());
    wait_until(
        "the orders event is published",
        Duration::from_secs(10),
        || async {
            matches!(
                orders.status(&db.pool, a).await.unwrap(),
                Some(EventStatus::Published { .. })
            )
        },
    )
    .await;
    assert_eq!(
        billing.status(&db.pool, b).await.unwrap(),
        Some(EventStatus::Pending { attempts: 0 })
    );
    assert_eq!(
        publisher
            .messages()
            .iter()
            .map(|m| m.event_id)
            .collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(billing.stats(&db.pool).await.unwrap().pending, 1);
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn record_all_keeps_order_and_adds_the_traceparent() {
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    let outbox = Outbox::builder()
        .traceparent_source(|| {
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())
        })
        .build()
        .unwrap();
    outbox.migrate(&db.pool).await.unwrap();
    let events: Vec<NewEvent> = (0..30)
        .map(|i| NewEvent::json("t", format!("k{}", i % 3), "E", &i).unwrap())
        .chain([NewEvent::bytes("t", "k0", "E", vec![]).traceparent("00-explicit-01")])
        .collect();
    let expected_ids: Vec<Uuid> = events.iter().map(NewEvent::id).collect();
    let mut tx = db.pool.begin().await.unwrap();
    let ids = outbox.record_all(&mut *tx, events).await.unwrap();
    assert!(outbox
        .record_all(&mut *tx, Vec::new())
        .await
        .unwrap()
        .is_empty());
    tx.commit().await.unwrap();
    assert_eq!(ids, expected_ids);

    let publisher = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let handle = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .build()
        .unwrap()
        .spawn(cancel.clone());
    wait_until("all published", Duration::from_secs(10), || async {
        publisher.len() == 31
    })
    .await;
    let messages = publisher.messages();
    for key in ["k0", "k1", "k2"] {
        let got: Vec<Uuid> = messages
            .iter()
            .filter(|m| m.key == key)
            .map(|m| m.event_id)
            .collect();
        let want: Vec<Uuid> = ids
            .iter()
            .zip(0..)
            .filter(|(_, i)| (i < &30 && format!("k{}", i % 3) == key) || (*i == 30 && key == "k0"))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(got, want, "order of {key}");
    }
    let last = messages.iter().find(|m| m.event_id == ids[30]).unwrap();
    assert_eq!(last.header("traceparent"), Some("00-explicit-01"));
    let first = messages.iter().find(|m| m.event_id == ids[0]).unwrap();
    assert_eq!(
        first.header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.payload, b"0");
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// Same-key transactions serialize on the key lock: a second transaction recording the same
/// key waits for the first to end, while a different key does not wait.
#[tokio::test]
async fn same_key_transactions_serialize_other_keys_do_not() {
    let (db, outbox) = common::setup().await;
    let mut first = db.pool.begin().await.unwrap();
    outbox
        .record(&mut *first, NewEvent::bytes("t", "hot", "E", vec![1]))
        .await
        .unwrap();

    let mut other = db.pool.begin().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        outbox.record(&mut *other, NewEvent::bytes("t", "cold", "E", vec![1])),
    )
    .await
    .expect("a different key does not wait")
    .unwrap();
    other.commit().await.unwrap();

    let pool = db.pool.clone();
    let outbox2 = outbox.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let id = outbox2
            .record(&mut *tx, NewEvent::bytes("t", "hot", "E", vec![2]))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        id
    });
    // The second transaction is blocked on the advisory lock until `first` commits.
    wait_for_key_lock_waiters(&db, 1).await;
    assert!(!second.is_finished());
    first.commit().await.unwrap();
    let second_id = second.await.unwrap();
    let seqs: Vec<(i64, Uuid)> =
        sqlx::query_as("SELECT seq, id FROM eventful_outbox WHERE key = 'hot' ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(seqs.len(), 2);
    assert_eq!(seqs[1].1, second_id, "the later commit has the larger seq");
}

/// Waits until exactly `n` advisory-lock requests of this database are waiting.
async fn wait_for_key_lock_waiters(db: &TestDatabase, n: i64) {
    wait_until(
        "a transaction waits on the key lock",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            waiting == n
        },
    )
    .await;
}

/// The key lock is taken before the row takes its seq: a transaction that waits on the lock
/// gets a seq after every event the lock holder records meanwhile, so seq order stays commit
/// order for the key. (`same_key_transactions_serialize_other_keys_do_not` also passes when the
/// seq is taken before the lock; this one does not.)
#[tokio::test]
async fn a_waiting_transaction_takes_its_seq_after_the_lock_holder_commits() {
    let (db, outbox) = common::setup().await;
    let mut first = db.pool.begin().await.unwrap();
    outbox
        .record(&mut *first, NewEvent::bytes("t", "hot", "A", vec![1]))
        .await
        .unwrap();
    let pool = db.pool.clone();
    let outbox2 = outbox.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let id = outbox2
            .record(&mut *tx, NewEvent::bytes("t", "hot", "B", vec![2]))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        id
    });
    wait_for_key_lock_waiters(&db, 1).await;
    // Recorded by the holder after the other transaction started waiting: had the waiter
    // taken its seq before the lock, this event's seq would be larger than the waiter's.
    outbox
        .record(&mut *first, NewEvent::bytes("t", "hot", "A", vec![3]))
        .await
        .unwrap();
    first.commit().await.unwrap();
    let second_id = second.await.unwrap();
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, event_type FROM eventful_outbox WHERE key = 'hot' ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let types: Vec<&str> = rows.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(types, ["A", "A", "B"], "seq order is commit order per key");
    assert_eq!(rows[2].0, second_id);
}

/// `record` refuses a key longer than `MAX_KEY_LEN` bytes with an error naming the limit,
/// and writes nothing (not even the other events of the same call); a key of exactly the
/// limit is fine.
#[tokio::test]
async fn record_rejects_an_over_long_key_and_writes_nothing() {
    let (db, outbox) = common::setup().await;
    let max = 1024;
    let mut tx = db.pool.begin().await.unwrap();
    let result = outbox
        .record_all(
            &mut *tx,
            [
                NewEvent::bytes("t", "short", "E", b"x".to_vec()),
                NewEvent::bytes("t", "é".repeat(max / 2 + 1), "E", b"x".to_vec()),
            ],
        )
        .await;
    assert!(result.is_err(), "record accepted a {}-byte key", max + 2);
    match result {
        Err(Error::KeyTooLong { len, max: limit }) => {
            assert_eq!((len, limit), (max + 2, MAX_KEY_LEN));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(MAX_KEY_LEN, max);
    tx.commit().await.unwrap();
    assert_eq!(common::row_count(&db).await, 0);
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .record(
            &mut *tx,
            NewEvent::bytes("t", "k".repeat(max), "E", b"x".to_vec()),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(common::row_count(&db).await, 1);
}

/// Writers send at most one `NOTIFY` per `notify_at_most_every` (PostgreSQL serializes the
/// commits of notifying transactions); the relay woken by one stays busy and finds the events
/// recorded in between within milliseconds. After its busy time, the next writer notifies
/// again. A second session LISTENs and counts the notifications.
#[tokio::test]
async fn writers_notify_at_most_once_per_interval_and_events_are_still_picked_up_at_once() {
    let (db, _) = common::setup().await;
    let outbox = Outbox::builder()
        .notify_at_most_every(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen(outbox.channel()).await.unwrap();
    let notified = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = notified.clone();
    let counting = tokio::spawn(async move {
        while listener.recv().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let publisher = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .poll_interval(Duration::from_secs(60))
        .busy_for(Duration::from_millis(500))
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());
    wait_until(
        "the relay holds every partition",
        Duration::from_secs(10),
        || async { metrics.snapshot().partitions == 64 },
    )
    .await;
    let record = |i: usize| {
        let (pool, outbox) = (db.pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox
                .record(
                    &mut *tx,
                    NewEvent::bytes("t", format!("k{i}"), "E", vec![i as u8]),
                )
                .await
                .unwrap();
            tx.commit().await.unwrap();
            Instant::now()
        }
    };
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for i in 0..30 {
        let committed = record(i).await;
        wait_until("the event is published", Duration::from_secs(5), || async {
            publisher.len() == i + 1
        })
        .await;
        worst = worst.max(committed.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    assert!(
        worst < Duration::from_millis(300),
        "slowest pick-up {worst:?}"
    );
    let burst = notified.load(std::sync::atomic::Ordering::SeqCst);
    let most = (took.as_millis() / 200 + 1) as usize;
    assert!(
        (1..=most).contains(&burst),
        "{burst} notifications for 30 transactions in {took:?} (at most {most})"
    );

    // Past the relay's busy time: the next writer notifies, and the relay wakes at once.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let committed = record(30).await;
    wait_until(
        "the last event is published",
        Duration::from_secs(5),
        || async { publisher.len() == 31 },
    )
    .await;
    assert!(
        committed.elapsed() < Duration::from_millis(300),
        "{:?}",
        committed.elapsed()
    );
    wait_until(
        "its notification arrives",
        Duration::from_secs(5),
        || async { notified.load(std::sync::atomic::Ordering::SeqCst) == burst + 1 },
    )
    .await;
    cancel.cancel();
    handle.await.unwrap().unwrap();
    counting.abort();
}

/// A recording statement that fails sends no `NOTIFY`, so it gives its turn back: the next
/// writer of the same interval notifies.
#[tokio::test]
async fn a_failed_recording_gives_its_notify_turn_to_the_next_writer() {
    let (db, _) = common::setup().await;
    let outbox = Outbox::builder()
        .notify_at_most_every(Duration::from_secs(60))
        .build()
        .unwrap();
    sqlx::query(
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.key = 'bad' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON eventful_outbox FOR EACH ROW \
         EXECUTE FUNCTION refuse_bad()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen(outbox.channel()).await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let refused = outbox
        .record(&mut *tx, NewEvent::bytes("t", "bad", "E", vec![0]))
        .await;
    assert!(refused.is_err());
    tx.rollback().await.unwrap();
    for key in ["good", "later"] {
        let mut tx = db.pool.begin().await.unwrap();
        outbox
            .record(&mut *tx, NewEvent::bytes("t", key, "E", vec![1]))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // The first good writer notifies; the second is within the (60 s) interval.
    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    let more = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(more.is_err(), "a second notification within the interval");
}
