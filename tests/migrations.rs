//! Every crate's schema through the one versioned migrator (`eventful_core::migrate`), on
//! one shared database: concurrent starts, a future `ALTER`, and the upgrade of a database
//! created by the releases before it (fixtures in `tests/fixtures/pre-migrator/`, copied
//! from those releases).

use eventful_core::migrate::{Migration, Migrator};
use eventful_outbox::Outbox;
use eventful_test_support::TestDatabase;
use sqlx::PgPool;

async fn recorded(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT component, version FROM eventful_schema_migrations ORDER BY component, version",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

fn expected() -> Vec<(String, i64)> {
    let mut rows = Vec::new();
    for v in 1..=4 {
        rows.push(("eventful-idempotency".to_owned(), v));
    }
    for table in ["public.eventful_outbox", "sales.events"] {
        for v in 1..=3 {
            rows.push((format!("eventful-outbox/{table}"), v));
        }
    }
    rows.push(("eventful-saga".to_owned(), 1));
    rows
}

fn sales_outbox() -> Outbox {
    Outbox::builder()
        .schema("sales")
        .table("events")
        .build()
        .unwrap()
}

async fn migrate_everything(pool: &PgPool) {
    Outbox::new().migrate(pool).await.unwrap();
    sales_outbox().migrate(pool).await.unwrap();
    eventful_idempotency::migrate(pool).await.unwrap();
    eventful_saga::migrate(pool).await.unwrap();
}

async fn nothing_pending(pool: &PgPool) {
    for migrator in [
        Outbox::new().migrator(),
        sales_outbox().migrator(),
        eventful_idempotency::MIGRATOR.clone(),
        eventful_saga::MIGRATOR.clone(),
    ] {
        let pending = migrator.pending(pool).await.unwrap();
        assert!(pending.is_empty(), "{}: {pending:?}", migrator.component());
    }
}

#[tokio::test]
async fn all_crates_share_one_database_with_eight_concurrent_starts() {
    let db = TestDatabase::create_with_pool_size(20).await;
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move { migrate_everything(&pool).await })
        })
        .collect();
    for start in starts {
        start.await.unwrap();
    }
    assert_eq!(recorded(&db.pool).await, expected());
    nothing_pending(&db.pool).await;
}

#[tokio::test]
async fn a_crates_next_alter_version_applies_exactly_once() {
    let db = TestDatabase::create_with_pool_size(20).await;
    migrate_everything(&db.pool).await;
    // What a later eventful-idempotency release would ship: a plain ALTER (it fails if run
    // twice, so the database checks "once" too).
    let mut migrations = eventful_idempotency::MIGRATOR.migrations().to_vec();
    migrations.push(Migration::owned(
        5,
        "processed events note",
        "ALTER TABLE eventful_processed_events ADD COLUMN note text",
    ));
    let next = Migrator::from_migrations("eventful-idempotency", migrations);
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let (next, pool) = (next.clone(), db.pool.clone());
            tokio::spawn(async move { next.run(&pool).await })
        })
        .collect();
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(run.await.unwrap().unwrap());
    }
    assert_eq!(applied, vec![5]);
    let notes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'eventful_processed_events' AND column_name = 'note'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(notes, 1);
    // The other crates' records are untouched.
    let mut want = expected();
    want.insert(4, ("eventful-idempotency".to_owned(), 5));
    assert_eq!(recorded(&db.pool).await, want);
}

/// What the releases before the shared migrator did: the outbox rendered its files and kept
/// versions in `<table>_migrations`; idempotency and saga re-ran `IF NOT EXISTS` files.
async fn migrate_like_the_previous_release(pool: &PgPool) {
    let render = |template: &str, schema: &str, table: &str| {
        template
            .replace("{schema}", schema)
            .replace("{table}", table)
            .replace("{partitions}", "64")
    };
    let outbox = [
        include_str!("fixtures/pre-migrator/outbox_0001_outbox.sql"),
        include_str!("fixtures/pre-migrator/outbox_0002_failing_index_by_key_hash.sql"),
    ];
    for (schema, table) in [("public", "eventful_outbox"), ("sales", "events")] {
        let mut script = format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; \
             CREATE TABLE IF NOT EXISTS \"{schema}\".\"{table}_migrations\" (\
               version INT PRIMARY KEY, description TEXT NOT NULL, \
               applied_at TIMESTAMPTZ NOT NULL DEFAULT now());"
        );
        for (i, template) in outbox.iter().enumerate() {
            script.push_str(&render(template, schema, table));
            script.push_str(&format!(
                "\nINSERT INTO \"{schema}\".\"{table}_migrations\" (version, description) \
                 VALUES ({}, 'v{}');",
                i + 1,
                i + 1
            ));
        }
        sqlx::raw_sql(&script).execute(pool).await.unwrap();
    }
    for sql in [
        include_str!("fixtures/pre-migrator/idempotency_0001_processed_events.sql"),
        include_str!("fixtures/pre-migrator/idempotency_0002_dead_letters.sql"),
        include_str!("fixtures/pre-migrator/idempotency_0003_idempotency_keys.sql"),
        include_str!("fixtures/pre-migrator/idempotency_0004_idempotency_key_states.sql"),
        include_str!("fixtures/pre-migrator/saga_0001_saga.sql"),
    ] {
        sqlx::raw_sql(sql).execute(pool).await.unwrap();
    }
}

#[tokio::test]
async fn a_database_created_by_the_previous_release_upgrades_cleanly() {
    let db = TestDatabase::create().await;
    migrate_like_the_previous_release(&db.pool).await;
    // Data written by the previous release.
    sqlx::raw_sql(
        "INSERT INTO eventful_outbox (id, topic, key, partition, event_type, payload, content_type) \
           VALUES (gen_random_uuid(), 't', 'k', 0, 'e', '\\x00', 'application/json'); \
         INSERT INTO eventful_processed_events (consumer, event_id) VALUES ('c', gen_random_uuid()); \
         INSERT INTO eventful_saga_instances (id, saga_type, status, current_step, data) \
           VALUES (gen_random_uuid(), 's', 'running', 0, '{}');",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    // The outbox's earlier versions count as applied before anything runs: only the ones
    // added since (3, the slot partitions) are pending.
    let pending: Vec<i64> = Outbox::new()
        .migrator()
        .pending(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|m| m.version())
        .collect();
    assert_eq!(pending, vec![3]);

    migrate_everything(&db.pool).await;
    assert_eq!(recorded(&db.pool).await, expected());
    nothing_pending(&db.pool).await;
    let legacy: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT to_regclass(t)::text FROM unnest(ARRAY['public.eventful_outbox_migrations', \
         'sales.events_migrations']) AS t",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(legacy, vec![None, None], "legacy version tables dropped");
    let rows: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM eventful_outbox), \
                (SELECT count(*) FROM eventful_processed_events), \
                (SELECT count(*) FROM eventful_saga_instances)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, (1, 1, 1), "the previous release's rows survive");

    // A second start applies nothing.
    migrate_everything(&db.pool).await;
    assert_eq!(recorded(&db.pool).await, expected());
}
