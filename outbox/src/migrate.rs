//! Schema migrations: plain `.sql` files in `migrations/`, embedded in the crate.
//!
//! `sqlx::migrate!` needs static SQL, but the table names here are configurable, so the
//! files carry `{schema}` / `{table}` placeholders and the applied versions are tracked in
//! `<table>_migrations`. Everything runs in one transaction under an advisory lock, so
//! concurrent `migrate` calls (several replicas starting at once) are safe and idempotent.

use sqlx::{Executor as _, PgPool};

use crate::sql::{Sql, MIGRATE_LOCK};
use crate::Error;

/// `(version, description, SQL template)`, in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "outbox, leases and relays tables",
        include_str!("../migrations/0001_outbox.sql"),
    ),
    (
        2,
        "index failing rows by a hash of the key",
        include_str!("../migrations/0002_failing_index_by_key_hash.sql"),
    ),
];

pub(crate) async fn run(pool: &PgPool, sql: &Sql) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *tx)
        .await?;
    let create_schema = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", sql.schema);
    tx.execute(create_schema.as_str()).await?;
    let create_versions = format!(
        "CREATE TABLE IF NOT EXISTS {} (\
            version INT PRIMARY KEY, \
            description TEXT NOT NULL, \
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        sql.migrations_table
    );
    tx.execute(create_versions.as_str()).await?;
    let applied: Vec<i32> =
        sqlx::query_scalar(&format!("SELECT version FROM {}", sql.migrations_table))
            .fetch_all(&mut *tx)
            .await?;
    for (version, description, template) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tracing::info!(version, description, "applying outbox migration");
        let script = sql.render(template);
        tx.execute(script.as_str()).await?;
        sqlx::query(&format!(
            "INSERT INTO {} (version, description) VALUES ($1, $2)",
            sql.migrations_table
        ))
        .bind(version)
        .bind(description)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
