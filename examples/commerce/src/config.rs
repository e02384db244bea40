//! Settings, all from the environment with defaults that work against `scripts/services up`.

use std::time::Duration;

/// Partitions of the event topic unless `COMMERCE_TOPIC_PARTITIONS` says otherwise (the
/// docker-compose broker's `KAFKA_NUM_PARTITIONS` agrees: tests/compose.rs).
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 4;

/// Everything the four services and the load tool read from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Administrative PostgreSQL URL; each service creates and uses its own database on it.
    pub database_url: String,
    /// Redis holding the stock.
    pub redis_url: String,
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// The topic every event flows through (`order-events`).
    pub topic: String,
    /// Partitions `topic` is created with.
    pub topic_partitions: i32,
    /// Prefix of the service database names (tests isolate runs with it).
    pub database_prefix: String,
    /// Prefix of consumer group ids.
    pub group_prefix: String,
    /// Inventory namespace in Redis (one hash tag: one Redis Cluster slot).
    pub inventory: String,
    /// Listen addresses.
    pub order_addr: String,
    /// Listen address of payment.
    pub payment_addr: String,
    /// Listen address of shipping.
    pub shipping_addr: String,
    /// Listen address of notification.
    pub notification_addr: String,
    /// How long an unpaid order holds its stock.
    pub reservation_ttl: Duration,
    /// How often the order service looks for expired reservations.
    pub expiry_interval: Duration,
    /// Payments above this amount (minor units) are declined: the documented, deterministic rule.
    pub payment_limit: i64,
    /// Consumer group session timeout: how long a killed service's partitions wait.
    pub session_timeout: Duration,
    /// Stock the order service gives the default SKU at start when it has none yet, so the
    /// reference request (no `items`) works on a fresh system; existing stock is kept.
    pub default_sku_stock: u64,
    /// Most events of one partition an inbox applies in one transaction (`1`: one
    /// transaction per event).
    pub inbox_max_batch: usize,
}

impl Settings {
    /// Reads the settings; unset variables take the defaults in the README.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            database_url: var(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            redis_url: var("REDIS_URL", "redis://127.0.0.1:6379"),
            kafka_brokers: var("KAFKA_BROKERS", "127.0.0.1:9092"),
            topic: var("COMMERCE_TOPIC", "order-events"),
            topic_partitions: parse("COMMERCE_TOPIC_PARTITIONS", DEFAULT_TOPIC_PARTITIONS)?,
            database_prefix: database_prefix(var("COMMERCE_DATABASE_PREFIX", ""))?,
            group_prefix: var("COMMERCE_GROUP_PREFIX", "commerce"),
            inventory: var("COMMERCE_INVENTORY", "commerce"),
            order_addr: var("ORDER_ADDR", "127.0.0.1:8081"),
            payment_addr: var("PAYMENT_ADDR", "127.0.0.1:8082"),
            shipping_addr: var("SHIPPING_ADDR", "127.0.0.1:8083"),
            notification_addr: var("NOTIFICATION_ADDR", "127.0.0.1:8084"),
            reservation_ttl: Duration::from_millis(parse("ORDER_RESERVATION_TTL_MS", 600_000)?),
            expiry_interval: Duration::from_millis(parse("ORDER_EXPIRY_INTERVAL_MS", 1_000)?),
            payment_limit: parse("PAYMENT_LIMIT", 100_000)?,
            session_timeout: Duration::from_millis(parse("COMMERCE_SESSION_TIMEOUT_MS", 10_000)?),
            default_sku_stock: parse("ORDER_DEFAULT_SKU_STOCK", 1_000)?,
            inbox_max_batch: parse(
                "COMMERCE_INBOX_MAX_BATCH",
                eventful_idempotency::consumer::DEFAULT_MAX_BATCH,
            )?,
        })
    }

    /// The database name of `service`, e.g. `order_service`.
    pub fn database_name(&self, service: &str) -> String {
        format!("{}{service}_service", self.database_prefix)
    }

    /// The consumer group of `service`.
    pub fn group(&self, service: &str) -> String {
        format!("{}-{service}", self.group_prefix)
    }
}

/// Longest `COMMERCE_DATABASE_PREFIX`: PostgreSQL names hold 63 bytes (longer ones are
/// silently truncated, which could make two services share a database), and the longest
/// service suffix is `notification_service` (20).
pub const MAX_DATABASE_PREFIX_LEN: usize = 63 - "notification_service".len();

/// The prefix becomes part of a `CREATE DATABASE` statement: only `[a-z0-9_]`, so it needs no
/// quoting rules and names no other database, and bounded by [`MAX_DATABASE_PREFIX_LEN`].
fn database_prefix(prefix: String) -> anyhow::Result<String> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    if !prefix.bytes().all(allowed) {
        anyhow::bail!(
            "COMMERCE_DATABASE_PREFIX={prefix:?}: only lowercase letters, digits and _ are allowed"
        );
    }
    if prefix.len() > MAX_DATABASE_PREFIX_LEN {
        anyhow::bail!(
            "COMMERCE_DATABASE_PREFIX={prefix:?}: {} characters, at most {MAX_DATABASE_PREFIX_LEN}",
            prefix.len()
        );
    }
    Ok(prefix)
}

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn parse<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={value:?}: {e}")),
        _ => Ok(default),
    }
}

#[cfg(test)]
mod database_prefix_tests {
    use super::*;

    #[test]
    fn a_safe_prefix_is_kept() {
        for prefix in ["", "eventful_test_0123456789ab_", "shop1_"] {
            assert_eq!(database_prefix(prefix.to_owned()).unwrap(), prefix);
        }
        let longest = "a".repeat(MAX_DATABASE_PREFIX_LEN);
        assert_eq!(database_prefix(longest.clone()).unwrap(), longest);
    }

    #[test]
    fn an_unsafe_prefix_is_refused_naming_the_variable() {
        for prefix in [
            r#"x"y"#,
            "x\"; DROP DATABASE postgres; --",
            "Upper",
            "with-dash",
            "with space",
            "é",
            &"a".repeat(MAX_DATABASE_PREFIX_LEN + 1),
        ] {
            let error = database_prefix(prefix.to_owned())
                .expect_err(prefix)
                .to_string();
            assert!(error.contains("COMMERCE_DATABASE_PREFIX"), "{error}");
        }
    }
}
