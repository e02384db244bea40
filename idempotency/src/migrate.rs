//! The crate's schema, embedded from `migrations/*.sql` and applied idempotently.
//!
//! The statements are `CREATE ... IF NOT EXISTS`, applied in one transaction under an advisory
//! lock, so concurrent callers and repeated calls are safe. The crate does not use
//! `sqlx::migrate!`: its bookkeeping table (`_sqlx_migrations`) is shared by every crate of
//! an application, and one crate's migrator refuses to run when it finds versions applied by
//! another.

use sqlx::PgPool;

use crate::Error;

const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_processed_events",
        include_str!("../migrations/0001_processed_events.sql"),
    ),
    (
        "0002_dead_letters",
        include_str!("../migrations/0002_dead_letters.sql"),
    ),
    (
        "0003_idempotency_keys",
        include_str!("../migrations/0003_idempotency_keys.sql"),
    ),
    (
        "0004_idempotency_key_states",
        include_str!("../migrations/0004_idempotency_key_states.sql"),
    ),
];

/// Creates the crate's tables (`eventful_processed_events`, `eventful_dead_letters`,
/// `eventful_idempotency_keys`) if they do not exist. Safe to call concurrently and often.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    apply_idempotent_schema(pool, "eventful_idempotency.migrate", MIGRATIONS)
        .await
        .map_err(Error::Migration)
}

/// Applies `migrations` (`(name, sql)` pairs, every statement idempotent, e.g.
/// `CREATE .. IF NOT EXISTS`) in one transaction under the advisory lock named
/// `lock_name`, so concurrent and repeated callers are safe. [`migrate`] and
/// `eventful-saga` use it; so can an application for its own tables.
pub async fn apply_idempotent_schema(
    pool: &PgPool,
    lock_name: &str,
    migrations: &[(&str, &str)],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(lock_name)
        .execute(&mut *tx)
        .await?;
    for (name, sql) in migrations {
        tracing::debug!(migration = name, "applying");
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
    }
    tx.commit().await
}
