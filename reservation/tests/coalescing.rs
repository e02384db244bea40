//! Coalescing on a private `redis-server` (AOF, fsync always): the batch size limit, a
//! script that keeps the server busy, and a restart while batches are in flight. The
//! semantics of batched calls are in the contract suite (`batch_*`), which runs against
//! a coalescing store in tests/contract.rs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventful_reservation::{
    Backoff, Error, RedisReservations, ReservationState, ReservationStore, StockLevel,
};
use eventful_test_support::{init_tracing, wait_until, RedisServer};

const HOUR: Duration = Duration::from_secs(3600);

async fn admin(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `calls=` of one command in `INFO commandstats` (0 if never called).
async fn calls(server: &RedisServer, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin(server).await)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// 200 calls at once with batches of at most 8: every call is answered, the queue is
/// sent as at least 25 scripts (the limit holds) and fewer than 200 (calls were coalesced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_batch_size_limit_splits_the_queue() {
    init_tracing();
    let server = RedisServer::start().await;
    let store = RedisReservations::builder(server.url().as_str())
        .coalesce(true)
        .namespace("limit")
        .max_batch(8)
        .connect()
        .await
        .unwrap();
    store.set_stock("hot", 1000).await.unwrap();
    // Load the batch script first so that the count below is of batches only.
    store.reserve("warm-up", &[("hot", 1)], HOUR).await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin(&server).await)
        .await
        .unwrap();
    let results = futures::future::join_all((0..200).map(|i| {
        let store = store.clone();
        async move { store.reserve(&format!("r{i}"), &[("hot", 1)], HOUR).await }
    }))
    .await;
    for result in &results {
        assert_eq!(result.as_ref().unwrap().state, ReservationState::Held);
    }
    let scripts = calls(&server, "evalsha").await;
    assert!(
        (25..200).contains(&scripts),
        "200 calls in batches of at most 8 took {scripts} scripts"
    );
    assert_eq!(
        store.stock("hot").await.unwrap(),
        StockLevel::new(799, 201, 0)
    );
}

/// A lone call on a coalescing store goes to Redis as the single-call script (no batch
/// overhead: `GET` of its record, no `MGET`); concurrent calls still go as batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_lone_call_is_sent_as_the_single_call_script() {
    init_tracing();
    let server = RedisServer::start().await;
    let store = RedisReservations::builder(server.url().as_str())
        .coalesce(true)
        .namespace("lone")
        .connect()
        .await
        .unwrap();
    store.set_stock("hot", 1000).await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin(&server).await)
        .await
        .unwrap();
    for i in 0..3 {
        let held = store
            .reserve(&format!("lone-{i}"), &[("hot", 1)], HOUR)
            .await;
        assert_eq!(held.unwrap().state, ReservationState::Held);
    }
    assert_eq!(
        calls(&server, "get").await,
        3,
        "one record read per lone call"
    );
    assert_eq!(
        calls(&server, "mget").await,
        0,
        "a lone call went as a batch"
    );
    let results = futures::future::join_all((0..100).map(|i| {
        let store = store.clone();
        async move { store.reserve(&format!("r{i}"), &[("hot", 1)], HOUR).await }
    }))
    .await;
    assert!(results.iter().all(Result::is_ok));
    assert!(
        calls(&server, "mget").await > 0,
        "100 calls at once were not batched"
    );
    assert_eq!(
        store.stock("hot").await.unwrap(),
        StockLevel::new(897, 103, 0)
    );
}

/// Runs `callers` tasks in a closed loop (each sends its next call as soon as its previous
/// one is answered) of `rounds` reserves each, on a store with `batches_in_flight` slots;
/// returns the scripts run and how many of them were lone calls, after checking that every
/// hold was made exactly once.
async fn closed_loop(
    namespace: &str,
    callers: u64,
    rounds: u64,
    batches_in_flight: usize,
) -> (u64, u64) {
    let server = RedisServer::start().await;
    let store = RedisReservations::builder(server.url().as_str())
        .coalesce(true)
        .batches_in_flight(batches_in_flight)
        .namespace(namespace)
        .connect()
        .await
        .unwrap();
    store.set_stock("hot", 100_000).await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin(&server).await)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                for r in 0..rounds {
                    let held = store
                        .reserve(&format!("c{c}-{r}"), &[("hot", 1)], HOUR)
                        .await;
                    assert_eq!(held.unwrap().state, ReservationState::Held);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let scripts = calls(&server, "evalsha").await;
    let lone = calls(&server, "get").await;
    let calls_made = callers * rounds;
    assert_eq!(
        store.stock("hot").await.unwrap(),
        StockLevel::new(100_000 - calls_made, calls_made, 0)
    );
    (scripts, lone)
}

