//! The crate's schema: `migrations/*.sql`, embedded and applied by the shared versioned
//! migrator ([`eventful_core::migrate`]), which records each applied version under the
//! component `eventful-saga` in `eventful_schema_migrations`.
//!
//! Version 1 is `CREATE ... IF NOT EXISTS`, so a database created before versions were
//! recorded is adopted by running it once more; later versions may be any change (an
//! `ALTER`, a backfill), applied exactly once.

use eventful_core::migrate::{Migration, Migrator};
use sqlx::PgPool;

use crate::Error;

/// The crate's migrations, for applications that run migrations from their own tooling
/// (`MIGRATOR.pending(&pool)`, `MIGRATOR.run(&pool)`). [`migrate`] runs it.
pub static MIGRATOR: Migrator = Migrator::new("eventful-saga", MIGRATIONS);

/// In order. Never edit an applied version: add one.
const MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "saga instances and history",
    include_str!("../migrations/0001_saga.sql"),
)];

/// Creates or upgrades the saga tables (`eventful_saga_instances`, `eventful_saga_history`)
/// with [`MIGRATOR`]. Safe to call concurrently and at every start. (The outbox's and the
/// idempotency guard's tables are migrated by
/// [`Coordinator::migrate`](crate::Coordinator::migrate).)
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
