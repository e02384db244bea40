//! The versioned schema migrator every Eventful crate uses (and applications can run from
//! their own tooling).
//!
//! Each crate ships its migrations as plain `.sql` files embedded in the binary and names
//! itself with a *component* (`eventful-idempotency`, `eventful-saga`,
//! `eventful-outbox/<schema>.<table>`). Applied versions are recorded per component in one
//! table, [`MIGRATIONS_TABLE`]:
//!
//! ```sql
//! CREATE TABLE eventful_schema_migrations (
//!     component   text        NOT NULL,
//!     version     bigint      NOT NULL,
//!     description text        NOT NULL,
//!     checksum    bytea       NOT NULL, -- SHA-256 of the SQL that ran
//!     applied_at  timestamptz NOT NULL DEFAULT now(),
//!     PRIMARY KEY (component, version)
//! );
//! ```
//!
//! - **Several crates share a database**: each reads and writes only its component's rows.
//! - **Concurrent callers are safe** (several replicas starting at once): every step runs in
//!   a transaction holding one transaction-scoped advisory lock, and a migration is applied
//!   only after re-checking, under that lock, that no one else applied it.
//! - **Each migration is applied once, in its own transaction** together with its record: a
//!   failing migration leaves neither a half-applied schema nor a record, and the ones before
//!   it stay applied.
//! - **An applied migration that was edited is an error** ([`MigrateError::ChecksumMismatch`]),
//!   raised before anything is applied: ship a change as a new version instead.
//! - **Versions recorded that this binary does not know** (a newer release already migrated
//!   the database during a rolling deploy) are tolerated, so older replicas keep starting.
//!
//! Why not `sqlx::migrate!`: sqlx 0.8's migrator records every crate's versions in one
//! `_sqlx_migrations` table it cannot rename, and refuses to run when it finds versions it
//! does not know, so two crates (or a crate and the application) cannot both use it on one
//! database. sqlx 0.9 can rename the table, but requires rustc 1.94 while these crates
//! support older compilers (see the workspace's `rust-version`).
//!
//! ```no_run
//! use eventful_core::migrate::{Migration, Migrator};
//!
//! // A `const` slice, so the `static` can borrow it.
//! const MIGRATIONS: &[Migration] = &[
//!     Migration::new(1, "orders", "CREATE TABLE orders (id uuid PRIMARY KEY)"),
//!     Migration::new(2, "order totals", "ALTER TABLE orders ADD COLUMN total bigint"),
//! ];
//! static MIGRATOR: Migrator = Migrator::new("my-app", MIGRATIONS);
//!
//! # async fn run(pool: sqlx::PgPool) -> Result<(), eventful_core::migrate::MigrateError> {
//! for migration in MIGRATOR.pending(&pool).await? {
//!     println!("will apply {} {}", migration.version(), migration.description());
//! }
//! MIGRATOR.run(&pool).await?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::collections::HashMap;

use sha2::{Digest as _, Sha256};
use sqlx::{Connection as _, Executor as _, PgConnection, PgPool};

/// The table recording applied migrations of every component (in the first schema of the
/// connection's `search_path`, usually `public`).
pub const MIGRATIONS_TABLE: &str = "eventful_schema_migrations";

/// The advisory lock every migrator takes (one key for all components, so that creating
/// the bookkeeping table or a shared schema cannot race). "eventfmg".
const LOCK_KEY: i64 = 0x6576_656e_7466_6d67;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS eventful_schema_migrations (
    component   text        NOT NULL,
    version     bigint      NOT NULL,
    description text        NOT NULL,
    checksum    bytea       NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)";

/// One schema change: a version (unique and increasing within its component), a short
/// description and the SQL (one or more statements, run in one transaction).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    version: i64,
    description: Cow<'static, str>,
    sql: Cow<'static, str>,
}

impl Migration {
    /// A migration from static text (usually `include_str!("../migrations/0001_x.sql")`).
    pub const fn new(version: i64, description: &'static str, sql: &'static str) -> Migration {
        Migration {
            version,
            description: Cow::Borrowed(description),
            sql: Cow::Borrowed(sql),
        }
    }

    /// A migration whose SQL is built at run time (for example from a template with
    /// configurable table names).
    pub fn owned(version: i64, description: impl Into<String>, sql: impl Into<String>) -> Self {
        Migration {
            version,
            description: Cow::Owned(description.into()),
            sql: Cow::Owned(sql.into()),
        }
    }

    /// The version.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The SQL.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// SHA-256 of the SQL: what is recorded when it is applied and compared afterwards.
    pub fn checksum(&self) -> Vec<u8> {
        Sha256::digest(self.sql.as_bytes()).to_vec()
    }
}

