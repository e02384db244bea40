//! The relay's instruments in the `metrics` facade (feature `metrics`), read from a
//! process-wide recorder, against the real PostgreSQL. Each test uses its own database and
//! outbox table (the `database` and `table` labels), so parallel tests read only their own
//! series.
// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventful_outbox::{Backoff, Error, InMemoryPublisher, NewEvent, Outbox, Relay};
use eventful_test_support::metrics::{counter, gauge, install};
use eventful_test_support::{wait_until, TestDatabase};
use tokio_util::sync::CancellationToken;

async fn record(db: &TestDatabase, outbox: &Outbox, key: &str) {
    let mut tx = db.pool.begin().await.unwrap();
    let event = NewEvent::bytes("t", key, "E", b"{}".to_vec());
    outbox.record(&mut *tx, event).await.unwrap();
    tx.commit().await.unwrap();
}

/// Five events published, one held back by retryable failures, one parked: the counters
/// and the pending / parked / oldest-age gauges say so, and match `RelayMetrics`; once the
/// held event goes out, pending and the oldest age drop to 0.
#[tokio::test]
async fn relay_counters_and_gauges_reach_the_recorder() {
    install();
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    let table = format!("ob_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let outbox = Outbox::builder().table(&table).build().unwrap();
    outbox.migrate(&db.pool).await.unwrap();
    let label = format!("public.{table}");
    let by_table = [("database", db.name.as_str()), ("table", label.as_str())];

    let release = Arc::new(AtomicBool::new(false));
    let publisher = InMemoryPublisher::new();
    let released = release.clone();
    publisher.fail_when(move |r| match r.key.as_str() {
        "held" if !released.load(Ordering::SeqCst) => {
            Some(Error::PublishRetryable("broker busy".into()))
        }
        "poison" => Some(Error::PublishPermanent("rejected".into())),
        _ => None,
    });
    for i in 0..5 {
        record(&db, &outbox, &format!("good-{i}")).await;
    }
    record(&db, &outbox, "held").await;
    record(&db, &outbox, "poison").await;

    let cancel = CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), outbox.clone(), publisher)
        .lease_ttl(Duration::from_millis(800))
        .poll_interval(Duration::from_millis(50))
        .max_attempts(1000)
        .backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(200),
        ))
        .build()
        .unwrap();
    let snapshot = relay.metrics();
    let handle = relay.spawn(cancel.clone());

    wait_until(
        "5 published, 1 parked, 1 retried, gauges refreshed with 1 pending and 1 parked",
        Duration::from_secs(20),
        || async {
            counter("eventful_outbox_published_total", &by_table) == 5
                && counter("eventful_outbox_parked_total", &by_table) == 1
                && counter("eventful_outbox_retried_total", &by_table) >= 1
                && gauge("eventful_outbox_pending", &by_table) == Some(1.0)
                && gauge("eventful_outbox_parked", &by_table) == Some(1.0)
                && gauge("eventful_outbox_oldest_pending_age_seconds", &by_table)
                    .is_some_and(|age| age > 0.0)
        },
    )
    .await;
    let m = snapshot.snapshot();
    assert_eq!(m.published, 5);
    assert_eq!(m.parked, 1);
    assert_eq!(
        m.retried,
        counter("eventful_outbox_retried_total", &by_table),
        "the facade counts the same retries as RelayMetrics"
    );

    release.store(true, Ordering::SeqCst);
    wait_until(
        "the held event is published and the pending gauge drops to 0",
        Duration::from_secs(20),
        || async {
            counter("eventful_outbox_published_total", &by_table) == 6
                && gauge("eventful_outbox_pending", &by_table) == Some(0.0)
                && gauge("eventful_outbox_oldest_pending_age_seconds", &by_table) == Some(0.0)
        },
    )
    .await;
    assert_eq!(snapshot.snapshot().published, 6);
    assert_eq!(gauge("eventful_outbox_parked", &by_table), Some(1.0));
    cancel.cancel();
    handle.await.unwrap().unwrap();
}
