//! `migrate` (and `apply_idempotent_schema` under it) against the real PostgreSQL.

use eventful_test_support::TestDatabase;

/// Eight concurrent callers on an empty database, then a repeat: no error, one set of tables.
#[tokio::test]
async fn migrate_is_idempotent_and_safe_when_run_concurrently() {
    let db = TestDatabase::create_with_pool_size(10).await;
    let runs = (0..8).map(|_| eventful_idempotency::migrate(&db.pool));
    for result in futures::future::join_all(runs).await {
        result.expect("concurrent migrate");
    }
    eventful_idempotency::migrate(&db.pool)
        .await
        .expect("repeated migrate");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename IN \
         ('eventful_processed_events', 'eventful_dead_letters', 'eventful_idempotency_keys')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables, 3);
}

/// A database migrated by an earlier version (keys table without `locked_until`) is
/// upgraded in place: the column is added, existing rows are kept.
#[tokio::test]
async fn migrate_upgrades_an_existing_idempotency_keys_table() {
    let db = TestDatabase::create().await;
    sqlx::raw_sql(include_str!("../migrations/0003_idempotency_keys.sql"))
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO eventful_idempotency_keys (scope, key, request_hash, token, state, expires_at) \
         VALUES ('POST /orders', 'k', 'h', gen_random_uuid(), 'completed', now() + interval '1 day')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    eventful_idempotency::migrate(&db.pool).await.unwrap();
    eventful_idempotency::migrate(&db.pool).await.unwrap();
    let (rows, without_lock): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE locked_until IS NULL) FROM eventful_idempotency_keys",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((rows, without_lock), (1, 1));
}