/// The migrations of one component, and how to apply them. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Migrator {
    component: Cow<'static, str>,
    migrations: Cow<'static, [Migration]>,
    legacy_table: Option<String>,
}

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// Reading or writing the bookkeeping failed (connection lost, lock timeout, …).
    #[error("database error while migrating: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration's SQL failed; it was rolled back and is not recorded.
    #[error("migration {component} v{version} ({description}) failed: {source}")]
    Apply {
        /// The component.
        component: String,
        /// The version that failed.
        version: i64,
        /// Its description.
        description: String,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// A migration recorded as applied differs from the one this binary carries: its SQL
    /// was edited after it ran. Permanent: restore the original and add a new version.
    #[error(
        "migration {component} v{version} ({description}) was applied with a different \
         checksum: its SQL changed after it ran; restore it and ship the change as a new version"
    )]
    ChecksumMismatch {
        /// The component.
        component: String,
        /// The version whose SQL changed.
        version: i64,
        /// Its description.
        description: String,
    },
    /// The migrations are not in strictly increasing version order. Permanent (a bug in
    /// the list).
    #[error("migrations of {component} are not in strictly increasing order at v{version}")]
    Unordered {
        /// The component.
        component: String,
        /// The first version out of order.
        version: i64,
    },
}

impl MigrateError {
    /// `true` when running the migrator again later may succeed (the database was
    /// unreachable or a transient SQLSTATE, by [`crate::sqlstate::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            MigrateError::Database(e) | MigrateError::Apply { source: e, .. } => {
                crate::sqlstate::is_retryable(e)
            }
            MigrateError::ChecksumMismatch { .. } | MigrateError::Unordered { .. } => false,
        }
    }
}

impl Migrator {
    /// A migrator over static migrations (usable in a `static`).
    pub const fn new(component: &'static str, migrations: &'static [Migration]) -> Migrator {
        Migrator {
            component: Cow::Borrowed(component),
            migrations: Cow::Borrowed(migrations),
            legacy_table: None,
        }
    }

    /// A migrator over migrations built at run time.
    pub fn from_migrations(component: impl Into<String>, migrations: Vec<Migration>) -> Self {
        Migrator {
            component: Cow::Owned(component.into()),
            migrations: Cow::Owned(migrations),
            legacy_table: None,
        }
    }

    /// Adopts the versions recorded by an earlier bookkeeping table (a table with an integer
    /// `version` column, `table` given as it appears in SQL, e.g. `"public"."x_migrations"`):
    /// on the next [`run`](Self::run), its versions that this migrator knows are recorded
    /// as applied (with this binary's checksums) and the table is dropped.
    pub fn adopt_legacy_versions(mut self, table: impl Into<String>) -> Self {
        self.legacy_table = Some(table.into());
        self
    }

