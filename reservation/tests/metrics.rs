//! The Redis store's instruments in the `metrics` facade (feature `metrics`), read from a
//! process-wide recorder, against the shared Redis. Each test uses its own namespace (the
//! label) and key prefix, so parallel tests read only their own series.

use std::sync::Arc;
use std::time::Duration;

use eventful_reservation::{CancellationToken, Error, Reaper, RedisReservations, ReservationStore};
use eventful_test_support::metrics::{counter, gauge, histogram, install};
use eventful_test_support::{init_tracing, wait_until, TestRedis};

#[tokio::test]
async fn holds_expiries_and_script_latency_reach_the_recorder() {
    holds_expiries_and_script_latency(false).await;
}

#[tokio::test]
async fn holds_expiries_and_script_latency_reach_the_recorder_coalesced() {
    holds_expiries_and_script_latency(true).await;
}

/// Every `reserve` outcome is counted once under its label; the reaper's expiry is counted
/// and the active-holds gauge follows the expiry index; each script round trip is timed.
async fn holds_expiries_and_script_latency(coalesce: bool) {
    install();
    init_tracing();
    let redis = TestRedis::connect().await;
    let namespace = format!("metrics-{}", redis.prefix.trim_end_matches(':'));
    let store = RedisReservations::builder(redis.url.as_str())
        .key_prefix(redis.prefix.clone())
        .namespace(namespace.clone())
        .coalesce(coalesce)
        .connect()
        .await
        .unwrap();
    let ns = namespace.as_str();
    let holds = |outcome: &str| {
        counter(
            "eventful_reservation_holds_total",
            &[("namespace", ns), ("outcome", outcome)],
        )
    };
    store.set_stock("sku", 5).await.unwrap();

    let short = Duration::from_millis(300);
    store.reserve("r1", &[("sku", 2)], short).await.unwrap();
    store.reserve("r1", &[("sku", 2)], short).await.unwrap();
    let insufficient = store.reserve("r2", &[("sku", 10)], short).await;
    assert!(matches!(insufficient, Err(Error::InsufficientStock { .. })));
    let conflict = store.reserve("r1", &[("sku", 1)], short).await;
    assert!(matches!(conflict, Err(Error::IdConflict { .. })));
    let unknown = store.reserve("r3", &[("nope", 1)], short).await;
    assert!(matches!(unknown, Err(Error::UnknownSku { .. })));
    store
        .reserve("r4", &[("sku", 1)], Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(holds("held"), 2);
    assert_eq!(holds("existing"), 1);
    assert_eq!(holds("insufficient"), 1);
    assert_eq!(holds("conflict"), 1);
    assert_eq!(holds("unknown_sku"), 1);

    let store: Arc<dyn ReservationStore> = Arc::new(store);
    let cancel = CancellationToken::new();
    let reaper = Reaper::new(store.clone())
        .interval(Duration::from_millis(50))
        .spawn(cancel.clone());
    wait_until(
        "r1 is expired and counted; r4 is the one active hold",
        Duration::from_secs(10),
        || async {
            counter("eventful_reservation_expired_total", &[("namespace", ns)]) == 1
                && gauge("eventful_reservation_active_holds", &[("namespace", ns)]) == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        store.stock("sku").await.unwrap().available,
        4,
        "r1's 2 units are back"
    );

    // One call at a time: with coalescing on, each is a batch of one, which goes as the
    // single-call script and is timed as such.
    let reserves = histogram(
        "eventful_reservation_script_duration_seconds",
        &[("namespace", ns), ("op", "reserve")],
    );
    assert!(
        reserves.len() >= 6,
        "one sample per reserve script: {reserves:?}"
    );
    let sweeps = histogram(
        "eventful_reservation_script_duration_seconds",
        &[("namespace", ns), ("op", "due")],
    );
    assert!(!sweeps.is_empty(), "the reaper's `due` script is timed");
    if coalesce {
        // Concurrent calls go as batches: each batch is one sample of its own op, and
        // every call is still counted by its outcome.
        store.set_stock("sku", 1000).await.unwrap();
        let calls = (0..32).map(|i| {
            let store = store.clone();
            async move {
                store
                    .reserve(
                        &format!("burst-{i}"),
                        &[("sku", 1)],
                        Duration::from_secs(600),
                    )
                    .await
            }
        });
        for result in futures::future::join_all(calls).await {
            result.unwrap();
        }
        assert_eq!(holds("held"), 2 + 32);
        let batches = histogram(
            "eventful_reservation_script_duration_seconds",
            &[("namespace", ns), ("op", "batch")],
        );
        assert!(!batches.is_empty(), "batches are timed");
    }
    cancel.cancel();
    reaper.await.unwrap();
}
