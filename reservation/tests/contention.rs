//! The invariants under contention: 64 tasks on 4 hot SKUs for several seconds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{check_end_state, run, Config};
use eventful_reservation::{InMemoryReservations, RedisReservations, ReservationStore};
use eventful_test_support::{init_tracing, RedisServer, TestRedis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_invariant_under_contention_in_memory() {
    let store: Arc<dyn ReservationStore> = Arc::new(InMemoryReservations::new());
    let config = Config::default();
    let report = run(store.clone(), Config::default(), async {}).await;
    check_end_state(store.as_ref(), &config, &report).await;
    assert_eq!(report.retryable_errors, 0);
}

/// Coalescing on: calls go to Redis in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_invariant_under_contention_redis() {
    invariant_under_contention_redis(true).await;
}

/// Coalescing off: one script per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_invariant_under_contention_redis_uncoalesced() {
    invariant_under_contention_redis(false).await;
}

async fn invariant_under_contention_redis(coalesce: bool) {
    init_tracing();
    let redis = TestRedis::connect().await;
    let store = RedisReservations::builder(redis.url.as_str())
        .key_prefix(redis.prefix.clone())
        .namespace("contention")
        .retention(Duration::from_secs(600))
        .coalesce(coalesce)
        .connect()
        .await
        .unwrap();
    let store: Arc<dyn ReservationStore> = Arc::new(store);
    let config = Config::default();
    let report = run(store.clone(), Config::default(), async {}).await;
    check_end_state(store.as_ref(), &config, &report).await;
    assert_eq!(
        report.retryable_errors, 0,
        "no failures expected on a healthy Redis"
    );
}

/// Same run against a private Redis (`appendonly yes`, `appendfsync always`) killed
/// (SIGKILL) and restarted mid-run: clients reconnect by themselves, every acknowledged
/// outcome survives, and the invariants hold throughout and at the end. Coalescing on
/// : batches are in flight when the server dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_invariant_survives_redis_restart() {
    invariant_survives_redis_restart(true).await;
}

/// The same with coalescing off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_invariant_survives_redis_restart_uncoalesced() {
    invariant_survives_redis_restart(false).await;
}

async fn invariant_survives_redis_restart(coalesce: bool) {
    init_tracing();
    let mut server = RedisServer::start().await;
    let store = RedisReservations::builder(server.url().as_str())
        .namespace("restart")
        .coalesce(coalesce)
        .connect()
        .await
        .unwrap();
    let store: Arc<dyn ReservationStore> = Arc::new(store);
    let config = Config {
        duration: Duration::from_secs(6),
        ..Config::default()
    };
    let client = redis::Client::open(server.url()).unwrap();
    let run_id = || async {
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find(|l| l.starts_with("run_id:"))
            .unwrap()
            .to_owned()
    };
    let first_run = run_id().await;
    // Two SIGKILL + restarts while 64 tasks are busy.
    let restart = async {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            server.restart().await;
        }
    };
    let report = run(
        store.clone(),
        Config {
            duration: config.duration,
            ..Config::default()
        },
        restart,
    )
    .await;
    check_end_state(store.as_ref(), &config, &report).await;
    assert_ne!(run_id().await, first_run, "the server was not restarted");
    assert!(
        report.ops_after_disruption > 100,
        "clients did not resume after the restart: {} operations",
        report.ops_after_disruption
    );
}