    /// The component the versions are recorded under.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The migrations, in order.
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// Applies the pending migrations, in order, each in its own transaction; returns the
    /// versions it applied (empty when the database was up to date or another caller applied
    /// them). Safe to call concurrently and at every start.
    #[tracing::instrument(skip_all, fields(component = %self.component))]
    pub async fn run(&self, pool: &PgPool) -> Result<Vec<i64>, MigrateError> {
        self.check_order()?;
        let mut conn = pool.acquire().await?;

        // Bookkeeping, adoption of legacy records and checksum validation first, so an
        // edited migration stops everything before anything new is applied.
        let mut tx = conn.begin().await?;
        lock(&mut tx).await?;
        if !table_exists(&mut tx, MIGRATIONS_TABLE).await? {
            tx.execute(CREATE_TABLE).await?;
        }
        self.adopt_legacy(&mut tx).await?;
        let applied = self.applied(&mut tx).await?;
        self.validate(&applied)?;
        tx.commit().await?;

        let mut done = Vec::new();
        for migration in self.migrations.iter() {
            if applied.contains_key(&migration.version) {
                continue;
            }
            let mut tx = conn.begin().await?;
            lock(&mut tx).await?;
            // Another caller may have applied it since the check above.
            let recorded: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT checksum FROM eventful_schema_migrations \
                 WHERE component = $1 AND version = $2",
            )
            .bind(&*self.component)
            .bind(migration.version)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(checksum) = recorded {
                self.validate_one(migration, &checksum)?;
                continue;
            }
            tracing::info!(
                version = migration.version,
                description = %migration.description,
                "applying migration"
            );
            // A plain `&str` runs through the simple query protocol: several statements.
            tx.execute(&*migration.sql)
                .await
                .map_err(|source| MigrateError::Apply {
                    component: self.component.to_string(),
                    version: migration.version,
                    description: migration.description.to_string(),
                    source,
                })?;
            self.record(&mut tx, migration).await?;
            tx.commit().await?;
            done.push(migration.version);
        }
        Ok(done)
    }

    /// The migrations not applied yet, in order; fails like [`run`](Self::run) when an
    /// applied migration was edited. Takes no lock and changes nothing.
    pub async fn pending(&self, pool: &PgPool) -> Result<Vec<&Migration>, MigrateError> {
        self.check_order()?;
        let mut conn = pool.acquire().await?;
        let mut applied = if table_exists(&mut conn, MIGRATIONS_TABLE).await? {
            self.applied(&mut conn).await?
        } else {
            HashMap::new()
        };
        self.validate(&applied)?;
        for version in self.legacy_versions(&mut conn).await? {
            applied.entry(version).or_default();
        }
        Ok(self
            .migrations
            .iter()
            .filter(|m| !applied.contains_key(&m.version))
            .collect())
    }

    fn check_order(&self) -> Result<(), MigrateError> {
        for pair in self.migrations.windows(2) {
            if pair[1].version <= pair[0].version {
                return Err(MigrateError::Unordered {
                    component: self.component.to_string(),
                    version: pair[1].version,
                });
            }
        }
        Ok(())
    }

    async fn applied(&self, conn: &mut PgConnection) -> Result<HashMap<i64, Vec<u8>>, sqlx::Error> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT version, checksum FROM eventful_schema_migrations WHERE component = $1",
        )
        .bind(&*self.component)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows.into_iter().collect())
    }

    fn validate(&self, applied: &HashMap<i64, Vec<u8>>) -> Result<(), MigrateError> {
        for migration in self.migrations.iter() {
            if let Some(checksum) = applied.get(&migration.version) {
                self.validate_one(migration, checksum)?;
            }
        }
        let known = |v: &i64| self.migrations.iter().any(|m| m.version == *v);
        if let Some(newest) = applied.keys().filter(|v| !known(v)).max() {
            // A newer release migrated this database (rolling deploy): keep running.
            tracing::warn!(
                component = %self.component,
                version = newest,
                "the database has migrations this binary does not know (a newer release?)"
            );
        }
        Ok(())
    }

    fn validate_one(&self, migration: &Migration, checksum: &[u8]) -> Result<(), MigrateError> {
        if migration.checksum() == checksum {
            Ok(())
        } else {
            Err(MigrateError::ChecksumMismatch {
                component: self.component.to_string(),
                version: migration.version,
                description: migration.description.to_string(),
            })
        }
    }

    async fn record(
        &self,
        conn: &mut PgConnection,
        migration: &Migration,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO eventful_schema_migrations (component, version, description, checksum) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (component, version) DO NOTHING",
        )
        .bind(&*self.component)
        .bind(migration.version)
        .bind(&*migration.description)
        .bind(migration.checksum())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Versions recorded in the legacy table that this migrator knows (empty without one).
    async fn legacy_versions(&self, conn: &mut PgConnection) -> Result<Vec<i64>, sqlx::Error> {
        let Some(legacy) = &self.legacy_table else {
            return Ok(Vec::new());
        };
        if !table_exists(conn, legacy).await? {
            return Ok(Vec::new());
        }
        let versions: Vec<i64> =
            sqlx::query_scalar(&format!("SELECT version::bigint FROM {legacy}"))
                .fetch_all(&mut *conn)
                .await?;
        Ok(versions
            .into_iter()
            .filter(|v| self.migrations.iter().any(|m| m.version == *v))
            .collect())
    }

    async fn adopt_legacy(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let Some(legacy) = &self.legacy_table else {
            return Ok(());
        };
        if !table_exists(conn, legacy).await? {
            return Ok(());
        }
        for version in self.legacy_versions(conn).await? {
            if let Some(migration) = self.migrations.iter().find(|m| m.version == version) {
                self.record(conn, migration).await?;
            }
        }
        tracing::info!(legacy = %legacy, "adopted the versions of the legacy migrations table");
        conn.execute(format!("DROP TABLE {legacy}").as_str())
            .await?;
        Ok(())
    }
}

async fn lock(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn table_exists(conn: &mut PgConnection, table: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&mut *conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_sha256_of_the_sql() {
        let m = Migration::new(1, "x", "SELECT 1");
        assert_eq!(m.checksum().len(), 32);
        assert_eq!(
            m.checksum(),
            Migration::owned(1, "y", "SELECT 1").checksum()
        );
        assert_ne!(m.checksum(), Migration::new(1, "x", "SELECT 2").checksum());
    }

    #[test]
    fn lost_connections_are_retryable_edited_migrations_are_not() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(MigrateError::Database(sqlx::Error::Io(io())).is_retryable());
        let apply = |source| MigrateError::Apply {
            component: "c".into(),
            version: 1,
            description: "d".into(),
            source,
        };
        assert!(apply(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!apply(sqlx::Error::ColumnNotFound("x".into())).is_retryable());
        assert!(!MigrateError::ChecksumMismatch {
            component: "c".into(),
            version: 1,
            description: "d".into(),
        }
        .is_retryable());
    }

    #[test]
    fn unordered_versions_are_refused() {
        const LIST: &[Migration] = &[Migration::new(2, "b", ""), Migration::new(1, "a", "")];
        static BAD: Migrator = Migrator::new("bad", LIST);
        assert!(matches!(
            BAD.check_order(),
            Err(MigrateError::Unordered { version: 1, .. })
        ));
    }
}
