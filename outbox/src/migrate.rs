//! Schema migrations: plain `.sql` files in `migrations/`, embedded in the crate and applied
//! by the shared versioned migrator ([`eventful_core::migrate`]).
//!
//! The table names are configurable, so the files carry `{schema}` / `{table}` /
//! `{partitions}` placeholders, rendered per outbox; the applied versions are recorded under
//! the component `eventful-outbox/<schema>.<table>`, so several outbox tables (and the other
//! crates) share one database. Databases migrated by releases that kept their versions in
//! `<table>_migrations` are adopted: those versions are recorded, then that table is dropped.

use eventful_core::migrate::{Migration, Migrator};

use crate::sql::Sql;

/// `(version, description, SQL template)`, in order. Never edit an applied version: add one.
const MIGRATIONS: &[(i64, &str, &str)] = &[
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
    (
        3,
        "two slot partitions rotated by TRUNCATE",
        include_str!("../migrations/0003_slots.sql"),
    ),
];

pub(crate) fn migrator(sql: &Sql) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, template)| {
            Migration::owned(*version, *description, sql.render(template))
        })
        .collect();
    Migrator::from_migrations(
        format!("eventful-outbox/{}.{}", sql.schema, sql.table),
        migrations,
    )
    .adopt_legacy_versions(sql.migrations_table.clone())
}
