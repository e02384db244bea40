//! The crate's schema, embedded from `migrations/*.sql` and applied idempotently.
//!
//! The statements are `CREATE ... IF NOT EXISTS`, applied in one transaction under an
//! advisory lock, so concurrent callers and repeated calls are safe. Like
//! `eventful-idempotency`, the crate does not use `sqlx::migrate!`: its bookkeeping table
//! (`_sqlx_migrations`) is shared by every crate of an application, and one crate's
//! migrator refuses to run when it finds versions applied by another.

use sqlx::PgPool;

use crate::Error;

const MIGRATIONS: &[(&str, &str)] = &[("0001_saga", include_str!("../migrations/0001_saga.sql"))];

/// Creates the saga tables (`eventful_saga_instances`, `eventful_saga_history`) if they do
/// not exist. Safe to call concurrently and often. (The outbox's and the idempotency
/// guard's tables are created by [`Coordinator::migrate`](crate::Coordinator::migrate).)
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    let mut tx = pool.begin().await.map_err(Error::Migration)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('eventful_saga.migrate'))")
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
