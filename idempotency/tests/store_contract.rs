//! The guard storage contract (`eventful_idempotency::contract`), run against PostgreSQL
//! and the in-memory twin; then the guard's own guarantees on PostgreSQL.

mod in_memory {
    use eventful_idempotency::store::InMemoryStore;

    eventful_idempotency::contract_tests!(async { InMemoryStore::new() });
}

mod postgres {
    use eventful_idempotency::store::PostgresStore;
    use eventful_test_support::TestDatabase;

    async fn store() -> PostgresStore {
        let db = TestDatabase::create_with_pool_size(20).await;
        eventful_idempotency::migrate(&db.pool).await.unwrap();
        PostgresStore::new(db.pool.clone())
    }

    eventful_idempotency::contract_tests!(store());
}

use eventful_idempotency::{Processed, ProcessedEvents};
use eventful_test_support::TestDatabase;
use uuid::Uuid;

/// The guard used directly on two connections of two pools: exactly one `First` per id,
/// many times over, and the effect row written with it exists exactly once.
#[tokio::test]
async fn guard_racing_on_two_connections_yields_one_first() {
    let db = TestDatabase::create().await;
    let guard = ProcessedEvents::new("racers");
    guard.migrate(&db.pool).await.unwrap();
    // Migrating twice (and concurrently) is harmless.
    let (a, b) = tokio::join!(guard.migrate(&db.pool), guard.migrate(&db.pool));
    a.unwrap();
    b.unwrap();
    sqlx::query("CREATE TABLE effects (event_id uuid NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let other_pool = db.new_pool(2).await;
    let mut firsts = 0;
    for _ in 0..100 {
        let id = Uuid::now_v7();
        let run = |pool: sqlx::PgPool, guard: ProcessedEvents| async move {
            let mut tx = pool.begin().await.unwrap();
            let seen = guard.check_and_record(&mut tx, id).await.unwrap();
            if seen.is_first() {
                sqlx::query("INSERT INTO effects VALUES ($1)")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
            seen
        };
        let (x, y) = tokio::join!(
            run(db.pool.clone(), guard.clone()),
            run(other_pool.clone(), guard.clone())
        );
        assert!(
            matches!(
                (x, y),
                (Processed::First, Processed::Duplicate) | (Processed::Duplicate, Processed::First)
            ),
            "exactly one First, got {x:?} and {y:?}"
        );
        firsts += 1;
    }
    let (effects, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM effects")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((effects, distinct), (firsts, firsts));
}

/// A duplicate can answer with the result the first delivery stored.
#[tokio::test]
async fn duplicate_reads_the_stored_result() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Receipt {
        invoice: u32,
    }
    let db = TestDatabase::create().await;
    let guard = ProcessedEvents::new("billing");
    guard.migrate(&db.pool).await.unwrap();
    let id = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    assert!(guard
        .check_and_record(&mut tx, id)
        .await
        .unwrap()
        .is_first());
    guard
        .save_result(&mut tx, id, &Receipt { invoice: 7 })
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        guard.check_and_record(&mut tx, id).await.unwrap(),
        Processed::Duplicate
    );
    let stored: Option<Receipt> = guard.stored_result(&mut tx, id).await.unwrap();
    assert_eq!(stored, Some(Receipt { invoice: 7 }));
    // Another consumer has its own records.
    let other = ProcessedEvents::new("shipping");
    assert!(other
        .check_and_record(&mut tx, id)
        .await
        .unwrap()
        .is_first());
    assert_eq!(
        other.stored_result::<Receipt>(&mut tx, id).await.unwrap(),
        None
    );
}

/// `Retention` purges old records in the background and stops on cancel.
/// The batch form answers per id as the single form would: ids recorded before (committed)
/// are duplicates, ids of a rolled-back batch are first again, and the guard of one
/// consumer leaves another's records alone.
#[tokio::test]
async fn check_and_record_many_returns_only_the_first_deliveries() {
    let db = TestDatabase::create().await;
    let guard = ProcessedEvents::new("billing");
    guard.migrate(&db.pool).await.unwrap();
    let (a, b, c, d) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );

    let mut tx = db.pool.begin().await.unwrap();
    let mut first = guard.check_and_record_many(&mut tx, &[b, a]).await.unwrap();
    first.sort_unstable();
    assert_eq!(first, vec![a, b]);
    tx.commit().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let first = guard
        .check_and_record_many(&mut tx, &[a, d, b])
        .await
        .unwrap();
    assert_eq!(first, vec![d]);
    tx.rollback().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let mut first = guard
        .check_and_record_many(&mut tx, &[c, d, a])
        .await
        .unwrap();
    first.sort_unstable();
    assert_eq!(first, vec![c, d], "d's batch rolled back: d is first again");
    assert_eq!(
        guard.check_and_record(&mut tx, c).await.unwrap(),
        Processed::Duplicate
    );
    let other = ProcessedEvents::new("shipping");
    assert_eq!(
        other.check_and_record_many(&mut tx, &[a]).await.unwrap(),
        vec![a]
    );
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn retention_task_purges_and_stops() {
    let db = TestDatabase::create().await;
    let guard = ProcessedEvents::new("retained");
    guard.migrate(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    for _ in 0..30 {
        guard
            .check_and_record(&mut tx, Uuid::now_v7())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = eventful_idempotency::Retention::new(db.pool.clone(), guard.clone())
        .max_age(std::time::Duration::ZERO)
        .interval(std::time::Duration::from_millis(10))
        .batch_size(7)
        .spawn(cancel.clone());
    let pool = db.pool.clone();
    eventful_test_support::wait_until(
        "the records are purged",
        std::time::Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move {
                let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM eventful_processed_events")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                n == 0
            }
        },
    )
    .await;
    cancel.cancel();
    task.await.unwrap();
}

/// Under REPEATABLE READ the racing transaction is aborted with a serialization failure
/// instead of seeing `Duplicate`; the error is classified as retryable (a retry in a new
/// transaction then sees `Duplicate`).
#[tokio::test]
async fn repeatable_read_race_is_a_retryable_error() {
    let db = TestDatabase::create().await;
    let guard = ProcessedEvents::new("rr");
    guard.migrate(&db.pool).await.unwrap();
    let id = Uuid::now_v7();
    let mut first = db.pool.begin().await.unwrap();
    let mut second = db.pool.begin().await.unwrap();
    for tx in [&mut first, &mut second] {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut **tx)
            .await
            .unwrap();
        // Take the snapshot now.
        sqlx::query("SELECT 1").execute(&mut **tx).await.unwrap();
    }
    assert!(guard
        .check_and_record(&mut first, id)
        .await
        .unwrap()
        .is_first());
    let racer = {
        let guard = guard.clone();
        tokio::spawn(async move {
            let result = guard.check_and_record(&mut second, id).await;
            drop(second);
            result
        })
    };
    first.commit().await.unwrap();
    let error = racer.await.unwrap().unwrap_err();
    assert!(error.is_retryable(), "{error}");
    let mut retry = db.pool.begin().await.unwrap();
    assert_eq!(
        guard.check_and_record(&mut retry, id).await.unwrap(),
        Processed::Duplicate
    );
}
