//! Relay behaviour with the in-memory publisher against the real PostgreSQL: parking,
//! re-drive, backoff, retention, metrics, shutdown.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

mod common;

use std::time::{Duration, Instant};

use eventful_outbox::{Error, EventStatus, InMemoryPublisher, NewEvent, Outbox, Relay, Retention};
use eventful_test_support::{wait_until, TestDatabase};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn record(db: &TestDatabase, outbox: &Outbox, key: &str, payload: &str) -> Uuid {
    let mut tx = db.pool.begin().await.unwrap();
    let event = NewEvent::bytes("t", key, "E", payload.as_bytes().to_vec());
    let id = outbox.record(&mut *tx, event).await.unwrap();
    tx.commit().await.unwrap();
    id
}

/// A poisoned event is parked at once on a permanent error; later events of its key wait,
/// other keys flow; after re-drive the key drains in order.
#[tokio::test]
async fn parked_event_blocks_only_its_key_until_redriven() {
    let (db, outbox) = common::setup().await;
    let publisher = InMemoryPublisher::new();
    publisher.fail_when(|r| {
        (r.payload == b"poison").then(|| Error::PublishPermanent("rejected by the broker".into()))
    });
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());

    let bad1 = record(&db, &outbox, "bad", "b1").await;
    let poison = record(&db, &outbox, "bad", "poison").await;
    let bad3 = record(&db, &outbox, "bad", "b3").await;
    let mut good = Vec::new();
    for i in 0..20 {
        good.push(record(&db, &outbox, &format!("good-{}", i % 4), &format!("g{i}")).await);
    }
    // The publisher stores a message before the relay marks it and counts it: wait for both.
    wait_until(
        "good keys and the first bad event are published and marked",
        Duration::from_secs(10),
        || async {
            let m = metrics.snapshot();
            publisher.len() == 21 && m.published == 21 && m.parked == 1
        },
    )
    .await;
    let parked = outbox.parked(&db.pool, 10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].id, poison);
    assert_eq!(parked[0].key, "bad");
    assert_eq!(parked[0].attempts, 1);
    assert!(parked[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("rejected by the broker"));
    assert_eq!(
        outbox.status(&db.pool, bad3).await.unwrap(),
        Some(EventStatus::Pending { attempts: 0 })
    );
    // More events of the blocked key still wait; other keys still flow.
    let bad4 = record(&db, &outbox, "bad", "b4").await;
    let late = record(&db, &outbox, "good-0", "late").await;
    wait_until(
        "a later good event is published",
        Duration::from_secs(10),
        || async { publisher.messages().iter().any(|m| m.event_id == late) },
    )
    .await;
    assert!(!publisher
        .messages()
        .iter()
        .any(|m| m.event_id == bad4 || m.event_id == bad3));

    publisher.stop_failing();
    assert!(outbox.redrive(&db.pool, poison).await.unwrap());
    assert!(
        !outbox.redrive(&db.pool, poison).await.unwrap(),
        "no longer parked"
    );
    wait_until("the bad key drains", Duration::from_secs(10), || async {
        publisher.len() == 25
    })
    .await;
    let bad: Vec<Uuid> = publisher
        .messages()
        .iter()
        .filter(|m| m.key == "bad")
        .map(|m| m.event_id)
        .collect();
    assert_eq!(bad, vec![bad1, poison, bad3, bad4]);
    assert!(outbox.parked(&db.pool, 10).await.unwrap().is_empty());
    let _ = good;
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// Retryable failures back off exponentially (no busy loop) and park after `max_attempts`.
#[tokio::test]
async fn retryable_failures_back_off_then_park_after_max_attempts() {
    let (db, outbox) = common::setup().await;
    let publisher = InMemoryPublisher::new();
    publisher
        .fail_when(|r| (r.key == "flaky").then(|| Error::PublishRetryable("broker busy".into())));
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .max_attempts(5)
        .backoff(eventful_outbox::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
        ))
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());
    let started = Instant::now();
    let flaky = record(&db, &outbox, "flaky", "x").await;
    let flaky2 = record(&db, &outbox, "flaky", "y").await;
    wait_until(
        "the flaky event is parked",
        Duration::from_secs(20),
        || async {
            // Counters are bumped right after the marking transaction commits.
            metrics.snapshot().parked == 1
                && matches!(
                    outbox.status(&db.pool, flaky).await.unwrap(),
                    Some(EventStatus::Parked { .. })
                )
        },
    )
    .await;
    let elapsed = started.elapsed();
    // Delays after failures 1..4 are at least 50, 100, 200, 400 ms (half of 100·2^(n-1)).
    assert!(
        elapsed >= Duration::from_millis(750),
        "parked after {elapsed:?}: no backoff"
    );
    match outbox.status(&db.pool, flaky).await.unwrap() {
        Some(EventStatus::Parked {
            attempts,
            last_error,
        }) => {
            assert_eq!(attempts, 5);
            assert!(last_error.unwrap().contains("broker busy"));
        }
        other => panic!("{other:?}"),
    }
    // The second event of the key was never counted as an attempt.
    assert_eq!(
        outbox.status(&db.pool, flaky2).await.unwrap(),
        Some(EventStatus::Pending { attempts: 0 })
    );
    let m = metrics.snapshot();
    assert_eq!((m.retried, m.parked, m.published), (4, 1, 0));
    // With a 50 ms poll, a busy loop would make dozens of calls.
    assert!(
        publisher.batches() <= 6,
        "{} publish calls",
        publisher.batches()
    );
    let stats = outbox.stats(&db.pool).await.unwrap();
    assert_eq!((stats.pending, stats.parked), (1, 1));
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn retention_deletes_only_old_published_rows_in_bounded_batches() {
    let (db, outbox) = common::setup().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(record(&db, &outbox, &format!("k{i}"), "x").await);
    }
    // 23 published long ago, 4 published just now, 3 never published.
    sqlx::query(
        "UPDATE eventful_outbox SET published_at = now() - interval '2 days' WHERE id = ANY($1)",
    )
    .bind(&ids[..23])
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE eventful_outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(&ids[23..27])
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        outbox
            .delete_published(&db.pool, Duration::from_secs(86_400), 5)
            .await
            .unwrap(),
        5
    );
    let retention = Retention::new(db.pool.clone(), outbox.clone())
        .max_age(Duration::from_secs(86_400))
        .batch_size(5);
    assert_eq!(retention.run_once().await.unwrap(), 18);
    assert_eq!(retention.run_once().await.unwrap(), 0);
    for id in &ids[..23] {
        assert_eq!(outbox.status(&db.pool, *id).await.unwrap(), None);
    }
    for id in &ids[23..27] {
        assert!(matches!(
            outbox.status(&db.pool, *id).await.unwrap(),
            Some(EventStatus::Published { .. })
        ));
    }
    for id in &ids[27..] {
        assert!(matches!(
            outbox.status(&db.pool, *id).await.unwrap(),
            Some(EventStatus::Pending { .. })
        ));
    }
    // The background task does the same on its own.
    sqlx::query(
        "UPDATE eventful_outbox SET published_at = now() - interval '2 days' WHERE id = ANY($1)",
    )
    .bind(&ids[23..27])
    .execute(&db.pool)
    .await
    .unwrap();
    let cancel = CancellationToken::new();
    let task = retention
        .interval(Duration::from_millis(50))
        .spawn(cancel.clone());
    wait_until(
        "retention deleted the rest",
        Duration::from_secs(10),
        || async { common::row_count(&db).await == 3 },
    )
    .await;
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn stats_and_metrics_report_pending_published_and_oldest_age() {
    let (db, outbox) = common::setup().await;
    for i in 0..12 {
        record(&db, &outbox, &format!("k{}", i % 3), "x").await;
    }
    wait_until(
        "the oldest event has aged",
        Duration::from_secs(5),
        || async {
            outbox
                .stats(&db.pool)
                .await
                .unwrap()
                .oldest_pending_age
                .unwrap_or_default()
                >= Duration::from_millis(100)
        },
    )
    .await;
    let stats = outbox.stats(&db.pool).await.unwrap();
    assert_eq!((stats.pending, stats.parked), (12, 0));
    let publisher = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .lease_ttl(Duration::from_millis(800))
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());
    wait_until(
        "everything is published and the gauges refreshed",
        Duration::from_secs(10),
        || async {
            let m = metrics.snapshot();
            m.published == 12 && m.pending == 0 && m.batches >= 1 && m.partitions == 64
        },
    )
    .await;
    let stats = outbox.stats(&db.pool).await.unwrap();
    assert_eq!((stats.pending, stats.oldest_pending_age), (0, None));
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// On cancellation a relay finishes, gives its leases back, and another relay takes over at
/// once (far sooner than the lease TTL).
#[tokio::test]
async fn graceful_shutdown_releases_leases_for_immediate_takeover() {
    let (db, outbox) = common::setup().await;
    let first = InMemoryPublisher::new();
    let cancel_a = CancellationToken::new();
    let relay_a = Relay::builder(db.pool.clone(), outbox.clone(), first.clone())
        .lease_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let metrics_a = relay_a.metrics();
    let handle_a = relay_a.spawn(cancel_a.clone());
    wait_until(
        "A holds every partition",
        Duration::from_secs(10),
        || async { metrics_a.snapshot().partitions == 64 },
    )
    .await;
    record(&db, &outbox, "k", "before").await;
    wait_until("A published", Duration::from_secs(10), || async {
        first.len() == 1
    })
    .await;
    cancel_a.cancel();
    handle_a.await.unwrap().unwrap();
    let owned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM eventful_outbox_leases WHERE owner IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(owned, 0);

    let second = InMemoryPublisher::new();
    let cancel_b = CancellationToken::new();
    let started = Instant::now();
    let handle_b = Relay::builder(db.pool.clone(), outbox.clone(), second.clone())
        .lease_ttl(Duration::from_secs(60))
        .build()
        .unwrap()
        .spawn(cancel_b.clone());
    record(&db, &outbox, "k", "after").await;
    wait_until("B published", Duration::from_secs(10), || async {
        second.len() == 1
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "takeover took {:?}",
        started.elapsed()
    );
    assert_eq!(first.len(), 1);
    cancel_b.cancel();
    handle_b.await.unwrap().unwrap();
}

#[tokio::test]
async fn relay_fails_at_start_on_an_unmigrated_database_and_rejects_bad_config() {
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    let result = Relay::builder(db.pool.clone(), Outbox::new(), InMemoryPublisher::new())
        .build()
        .unwrap()
        .run(CancellationToken::new())
        .await;
    assert!(matches!(result, Err(Error::Database(_))), "{result:?}");
    let bad = Relay::builder(db.pool.clone(), Outbox::new(), InMemoryPublisher::new())
        .batch_size(0)
        .build();
    assert!(matches!(bad, Err(Error::Config(_))));
    let bad = Relay::builder(db.pool.clone(), Outbox::new(), InMemoryPublisher::new())
        .lease_ttl(Duration::from_millis(10))
        .build();
    assert!(matches!(bad, Err(Error::Config(_))));
}

/// Without notifications (as after a lost NOTIFY), the polling fallback still publishes.
#[tokio::test]
async fn polling_fallback_publishes_without_notifications() {
    let (db, outbox) = common::setup().await;
    let publisher = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let handle = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .listen(false)
        .poll_interval(Duration::from_millis(200))
        .build()
        .unwrap()
        .spawn(cancel.clone());
    let ids = [
        record(&db, &outbox, "k", "1").await,
        record(&db, &outbox, "k", "2").await,
    ];
    wait_until("polling publishes", Duration::from_secs(10), || async {
        publisher.len() == 2
    })
    .await;
    let got: Vec<Uuid> = publisher.messages().iter().map(|m| m.event_id).collect();
    assert_eq!(got, ids);
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// Inserts a pending row directly, as an older version or another writer could have (the
/// long keys `record` now refuses).
async fn insert_raw(db: &TestDatabase, key: &str, payload: &str) -> Uuid {
    let id = Uuid::now_v7();
    // Any partition works: the test's single relay holds all of them.
    sqlx::query(
        "INSERT INTO eventful_outbox (id, topic, key, partition, event_type, payload, content_type) \
         VALUES ($1, 't', $2, 0, 'E', $3, 'application/octet-stream')",
    )
    .bind(id)
    .bind(key)
    .bind(payload.as_bytes())
    .execute(&db.pool)
    .await
    .unwrap();
    id
}

/// A random (incompressible) key of `len` ASCII characters.
fn random_key(len: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(rng.random_range(b'!'..=b'~')))
        .collect()
}

/// Acknowledgements per event id, from a `common::Recording` publisher.
fn acks_of<P>(recording: &common::Recording<P>, id: Uuid) -> u32 {
    recording
        .acks
        .lock()
        .unwrap()
        .get(&id)
        .copied()
        .unwrap_or(0)
}

/// A 3 KB random key that fails permanently: recording its failure must neither fail nor
/// take the rest of the batch with it. It is parked; the ten others are published once.
#[tokio::test]
async fn failing_event_with_a_3kb_key_is_parked_and_the_batch_published_once() {
    let (db, outbox) = common::setup().await;
    let long_key = random_key(3 * 1024);
    let long = insert_raw(&db, &long_key, "long").await;
    let mut normal = Vec::new();
    for i in 0..10 {
        normal.push(record(&db, &outbox, &format!("k{i}"), "x").await);
    }
    let memory = InMemoryPublisher::new();
    memory.fail_when(|r| {
        (r.key.len() > 1024).then(|| Error::PublishPermanent("key rejected".into()))
    });
    let publisher = common::Recording::new(memory);
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let handle = relay.spawn(cancel.clone());
    wait_until(
        "the long-key event is parked",
        Duration::from_secs(10),
        || async {
            matches!(
                outbox.status(&db.pool, long).await.unwrap(),
                Some(EventStatus::Parked { .. })
            )
        },
    )
    .await;
    wait_until(
        "the ten others are marked published",
        Duration::from_secs(10),
        || async { common::published_count(&db).await == 10 },
    )
    .await;
    // Three more batches (one canary event each) publish nothing again.
    for i in 0..3 {
        let canary = record(&db, &outbox, &format!("canary-{i}"), "c").await;
        wait_until(
            "the canary is published",
            Duration::from_secs(10),
            || async { acks_of(&publisher, canary) == 1 },
        )
        .await;
    }
    for id in &normal {
        assert_eq!(
            acks_of(&publisher, *id),
            1,
            "event {id} published more than once"
        );
    }
    assert_eq!(acks_of(&publisher, long), 0);
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// Any deterministic failure while recording one event's failure (here a trigger) must not
/// roll back the marks of the rest of the batch: they are published once, and the event
/// whose mark fails stays pending (it is tried again, with the later events of its key held
/// back behind it).
#[tokio::test]
async fn a_mark_that_always_fails_does_not_republish_the_rest_of_the_batch() {
    let (db, outbox) = common::setup().await;
    sqlx::query(
        "CREATE FUNCTION cursed() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'cannot mark %', NEW.key; END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER cursed BEFORE UPDATE ON eventful_outbox FOR EACH ROW \
         WHEN (NEW.key = 'cursed' AND NEW.attempts > OLD.attempts) EXECUTE FUNCTION cursed()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let cursed = record(&db, &outbox, "cursed", "c1").await;
    let cursed_later = record(&db, &outbox, "cursed", "c2").await;
    let mut normal = Vec::new();
    for i in 0..10 {
        normal.push(record(&db, &outbox, &format!("k{i}"), "x").await);
    }
    let memory = InMemoryPublisher::new();
    memory.fail_when(|r| (r.key == "cursed").then(|| Error::PublishPermanent("rejected".into())));
    let publisher = common::Recording::new(memory);
    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let handle = relay.spawn(cancel.clone());
    wait_until(
        "the ten others are marked published",
        Duration::from_secs(10),
        || async { common::published_count(&db).await == 10 },
    )
    .await;
    let batches = publisher.batches.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(
        "the cursed event was tried three more times",
        Duration::from_secs(20),
        || async { publisher.batches.load(std::sync::atomic::Ordering::Relaxed) >= batches + 3 },
    )
    .await;
    for id in &normal {
        assert_eq!(
            acks_of(&publisher, *id),
            1,
            "event {id} published more than once"
        );
    }
    assert_eq!(
        outbox.status(&db.pool, cursed).await.unwrap(),
        Some(EventStatus::Pending { attempts: 0 })
    );
    assert_eq!(
        acks_of(&publisher, cursed_later),
        0,
        "sent after a failed event of its key"
    );
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// A LISTEN that fails when the relay starts is retried: once it is back, a NOTIFY wakes the
/// relay at once, not at the next poll (60 s here).
#[tokio::test]
async fn listen_failing_at_start_is_retried() {
    use std::sync::atomic::Ordering;
    let (db, outbox) = common::setup().await;
    let proxy = common::PgProxy::start(&db.url).await;
    let pool = proxy.pool(&db.url, 5).await;
    proxy.block_listen.store(true, Ordering::SeqCst);
    let publisher = InMemoryPublisher::new();
    let cancel = CancellationToken::new();
    let relay = Relay::builder(pool, outbox.clone(), publisher.clone())
        .poll_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let metrics = relay.metrics();
    let handle = relay.spawn(cancel.clone());
    wait_until(
        "the relay's LISTEN was refused",
        Duration::from_secs(10),
        || async {
            proxy.blocked.load(Ordering::SeqCst) >= 1 && metrics.snapshot().partitions == 64
        },
    )
    .await;
    proxy.block_listen.store(false, Ordering::SeqCst);
    wait_until(
        "the relay LISTENs again",
        Duration::from_secs(10),
        || async { proxy.passed.load(Ordering::SeqCst) >= 1 },
    )
    .await;
    let started = Instant::now();
    let id = record(&db, &outbox, "k", "after").await;
    wait_until(
        "the NOTIFY wakes the relay",
        Duration::from_secs(10),
        || async { publisher.messages().iter().any(|m| m.event_id == id) },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));

    // The same when the listening connection is killed while the relay runs.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(killed, vec![true], "one listening backend");
    wait_until(
        "the relay LISTENs again after its connection was killed",
        Duration::from_secs(10),
        || async { proxy.passed.load(Ordering::SeqCst) >= 2 },
    )
    .await;
    let id = record(&db, &outbox, "k", "after the kill").await;
    wait_until(
        "the NOTIFY wakes the relay again",
        Duration::from_secs(10),
        || async { publisher.messages().iter().any(|m| m.event_id == id) },
    )
    .await;
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// With a backlog the relay marks a batch while it publishes the next one. When that mark
/// fails, the next batch (later events of the same keys, already sent) must not be marked
/// either: otherwise the failed batch goes out again *after* it, and a consumer keeping the
/// last event of each key ends with a stale one. Here the first mark of the first batch fails
/// (a retryable error raised by a trigger, once); every key's last published event must be
/// its latest, and the first occurrences must be in commit order.
#[tokio::test]
async fn a_failed_mark_during_a_backlog_never_leaves_an_older_event_last_on_its_key() {
    let (db, outbox) = common::setup().await;
    let keys = 5;
    let per_key = 4;
    let mut expected: std::collections::HashMap<String, Vec<Uuid>> = Default::default();
    for round in 0..per_key {
        for k in 0..keys {
            let key = format!("k{k}");
            let id = record(&db, &outbox, &key, &format!("{key}#{round}")).await;
            expected.entry(key).or_default().push(id);
        }
    }
    // The first batch (batch_size 10) is the ten oldest rows.
    let first_batch_last_seq: i64 =
        sqlx::query_scalar("SELECT seq FROM eventful_outbox ORDER BY seq OFFSET 9 LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // `nextval` survives the rollback of the failing statement: it fails exactly once.
    sqlx::query("CREATE SEQUENCE mark_failures")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE FUNCTION fail_first_mark() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF OLD.seq <= {first_batch_last_seq} AND nextval('mark_failures') = 1 THEN \
             RAISE EXCEPTION 'mark lost' USING ERRCODE = '40001'; \
           END IF; \
           RETURN NEW; \
         END $$"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER fail_first_mark BEFORE UPDATE ON eventful_outbox FOR EACH ROW \
         WHEN (OLD.published_at IS NULL AND NEW.published_at IS NOT NULL) \
         EXECUTE FUNCTION fail_first_mark()",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let publisher = InMemoryPublisher::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .batch_size(10)
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    drain(&db, relay, (keys * per_key) as i64).await;

    let failures: i64 = sqlx::query_scalar("SELECT last_value FROM mark_failures")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(failures >= 1, "the first batch's mark was never attempted");
    let messages = publisher.messages();
    assert!(
        messages.len() > keys * per_key,
        "the failed batch was not published again ({} messages)",
        messages.len()
    );
    assert_key_order(&messages, &expected, true);
}

/// Wraps a publisher and counts the batches sent while rows of the batch before were still
/// unmarked: the relay's rounds overlapped.
struct Overlaps<P> {
    inner: P,
    pool: sqlx::PgPool,
    previous: std::sync::Mutex<Vec<i64>>,
    count: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl<P: eventful_outbox::Publisher> eventful_outbox::Publisher for Overlaps<P> {
    async fn publish_batch(
        &self,
        events: &[eventful_outbox::OutboxRecord],
    ) -> Vec<Result<(), Error>> {
        let previous = std::mem::replace(
            &mut *self.previous.lock().unwrap(),
            events.iter().map(|e| e.seq).collect(),
        );
        let unmarked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM eventful_outbox WHERE seq = ANY($1) AND published_at IS NULL",
        )
        .bind(&previous)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        if unmarked > 0 {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.publish_batch(events).await
    }
}

/// Draining a backlog with overlapping rounds (a batch is marked while the next one is
/// published): every event goes out exactly once, and an event whose publish fails is not
/// overtaken by a later event of its key fetched while its failure was being recorded.
/// Marks are slowed by a trigger (recording a failure most), so that the next batch is
/// always fetched and published before the marks commit.
#[tokio::test]
async fn a_backlog_drains_once_each_and_a_failed_event_is_not_overtaken() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (db, outbox) = common::setup().await;
    let mut expected: std::collections::HashMap<String, Vec<Uuid>> = Default::default();
    let mut ids = Vec::new();
    for i in 0..200 {
        let key = format!("k{}", i % 7);
        let id = record(&db, &outbox, &key, &format!("e{i}")).await;
        expected.entry(key).or_default().push(id);
        ids.push(id);
    }
    sqlx::query(
        "CREATE FUNCTION slow_marks() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.attempts > OLD.attempts THEN PERFORM pg_sleep(0.3); \
           ELSE PERFORM pg_sleep(0.002); END IF; \
           RETURN NEW; \
         END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER slow_marks BEFORE UPDATE ON eventful_outbox FOR EACH ROW \
         EXECUTE FUNCTION slow_marks()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // The 15th event (key k0, in the second batch of 10) fails once, retryably.
    let unlucky = ids[14];
    let failed_once = Arc::new(AtomicBool::new(false));
    let memory = InMemoryPublisher::new();
    let flag = failed_once.clone();
    memory.fail_when(move |r| {
        (r.id == unlucky && !flag.swap(true, Ordering::SeqCst))
            .then(|| Error::PublishRetryable("broker busy".into()))
    });
    let recording = common::Recording::new(memory.clone());
    let publisher = Arc::new(Overlaps {
        inner: recording.clone(),
        pool: db.pool.clone(),
        previous: Default::default(),
        count: Default::default(),
    });
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher.clone())
        .batch_size(10)
        .backoff(eventful_outbox::Backoff::new(
            Duration::from_millis(200),
            Duration::from_millis(200),
        ))
        .build()
        .unwrap();
    drain(&db, relay, 200).await;

    assert!(
        failed_once.load(Ordering::SeqCst),
        "the unlucky event was never sent"
    );
    let overlaps = publisher.count.load(Ordering::Relaxed);
    assert!(overlaps >= 10, "only {overlaps} batches overlapped a mark");
    for id in &ids {
        assert_eq!(
            acks_of(&recording, *id),
            1,
            "event {id} acknowledged more or less than once"
        );
    }
    assert_key_order(&memory.messages(), &expected, false);
}

/// Sends all but the last event of its first batch and returns one result fewer (a broken
/// publisher; the relay treats the missing result as a retryable failure).
struct ShortOnce<P> {
    inner: P,
    done: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl<P: eventful_outbox::Publisher> eventful_outbox::Publisher for ShortOnce<P> {
    async fn publish_batch(
        &self,
        events: &[eventful_outbox::OutboxRecord],
    ) -> Vec<Result<(), Error>> {
        if events.len() > 1 && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return self.inner.publish_batch(&events[..events.len() - 1]).await;
        }
        self.inner.publish_batch(events).await
    }
}

/// An event without a result is a failure of its key for the overlapping fetch too: the
/// batch fetched while its failure is being recorded (slowed by a trigger) must not carry a
/// later event of that key.
#[tokio::test]
async fn an_event_missing_from_the_publishers_results_is_not_overtaken_during_a_backlog() {
    let (db, outbox) = common::setup().await;
    let mut expected: std::collections::HashMap<String, Vec<Uuid>> = Default::default();
    for i in 0..50 {
        let key = format!("k{}", i % 5);
        let id = record(&db, &outbox, &key, &format!("e{i}")).await;
        expected.entry(key).or_default().push(id);
    }
    sqlx::query(
        "CREATE FUNCTION slow_failures() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.attempts > OLD.attempts THEN PERFORM pg_sleep(0.3); END IF; RETURN NEW; END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER slow_failures BEFORE UPDATE ON eventful_outbox FOR EACH ROW \
         EXECUTE FUNCTION slow_failures()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let memory = InMemoryPublisher::new();
    let publisher = ShortOnce {
        inner: memory.clone(),
        done: Default::default(),
    };
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher)
        .batch_size(10)
        .backoff(eventful_outbox::Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(100),
        ))
        .build()
        .unwrap();
    drain(&db, relay, 50).await;
    assert_key_order(&memory.messages(), &expected, false);
}

/// Runs `relay` until `events` rows are marked published, then stops it.
async fn drain(db: &TestDatabase, relay: Relay, events: i64) {
    let cancel = CancellationToken::new();
    let handle = relay.spawn(cancel.clone());
    wait_until(
        "every event is marked published",
        Duration::from_secs(30),
        || async { common::published_count(db).await == events },
    )
    .await;
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// Checks, per key of `expected` (event ids in commit order), that the first occurrences in
/// `messages` are exactly that list and, with `latest_last`, that the key's last message is
/// its latest event (what a consumer keeping the last event per key ends with).
fn assert_key_order(
    messages: &[eventful_outbox::PublishedMessage],
    expected: &std::collections::HashMap<String, Vec<Uuid>>,
    latest_last: bool,
) {
    let mut firsts: std::collections::HashMap<&str, Vec<Uuid>> = Default::default();
    let mut last: std::collections::HashMap<&str, Uuid> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for m in messages {
        if seen.insert(m.event_id) {
            firsts.entry(&m.key).or_default().push(m.event_id);
        }
        last.insert(&m.key, m.event_id);
    }
    for (key, ids) in expected {
        assert_eq!(
            firsts.get(key.as_str()),
            Some(ids),
            "key {key}: first occurrences out of commit order"
        );
        if latest_last {
            assert_eq!(
                last.get(key.as_str()),
                ids.last(),
                "key {key}: the last message on the topic is not its latest event"
            );
        }
    }
}
