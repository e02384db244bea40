//! The shared migrator against the real PostgreSQL (one fresh database per test): versions
//! applied once per component, under concurrency, with edited migrations refused.

use eventful_core::migrate::{MigrateError, Migration, Migrator};
use eventful_test_support::TestDatabase;
use sqlx::PgPool;

// Deliberately NOT idempotent (no IF NOT EXISTS): a second application would fail, so
// "applied exactly once" is checked by the database itself as well as by the records.
const V1: Migration = Migration::new(1, "notes", "CREATE TABLE notes (id bigint PRIMARY KEY)");
const V2: Migration = Migration::new(2, "note body", "ALTER TABLE notes ADD COLUMN body text");

fn migrator(component: &str, migrations: &[Migration]) -> Migrator {
    Migrator::from_migrations(component, migrations.to_vec())
}

async fn recorded(pool: &PgPool, component: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT version, description FROM eventful_schema_migrations \
         WHERE component = $1 ORDER BY version",
    )
    .bind(component)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn columns(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn eight_concurrent_runs_apply_each_version_once() {
    let db = TestDatabase::create_with_pool_size(20).await;
    let m = migrator("app", &[V1, V2]);
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let (m, pool) = (m.clone(), db.pool.clone());
            tokio::spawn(async move { m.run(&pool).await })
        })
        .collect();
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(run.await.unwrap().expect("every concurrent run succeeds"));
    }
    applied.sort();
    assert_eq!(
        applied,
        vec![1, 2],
        "each version applied by exactly one caller"
    );
    assert_eq!(
        recorded(&db.pool, "app").await,
        vec![(1, "notes".into()), (2, "note body".into())]
    );
    assert_eq!(columns(&db.pool, "notes").await, vec!["id", "body"]);
}

#[tokio::test]
async fn an_added_alter_migration_applies_exactly_once() {
    let db = TestDatabase::create().await;
    assert_eq!(migrator("app", &[V1]).run(&db.pool).await.unwrap(), vec![1]);
    // The next release adds an ALTER.
    let next = migrator("app", &[V1, V2]);
    let pending: Vec<i64> = next
        .pending(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|m| m.version())
        .collect();
    assert_eq!(pending, vec![2]);
    assert_eq!(next.run(&db.pool).await.unwrap(), vec![2]);
    for _ in 0..3 {
        assert_eq!(next.run(&db.pool).await.unwrap(), Vec::<i64>::new());
    }
    assert!(next.pending(&db.pool).await.unwrap().is_empty());
    assert_eq!(columns(&db.pool, "notes").await, vec!["id", "body"]);
    assert_eq!(recorded(&db.pool, "app").await.len(), 2);
}

#[tokio::test]
async fn an_edited_applied_migration_is_a_checksum_error() {
    let db = TestDatabase::create().await;
    migrator("app", &[V1]).run(&db.pool).await.unwrap();
    let edited = Migration::new(1, "notes", "CREATE TABLE notes (id uuid PRIMARY KEY)");
    let m = migrator("app", &[edited, V2]);

    let err = m.run(&db.pool).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::ChecksumMismatch { version: 1, ref component, .. } if component == "app"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("app v1 (notes)"), "{err}");
    // Nothing after the mismatch was applied.
    assert_eq!(recorded(&db.pool, "app").await.len(), 1);
    assert_eq!(columns(&db.pool, "notes").await, vec!["id"]);
    assert!(matches!(
        m.pending(&db.pool).await,
        Err(MigrateError::ChecksumMismatch { version: 1, .. })
    ));
}

#[tokio::test]
async fn a_failing_migration_is_rolled_back_and_not_recorded() {
    let db = TestDatabase::create().await;
    let bad = Migration::new(
        2,
        "half",
        "CREATE TABLE half (id int); ALTER TABLE missing ADD COLUMN x int",
    );
    let err = migrator("app", &[V1, bad]).run(&db.pool).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Apply { version: 2, .. }),
        "{err:?}"
    );
    assert_eq!(recorded(&db.pool, "app").await, vec![(1, "notes".into())]);
    assert!(
        columns(&db.pool, "half").await.is_empty(),
        "v2 rolled back whole"
    );
}

#[tokio::test]
async fn components_sharing_a_database_keep_their_own_versions() {
    let db = TestDatabase::create().await;
    let a = migrator("a", &[Migration::new(1, "a", "CREATE TABLE a (id int)")]);
    let b = migrator(
        "b",
        &[
            Migration::new(1, "b", "CREATE TABLE b (id int)"),
            Migration::new(2, "b2", "ALTER TABLE b ADD COLUMN x int"),
        ],
    );
    let (ra, rb) = tokio::join!(a.run(&db.pool), b.run(&db.pool));
    assert_eq!(ra.unwrap(), vec![1]);
    assert_eq!(rb.unwrap(), vec![1, 2]);
    assert_eq!(recorded(&db.pool, "a").await.len(), 1);
    assert_eq!(recorded(&db.pool, "b").await.len(), 2);
}

#[tokio::test]
async fn pending_changes_nothing() {
    let db = TestDatabase::create().await;
    let m = migrator("app", &[V1, V2]);
    assert_eq!(m.pending(&db.pool).await.unwrap().len(), 2);
    let table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('eventful_schema_migrations')::text")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        table, None,
        "pending() does not create the bookkeeping table"
    );
}

#[tokio::test]
async fn versions_of_a_newer_release_are_tolerated() {
    let db = TestDatabase::create().await;
    migrator("app", &[V1, V2]).run(&db.pool).await.unwrap();
    // An older replica starting during a rolling deploy knows only v1.
    let old = migrator("app", &[V1]);
    assert_eq!(old.run(&db.pool).await.unwrap(), Vec::<i64>::new());
    assert!(old.pending(&db.pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn legacy_versions_are_adopted_and_the_legacy_table_dropped() {
    let db = TestDatabase::create().await;
    sqlx::raw_sql(
        "CREATE TABLE notes (id bigint PRIMARY KEY); \
         CREATE TABLE legacy_versions (version int PRIMARY KEY, description text); \
         INSERT INTO legacy_versions VALUES (1, 'notes');",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let m = migrator("app", &[V1, V2]).adopt_legacy_versions("\"public\".\"legacy_versions\"");
    let pending: Vec<i64> = m
        .pending(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|m| m.version())
        .collect();
    assert_eq!(pending, vec![2], "legacy v1 counts as applied");
    // V1 is not idempotent: running it again would fail; adoption skips it.
    assert_eq!(m.run(&db.pool).await.unwrap(), vec![2]);
    assert_eq!(recorded(&db.pool, "app").await.len(), 2);
    let legacy: Option<String> = sqlx::query_scalar("SELECT to_regclass('legacy_versions')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(legacy, None);
}