/// 32 callers in a closed loop on one runtime worker and one batch slot: once answered
/// together, they call again together, so every batch after the first carries all 32
/// calls. Without stepping back for the answered callers, the batch task woke on the first
/// of them and sent it alone, then the other 31 a round trip later: twice the scripts,
/// half of them batches of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn serial_closed_loop_callers_go_as_full_batches() {
    init_tracing();
    const ROUNDS: u64 = 100;
    let (scripts, lone) = closed_loop("closed", 32, ROUNDS, 1).await;
    assert!(
        scripts <= ROUNDS + ROUNDS / 10 && lone <= ROUNDS / 10,
        "32 closed-loop callers x {ROUNDS} calls took {scripts} scripts, {lone} of them lone calls (expected about {ROUNDS} full batches)"
    );
}

/// 64 callers in a closed loop with two batch slots: each batch aims at half
/// the demand, so the loop settles into two batches of about 32 that overlap (the server
/// runs one while the client answers the other's callers), not one batch of 64 that
/// leaves the server idle while its callers are answered, nor a trickle of small batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn serial_closed_loop_callers_split_into_two_overlapping_batches() {
    init_tracing();
    const ROUNDS: u64 = 100;
    let (scripts, lone) = closed_loop("halves", 64, ROUNDS, 2).await;
    assert!(
        (2 * ROUNDS - ROUNDS / 5..=2 * ROUNDS + ROUNDS / 5).contains(&scripts)
            && lone <= ROUNDS / 10,
        "64 closed-loop callers x {ROUNDS} calls took {scripts} scripts, {lone} of them lone calls (expected about {} batches of 32)",
        2 * ROUNDS
    );
}

