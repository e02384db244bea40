//! The contract every [`ProcessedStore`] backend must pass (feature `test-utils`).
//!
//! Plain public async functions that panic on a broken guarantee, in the style of
//! `object_store::integration` (and like `eventful_reservation::contract`). Give each one a
//! fresh store; or let [`contract_tests!`](crate::contract_tests) generate one
//! `#[tokio::test]` per function:
//!
//! ```
//! use eventful_idempotency::store::InMemoryStore;
//!
//! eventful_idempotency::contract_tests!(async { InMemoryStore::new() });
//! # fn main() {}
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// Generates one `#[tokio::test]` per contract function; `$factory` is an expression
/// evaluating to a future of a fresh store, evaluated once per test.
#[macro_export]
macro_rules! contract_tests {
    ($factory:expr) => {
        $crate::contract_tests!(@each $factory;
            first_then_duplicate,
            rollback_leaves_no_record,
            consumers_are_independent,
            concurrent_record_waits_for_holder,
            racing_deliveries_apply_once,
            stored_result_commits_with_record,
            purge_deletes_old_records_in_batches
        );
    };
    (@each $factory:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $factory.await;
                $crate::contract::$name(&store).await;
            }
        )*
    };
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::store::ProcessedStore;
use crate::Processed;

fn consumer() -> String {
    format!("contract-{}", Uuid::new_v4().simple())
}

/// The first record of an id is `First`; every later one, in other transactions, is
/// `Duplicate`; recording twice in one transaction is `Duplicate` too.
pub async fn first_then_duplicate<S: ProcessedStore>(store: &S) {
    let c = consumer();
    let id = Uuid::now_v7();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.check_and_record(&mut tx, &c, id).await.unwrap(),
        Processed::First
    );
    assert_eq!(
        store.check_and_record(&mut tx, &c, id).await.unwrap(),
        Processed::Duplicate
    );
    store.commit(tx).await.unwrap();
    for _ in 0..3 {
        let mut tx = store.begin().await.unwrap();
        assert_eq!(
            store.check_and_record(&mut tx, &c, id).await.unwrap(),
            Processed::Duplicate
        );
        store.commit(tx).await.unwrap();
    }
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store
            .check_and_record(&mut tx, &c, Uuid::now_v7())
            .await
            .unwrap(),
        Processed::First,
        "another id is independent"
    );
    store.rollback(tx).await.unwrap();
}

/// A rolled-back (or dropped) transaction leaves no record.
pub async fn rollback_leaves_no_record<S: ProcessedStore>(store: &S) {
    let c = consumer();
    let id = Uuid::now_v7();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.check_and_record(&mut tx, &c, id).await.unwrap(),
        Processed::First
    );
    store.rollback(tx).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.check_and_record(&mut tx, &c, id).await.unwrap(),
        Processed::First
    );
    drop(tx);
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.check_and_record(&mut tx, &c, id).await.unwrap(),
        Processed::First
    );
    store.commit(tx).await.unwrap();
}

/// Two consumer names each see an event once.
pub async fn consumers_are_independent<S: ProcessedStore>(store: &S) {
    let (a, b) = (consumer(), consumer());
    let id = Uuid::now_v7();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.check_and_record(&mut tx, &a, id).await.unwrap(),
        Processed::First
    );
    assert_eq!(
        store.check_and_record(&mut tx, &b, id).await.unwrap(),
        Processed::First
    );
    store.commit(tx).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.check_and_record(&mut tx, &a, id).await.unwrap(),
        Processed::Duplicate
    );
    assert_eq!(
        store.check_and_record(&mut tx, &b, id).await.unwrap(),
        Processed::Duplicate
    );
    store.commit(tx).await.unwrap();
}

/// A second transaction recording an id held by an open one waits for it: it is still
/// waiting 100 ms later, gets `First` once the holder rolls back, and `Duplicate` when the
/// holder commits.
pub async fn concurrent_record_waits_for_holder<S: ProcessedStore + Clone>(store: &S) {
    let store = Arc::new(store.clone());
    for holder_commits in [false, true] {
        let c = consumer();
        let id = Uuid::now_v7();
        let mut holder = store.begin().await.unwrap();
        assert_eq!(
            store.check_and_record(&mut holder, &c, id).await.unwrap(),
            Processed::First
        );
        let racer = {
            let store = store.clone();
            let c = c.clone();
            tokio::spawn(async move {
                let mut tx = store.begin().await.unwrap();
                let seen = store.check_and_record(&mut tx, &c, id).await.unwrap();
                store.commit(tx).await.unwrap();
                seen
            })
        };
        let mut racer = racer;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut racer)
                .await
                .is_err(),
            "the racer must wait while the holder's transaction is open"
        );
        let expected = if holder_commits {
            store.commit(holder).await.unwrap();
            Processed::Duplicate
        } else {
            store.rollback(holder).await.unwrap();
            Processed::First
        };
        let seen = tokio::time::timeout(Duration::from_secs(10), racer)
            .await
            .expect("racer finished")
            .unwrap();
        assert_eq!(seen, expected, "holder_commits={holder_commits}");
    }
}

