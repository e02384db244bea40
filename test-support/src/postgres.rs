use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::{env_or, START_HINT};

/// Default administrative connection used to create per-test databases.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh PostgreSQL database owned by one test.
///
/// Databases are named `eventful_test_<uuid>`; `scripts/test` drops leftovers of earlier
/// runs, so a test never has to clean up after itself.
pub struct TestDatabase {
    /// Pool connected to the new database.
    pub pool: PgPool,
    /// Connection URL of the new database (for child processes).
    pub url: String,
    /// Name of the new database.
    pub name: String,
}

impl TestDatabase {
    /// The administrative URL: `DATABASE_URL` or [`DEFAULT_DATABASE_URL`].
    pub fn admin_url() -> String {
        env_or("DATABASE_URL", DEFAULT_DATABASE_URL)
    }

    /// Creates a new, empty database. Panics when PostgreSQL is unreachable.
    pub async fn create() -> Self {
        Self::create_with_pool_size(10).await
    }

    /// Creates a new, empty database whose pool holds up to `max_connections`.
    pub async fn create_with_pool_size(max_connections: u32) -> Self {
        let admin_url = Self::admin_url();
        let mut admin = connect_admin(&admin_url).await;
        let name = format!("eventful_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL: cannot create database {name}: {e}"));
        let _ = admin.close().await;

        let url = database_url(&admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL: cannot connect to {url}: {e}"));
        Self { pool, url, name }
    }

    /// Opens another, independent pool on the same database.
    pub async fn new_pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL: cannot connect to {}: {e}", self.url))
    }
}

/// Returns `admin_url` with its database replaced by `database`.
pub fn database_url(admin_url: &str, database: &str) -> String {
    let mut url = url::Url::parse(admin_url)
        .unwrap_or_else(|e| panic!("DATABASE_URL {admin_url:?} is not a URL: {e}"));
    url.set_path(&format!("/{database}"));
    url.to_string()
}

async fn connect_admin(admin_url: &str) -> PgConnection {
    let options = PgConnectOptions::from_str(admin_url)
        .unwrap_or_else(|e| panic!("DATABASE_URL {admin_url:?} is invalid: {e}"))
        .disable_statement_logging();
    match tokio::time::timeout(Duration::from_secs(5), options.connect()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("PostgreSQL is not reachable at {admin_url}: {e}; {START_HINT}"),
        Err(_) => panic!("PostgreSQL at {admin_url} did not answer within 5 s; {START_HINT}"),
    }
}
