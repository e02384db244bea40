//! Test support for Eventful's integration tests (internal, not published).
//!
//! Every integration test gets its own isolated slice of the real services:
//!
//! - [`TestDatabase::create`]: a fresh PostgreSQL database named `eventful_test_<uuid>`;
//! - [`TestRedis::connect`]: a unique key prefix on the shared Redis;
//! - [`kafka::create_topic`]: a fresh topic with a unique name on the Kafka broker.
//!
//! A required service that cannot be reached makes the test **fail** (panic) with a
//! message naming the service and how to start it: nothing is ever skipped.
//!
//! For failure tests that must stop or restart a server, [`KafkaBroker`] (Apache Kafka),
//! [`RedisServer`], [`RedisCluster`] (three masters in cluster mode) and [`PostgresServer`]
//! run private instances on spare ports, so the shared services the rest
//! of the suite relies on are never disturbed.

pub mod kafka;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "opentelemetry")]
pub mod otel;
mod postgres;
mod process;
mod redis_support;

pub use postgres::{database_url, TestDatabase, DEFAULT_DATABASE_URL};
pub use process::{
    kafka_home, spare_port, KafkaBroker, PostgresServer, RedisCluster, RedisServer, KAFKA_VERSION,
};
pub use redis_support::{TestRedis, DEFAULT_REDIS_URL};

use std::future::Future;
use std::time::Duration;

/// The hint appended to every "service unreachable" failure.
pub const START_HINT: &str = "start the local services with `scripts/services up`";

/// Installs a `tracing` subscriber for tests once (`RUST_LOG` selects the level).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `condition` until it returns `true`, panicking with `what` after `timeout`.
///
/// Tests wait on conditions with a deadline instead of sleeping for a fixed time.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads an environment variable, falling back to `default`.
pub(crate) fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default.to_owned())
}