/// 8 transactions record each of 50 ids at once and "apply an effect" when they get
/// `First`: every id gets exactly one effect.
pub async fn racing_deliveries_apply_once<S: ProcessedStore + Clone>(store: &S) {
    let (events, racers) = (50, 8);
    let store = Arc::new(store.clone());
    let c = consumer();
    let ids: Arc<Vec<Uuid>> = Arc::new((0..events).map(|_| Uuid::now_v7()).collect());
    let effects: Arc<Vec<AtomicUsize>> =
        Arc::new((0..events).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for racer in 0..racers {
        let (store, c, ids, effects) = (store.clone(), c.clone(), ids.clone(), effects.clone());
        tasks.push(tokio::spawn(async move {
            // Each racer walks the ids in a different order to maximise overlap.
            for n in 0..ids.len() {
                let i = (n + racer * 7) % ids.len();
                let mut tx = store.begin().await.unwrap();
                if store
                    .check_and_record(&mut tx, &c, ids[i])
                    .await
                    .unwrap()
                    .is_first()
                {
                    effects[i].fetch_add(1, Ordering::SeqCst);
                }
                store.commit(tx).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for (i, effect) in effects.iter().enumerate() {
        assert_eq!(effect.load(Ordering::SeqCst), 1, "event {i} applied once");
    }
}

/// A result saved with the record commits with it and is readable by later transactions;
/// a rolled-back result is not.
pub async fn stored_result_commits_with_record<S: ProcessedStore>(store: &S) {
    let c = consumer();
    let id = Uuid::now_v7();
    let value = serde_json::json!({"invoice": 42, "lines": ["a", "b"]});
    let mut tx = store.begin().await.unwrap();
    assert!(store
        .check_and_record(&mut tx, &c, id)
        .await
        .unwrap()
        .is_first());
    store
        .save_result(&mut tx, &c, id, value.clone())
        .await
        .unwrap();
    assert_eq!(
        store.stored_result(&mut tx, &c, id).await.unwrap(),
        Some(value.clone())
    );
    store.commit(tx).await.unwrap();

    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.check_and_record(&mut tx, &c, id).await.unwrap(),
        Processed::Duplicate
    );
    assert_eq!(
        store.stored_result(&mut tx, &c, id).await.unwrap(),
        Some(value.clone())
    );
    // An overwrite in a rolled-back transaction does not stick.
    store
        .save_result(&mut tx, &c, id, serde_json::json!("other"))
        .await
        .unwrap();
    store.rollback(tx).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.stored_result(&mut tx, &c, id).await.unwrap(),
        Some(value)
    );

    let other = Uuid::now_v7();
    assert_eq!(store.stored_result(&mut tx, &c, other).await.unwrap(), None);
    store.rollback(tx).await.unwrap();
}

/// Retention deletes only records older than the age, across several batches; a purged id
/// is `First` again.
pub async fn purge_deletes_old_records_in_batches<S: ProcessedStore>(store: &S) {
    let c = consumer();
    let ids: Vec<Uuid> = (0..25).map(|_| Uuid::now_v7()).collect();
    let mut tx = store.begin().await.unwrap();
    for id in &ids {
        assert!(store
            .check_and_record(&mut tx, &c, *id)
            .await
            .unwrap()
            .is_first());
    }
    store.commit(tx).await.unwrap();
    assert_eq!(
        store
            .purge_older_than(&c, Duration::from_secs(3600), 10)
            .await
            .unwrap(),
        0
    );
    let other = consumer();
    let mut tx = store.begin().await.unwrap();
    assert!(store
        .check_and_record(&mut tx, &other, ids[0])
        .await
        .unwrap()
        .is_first());
    store.commit(tx).await.unwrap();

    // Records must be strictly older than the age.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        store
            .purge_older_than(&c, Duration::ZERO, 10)
            .await
            .unwrap(),
        25
    );
    assert_eq!(
        store
            .purge_older_than(&c, Duration::ZERO, 10)
            .await
            .unwrap(),
        0
    );
    let mut tx = store.begin().await.unwrap();
    assert!(store
        .check_and_record(&mut tx, &c, ids[3])
        .await
        .unwrap()
        .is_first());
    assert_eq!(
        store
            .check_and_record(&mut tx, &other, ids[0])
            .await
            .unwrap(),
        Processed::Duplicate,
        "another consumer's records are kept"
    );
    store.rollback(tx).await.unwrap();
}
