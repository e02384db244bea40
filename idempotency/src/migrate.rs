//! The crate's schema: `migrations/*.sql`, embedded and applied by the shared versioned
//! migrator ([`eventful_core::migrate`]), which records each applied version under the
//! component `eventful-idempotency` in `eventful_schema_migrations`.
//!
//! Versions 1–4 are `CREATE ... IF NOT EXISTS` / `ADD COLUMN IF NOT EXISTS`, so a database
//! created before versions were recorded is adopted by running them once more; later
//! versions may be any change (an `ALTER`, a backfill), applied exactly once.

use eventful_core::migrate::{Migration, Migrator};
use sqlx::PgPool;

use crate::Error;

/// The crate's migrations, for applications that run migrations from their own tooling
/// (`MIGRATOR.pending(&pool)` lists what a deploy would apply; `MIGRATOR.run(&pool)` applies
/// it). [`migrate`] runs it.
pub static MIGRATOR: Migrator = Migrator::new("eventful-idempotency", MIGRATIONS);

/// In order. Never edit an applied version: add one.
const MIGRATIONS: &[Migration] = &[
    Migration::new(
        1,
        "processed events",
        include_str!("../migrations/0001_processed_events.sql"),
    ),
    Migration::new(
        2,
        "dead letters",
        include_str!("../migrations/0002_dead_letters.sql"),
    ),
    Migration::new(
        3,
        "idempotency keys",
        include_str!("../migrations/0003_idempotency_keys.sql"),
    ),
    Migration::new(
        4,
        "idempotency key states",
        include_str!("../migrations/0004_idempotency_key_states.sql"),
    ),
];

/// Creates or upgrades the crate's tables (`eventful_processed_events`,
/// `eventful_dead_letters`, `eventful_idempotency_keys`) with [`MIGRATOR`]. Safe to call
/// concurrently and at every start.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
