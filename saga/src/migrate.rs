//! The crate's schema, embedded from `migrations/*.sql` and applied idempotently.
//!
//! The statements are `CREATE ... IF NOT EXISTS`, applied in one transaction under an
//! advisory lock (`eventful_idempotency::apply_idempotent_schema`), so concurrent callers
//! and repeated calls are safe. Like `eventful-idempotency`, the crate does not use
//! `sqlx::migrate!`: its bookkeeping table (`_sqlx_migrations`) is shared by every crate
//! of an application, and one crate's migrator refuses to run when it finds versions
//! applied by another.

use sqlx::PgPool;

use crate::Error;

const MIGRATIONS: &[(&str, &str)] = &[("0001_saga", include_str!("../migrations/0001_saga.sql"))];

/// Creates the saga tables (`eventful_saga_instances`, `eventful_saga_history`) if they do
/// not exist. Safe to call concurrently and often. (The outbox's and the idempotency
/// guard's tables are created by [`Coordinator::migrate`](crate::Coordinator::migrate).)
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    eventful_idempotency::apply_idempotent_schema(pool, "eventful_saga.migrate", MIGRATIONS)
        .await
        .map_err(Error::Migration)
}
