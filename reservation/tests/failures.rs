//! Redis failures: script cache flushed, server down during a call, server gone for good.
//! Each test runs its own private `redis-server` (AOF, fsync always).

use std::time::{Duration, Instant};

use eventful_reservation::{RedisReservations, ReservationState, ReservationStore, StockLevel};
use eventful_test_support::{init_tracing, RedisServer};

async fn store(server: &RedisServer) -> RedisReservations {
    RedisReservations::builder(server.url().as_str())
        .namespace("failures")
        .connect()
        .await
        .unwrap()
}

/// `SCRIPT FLUSH` (what a restart or failover does to the cache): calls reload the
/// scripts on `NOSCRIPT` and carry on.
#[tokio::test]
async fn serial_scripts_are_reloaded_after_script_flush() {
    init_tracing();
    let server = RedisServer::start().await;
    let store = store(&server).await;
    store.set_stock("a", 5).await.unwrap();
    store
        .reserve("r1", &[("a", 2)], Duration::from_secs(60))
        .await
        .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store.confirm("r1").await.unwrap().state,
        ReservationState::Confirmed
    );
    store
        .reserve("r2", &[("a", 1)], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(2, 1, 2));
}

/// A call made while Redis is down completes once it is back (automatic reconnect and
/// bounded retries), and the acknowledged hold survives the restart (AOF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_call_during_outage_completes_after_restart() {
    init_tracing();
    let mut server = RedisServer::start().await;
    let store = store(&server).await;
    store.set_stock("a", 5).await.unwrap();
    server.kill().await;
    let call = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .reserve("r", &[("a", 3)], Duration::from_secs(60))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "the call should be waiting for Redis");
    server.restart().await;
    let hold = call.await.unwrap().unwrap();
    assert_eq!(hold.state, ReservationState::Held);
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(2, 3, 0));
    // And after another crash the acknowledged hold is still there.
    server.restart().await;
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(2, 3, 0));
    assert_eq!(
        store.release("r").await.unwrap().state,
        ReservationState::Released
    );
}

/// With Redis gone for good, a call fails with a retryable error after its bounded
/// retries instead of hanging.
#[tokio::test]
async fn serial_retries_are_bounded_when_redis_stays_down() {
    init_tracing();
    let mut server = RedisServer::start().await;
    let store = RedisReservations::builder(server.url().as_str())
        .namespace("failures")
        .max_attempts(3)
        .backoff(eventful_reservation::Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .connect()
        .await
        .unwrap();
    store.set_stock("a", 5).await.unwrap();
    server.kill().await;
    let start = Instant::now();
    let err = store
        .reserve("r", &[("a", 1)], Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
}