/// While another script keeps Redis busy (`BUSY` replies), every caller of a batch gets a
/// retryable error (nothing held); with retries on, calls made meanwhile complete once the
/// script is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_busy_server_gives_every_caller_a_retryable_error() {
    init_tracing();
    let server = RedisServer::start().await;
    let builder = || {
        RedisReservations::builder(server.url().as_str())
            .coalesce(true)
            .namespace("busy")
            .backoff(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(100),
            ))
    };
    let once = builder().max_attempts(1).connect().await.unwrap();
    let retrying = builder().max_attempts(30).connect().await.unwrap();
    once.set_stock("a", 100).await.unwrap();
    let mut conn = admin(&server).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg("50")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A read-only script that spins until SCRIPT KILL (its own reply is irrelevant).
    let spinner = tokio::spawn({
        let mut conn = admin(&server).await;
        async move {
            let _ = redis::cmd("EVAL")
                .arg("while true do end")
                .arg(0)
                .query_async::<redis::Value>(&mut conn)
                .await;
        }
    });
    wait_until("Redis answers BUSY", Duration::from_secs(10), || {
        let mut conn = conn.clone();
        async move {
            let ping = redis::cmd("PING").query_async::<String>(&mut conn).await;
            matches!(ping, Err(e) if e.code() == Some("BUSY"))
        }
    })
    .await;

    let results = futures::future::join_all((0..16).map(|i| {
        let once = once.clone();
        async move { once.reserve(&format!("b{i}"), &[("a", 1)], HOUR).await }
    }))
    .await;
    for result in &results {
        match result {
            Err(e) => assert!(e.is_retryable(), "BUSY must be retryable: {e:?}"),
            Ok(r) => panic!("answered while Redis was busy: {r:?}"),
        }
    }
    let waiting: Vec<_> = (0..16)
        .map(|i| {
            let retrying = retrying.clone();
            tokio::spawn(async move { retrying.reserve(&format!("w{i}"), &[("a", 1)], HOUR).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("KILL")
        .query_async(&mut conn)
        .await
        .unwrap();
    spinner.await.unwrap();
    for call in waiting {
        assert_eq!(call.await.unwrap().unwrap().state, ReservationState::Held);
    }
    for i in 0..16 {
        assert_eq!(
            once.reservation(&format!("b{i}")).await.unwrap(),
            None,
            "a call refused with BUSY was applied"
        );
    }
    assert_eq!(once.stock("a").await.unwrap(), StockLevel::new(84, 16, 0));
}

/// SIGKILL and restart of Redis while 64 callers keep batches in flight (no automatic
/// retries): every caller gets an answer or a retryable error, every acknowledged hold
/// survives, and no stock is lost — held equals the holds recorded, whatever the fate of
/// the calls that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_restart_mid_batch_answers_every_caller() {
    init_tracing();
    const STOCK: u64 = 1_000_000;
    let mut server = RedisServer::start().await;
    let store = RedisReservations::builder(server.url().as_str())
        .coalesce(true)
        .namespace("midbatch")
        .max_attempts(1)
        .connect()
        .await
        .unwrap();
    store.set_stock("hot", STOCK).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let outcomes: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let workers: Vec<_> = (0..64)
        .map(|task| {
            let (store, stop) = (store.clone(), stop.clone());
            let (acknowledged, outcomes) = (acknowledged.clone(), outcomes.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("t{task}-{n}");
                    let ok = match store.reserve(&id, &[("hot", 1)], HOUR).await {
                        Ok(r) => {
                            assert_eq!(r.state, ReservationState::Held, "{id}");
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                            true
                        }
                        Err(e) if e.is_retryable() => {
                            // Redis is down: do not spin on the refused reconnect.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            false
                        }
                        Err(e) => panic!("{id}: neither an answer nor retryable: {e:?}"),
                    };
                    outcomes.lock().unwrap().insert(id, ok);
                }
            })
        })
        .collect();
    let acked = || acknowledged.load(Ordering::Relaxed);
    wait_until(
        "holds are acknowledged",
        Duration::from_secs(30),
        || async { acked() > 2000 },
    )
    .await;
    server.restart().await;
    let before = acked();
    wait_until(
        "holds are acknowledged after the restart",
        Duration::from_secs(30),
        || async { acked() > before + 2000 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("a caller panicked");
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let failed = outcomes.values().filter(|ok| !**ok).count();
    let mut recorded = 0u64;
    for (id, ok) in &outcomes {
        match store.reservation(id).await.unwrap() {
            Some(r) => {
                assert_eq!(r.state, ReservationState::Held, "{id}");
                recorded += 1;
            }
            None => assert!(!ok, "{id}: acknowledged hold lost in the restart"),
        }
    }
    let level = store.stock("hot").await.unwrap();
    eprintln!(
        "restart mid-batch: {} calls, {failed} retryable failures, {recorded} holds, {level:?}",
        outcomes.len()
    );
    assert_eq!(level, StockLevel::new(STOCK - recorded, recorded, 0));
    assert!(
        matches!(
            store.reserve("after", &[("hot", 1)], HOUR).await,
            Ok(_) | Err(Error::InsufficientStock { .. })
        ),
        "the store works after the restart"
    );
}

/// `batch.lua` called directly with `calls` reserves of ids `ids` on `store`'s keys: two
/// shapes (1 and 2 units of `a`) and the calls' shapes as `runs` of (shape, calls).
async fn raw_batch(
    server: &RedisServer,
    store: &RedisReservations,
    ids: &[&str],
    runs: &[(u64, u64)],
) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(eventful_reservation::redis::batch_script_source())
        .arg(3 + ids.len())
        .arg(store.expiries_key())
        .arg(store.holds_key())
        .arg(store.stock_key("a"));
    for id in ids {
        cmd.arg(store.reservation_key(id));
    }
    cmd.arg(HOUR.as_millis() as u64)
        .arg(store.stock_key(""))
        .arg(1)
        .arg(2)
        .arg(ids.len())
        .arg(store.reservation_key(""));
    for qty in [1, 2] {
        cmd.arg("reserve")
            .arg(HOUR.as_millis() as u64)
            .arg(format!("[\"a\",\"{qty}\"]"))
            .arg(1)
            .arg(1)
            .arg(qty);
    }
    cmd.arg(runs.len());
    for (shape, calls) in runs {
        cmd.arg(*shape).arg(*calls);
    }
    cmd.query_async(&mut admin(server).await).await
}

/// The batch script's runs: calls of interleaved shapes each get their own shape, and runs
/// that do not describe the calls exactly (short, empty) refuse the batch whole, before
/// anything is written.
#[tokio::test]
async fn batch_runs_give_each_call_its_shape_and_bad_runs_change_nothing() {
    init_tracing();
    let server = RedisServer::start().await;
    let store = RedisReservations::builder(server.url().as_str())
        .namespace("runs")
        .connect()
        .await
        .unwrap();
    store.set_stock("a", 10).await.unwrap();

    let replies = raw_batch(&server, &store, &["x", "y", "z"], &[(1, 1), (2, 1), (1, 1)])
        .await
        .unwrap();
    let redis::Value::Array(replies) = replies else {
        panic!("not one reply per call: {replies:?}");
    };
    assert_eq!(replies.len(), 3);
    for (id, qty) in [("x", 1), ("y", 2), ("z", 1)] {
        let held = store.reservation(id).await.unwrap().unwrap();
        assert_eq!(held.state, ReservationState::Held, "{id}");
        assert_eq!(held.items, vec![("a".to_owned(), qty)], "{id}");
    }
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(6, 4, 0));

    for (runs, message) in [
        (vec![(1, 2)], "the runs do not add up to the calls"),
        (vec![(1, 0), (2, 3)], "an empty run"),
        (vec![(1, 2), (2, 2)], "the runs do not add up to the calls"),
    ] {
        let refused = raw_batch(&server, &store, &["p", "q", "r"], &runs).await;
        let error = refused.expect_err("malformed runs were applied");
        assert!(error.to_string().contains(message), "{runs:?}: {error}");
        for id in ["p", "q", "r"] {
            assert_eq!(store.reservation(id).await.unwrap(), None, "{runs:?}: {id}");
        }
        assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(6, 4, 0));
    }
}
