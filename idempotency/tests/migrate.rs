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
