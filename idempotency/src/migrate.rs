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
];

/// Creates the crate's tables (`eventful_processed_events`, `eventful_dead_letters`,
/// `eventful_idempotency_keys`) if they do not exist. Safe to call concurrently and often.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    let mut tx = pool.begin().await.map_err(Error::Migration)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('eventful_idempotency.migrate'))")
        .execute(&mut *tx)
        .await
        .map_err(Error::Migration)?;
    for (name, sql) in MIGRATIONS {
        tracing::debug!(migration = name, "applying");
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(Error::Migration)?;
    }
    tx.commit().await.map_err(Error::Migration)?;
    Ok(())
}
