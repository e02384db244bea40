//! Settings, from the command line or the environment (`clap`), with defaults that work
//! against `scripts/services up`.

use std::time::Duration;

/// Partitions of the event topic unless `COMMERCE_TOPIC_PARTITIONS` says otherwise (the
/// docker-compose broker's `KAFKA_NUM_PARTITIONS` agrees: tests/compose.rs).
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 4;

/// Everything the four services and the load tool read from the command line or the
/// environment (`--help` lists every option with its variable and default). An empty
/// variable counts as unset.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "commerce",
    about = "The commerce example's services. Every option can also be set through the \
             environment variable named beside it."
)]
pub struct Settings {
    /// Administrative PostgreSQL URL; each service creates and uses its own database on it.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Redis holding the stock.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// The topic every event flows through.
    #[arg(long, env = "COMMERCE_TOPIC", default_value = "order-events")]
    pub topic: String,
    /// Partitions `topic` is created with.
    #[arg(long, env = "COMMERCE_TOPIC_PARTITIONS", default_value_t = DEFAULT_TOPIC_PARTITIONS)]
    pub topic_partitions: i32,
    /// Prefix of the service database names (tests isolate runs with it): `[a-z0-9_]`, at
    /// most 43 characters.
    #[arg(long, env = "COMMERCE_DATABASE_PREFIX", default_value = "", value_parser = database_prefix)]
    pub database_prefix: String,
    /// Prefix of consumer group ids.
    #[arg(long, env = "COMMERCE_GROUP_PREFIX", default_value = "commerce")]
    pub group_prefix: String,
    /// Inventory namespace in Redis (one hash tag: one Redis Cluster slot).
    #[arg(long, env = "COMMERCE_INVENTORY", default_value = "commerce")]
    pub inventory: String,
    /// Listen address of the order service.
    #[arg(long, env = "ORDER_ADDR", default_value = "127.0.0.1:8081")]
    pub order_addr: String,
    /// Listen address of payment.
    #[arg(long, env = "PAYMENT_ADDR", default_value = "127.0.0.1:8082")]
    pub payment_addr: String,
    /// Listen address of shipping.
    #[arg(long, env = "SHIPPING_ADDR", default_value = "127.0.0.1:8083")]
    pub shipping_addr: String,
    /// Listen address of notification.
    #[arg(long, env = "NOTIFICATION_ADDR", default_value = "127.0.0.1:8084")]
    pub notification_addr: String,
    /// How long an unpaid order holds its stock, in milliseconds.
    #[arg(long = "reservation-ttl-ms", env = "ORDER_RESERVATION_TTL_MS", default_value = "600000", value_parser = millis)]
    pub reservation_ttl: Duration,
    /// How often the order service looks for expired reservations, in milliseconds.
    #[arg(long = "expiry-interval-ms", env = "ORDER_EXPIRY_INTERVAL_MS", default_value = "1000", value_parser = millis)]
    pub expiry_interval: Duration,
    /// Payments above this amount (minor units) are declined: the documented, deterministic rule.
    #[arg(long, env = "PAYMENT_LIMIT", default_value_t = 100_000)]
    pub payment_limit: i64,
    /// Consumer group session timeout (how long a killed service's partitions wait), in
    /// milliseconds.
    #[arg(long = "session-timeout-ms", env = "COMMERCE_SESSION_TIMEOUT_MS", default_value = "10000", value_parser = millis)]
    pub session_timeout: Duration,
    /// Stock the order service gives the default SKU at start when it has none yet, so the
    /// reference request (no `items`) works on a fresh system; existing stock is kept.
    #[arg(long, env = "ORDER_DEFAULT_SKU_STOCK", default_value_t = 1_000)]
    pub default_sku_stock: u64,
    /// Most events of one partition an inbox applies in one transaction (`1`: one
    /// transaction per event).
    #[arg(
        long,
        env = "COMMERCE_INBOX_MAX_BATCH",
        default_value_t = eventful_idempotency::consumer::DEFAULT_MAX_BATCH
    )]
    pub inbox_max_batch: usize,
    /// Where the OpenTelemetry spans go: `none` (no tracing context is propagated either)
    /// or `stdout` (see the README's Tracing section).
    #[arg(long, env = "COMMERCE_TRACE_EXPORTER", value_enum, default_value_t = crate::telemetry::TraceExporter::None)]
    pub trace_exporter: crate::telemetry::TraceExporter,
}

impl Settings {
    /// Reads the settings from the environment alone (no command line): unset or empty
    /// variables take the defaults in the README.
    pub fn from_env() -> anyhow::Result<Self> {
        let matches = Self::command_with_env().try_get_matches_from(["commerce"])?;
        Ok(<Self as clap::FromArgMatches>::from_arg_matches(&matches)?)
    }

    /// Reads the settings from the command line and the environment; `--help` prints them
    /// and exits, an invalid value prints the error and exits.
    pub fn from_args_and_env() -> Self {
        let matches = Self::command_with_env().get_matches();
        <Self as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// The command, with options whose variable is set but empty detached from it: an empty
    /// variable counts as unset (clap would take the empty string as the value).
    fn command_with_env() -> clap::Command {
        let mut command = <Self as clap::CommandFactory>::command();
        let empty: Vec<clap::Id> = command
            .get_arguments()
            .filter(|arg| {
                arg.get_env()
                    .and_then(std::env::var_os)
                    .is_some_and(|value| value.is_empty())
            })
            .map(|arg| arg.get_id().clone())
            .collect();
        for id in empty {
            command = command.mut_arg(id, |arg| arg.env(None));
        }
        command
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

fn millis(value: &str) -> Result<Duration, std::num::ParseIntError> {
    value.parse().map(Duration::from_millis)
}

/// Longest `COMMERCE_DATABASE_PREFIX`: PostgreSQL names hold 63 bytes (longer ones are
/// silently truncated, which could make two services share a database), and the longest
/// service suffix is `notification_service` (20).
pub const MAX_DATABASE_PREFIX_LEN: usize = 63 - "notification_service".len();

/// The prefix becomes part of a `CREATE DATABASE` statement: only `[a-z0-9_]`, so it needs no
/// quoting rules and names no other database, and bounded by [`MAX_DATABASE_PREFIX_LEN`].
fn database_prefix(prefix: &str) -> anyhow::Result<String> {
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
    Ok(prefix.to_owned())
}

#[cfg(test)]
mod database_prefix_tests {
    use super::*;

    #[test]
    fn a_safe_prefix_is_kept() {
        for prefix in ["", "eventful_test_0123456789ab_", "shop1_"] {
            assert_eq!(database_prefix(prefix).unwrap(), prefix);
        }
        let longest = "a".repeat(MAX_DATABASE_PREFIX_LEN);
        assert_eq!(database_prefix(&longest).unwrap(), longest);
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
            let error = database_prefix(prefix).expect_err(prefix).to_string();
            assert!(error.contains("COMMERCE_DATABASE_PREFIX"), "{error}");
        }
    }
}

#[cfg(test)]
mod command_line_tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    #[test]
    fn help_names_every_variable_with_its_default() {
        let help = Settings::command().render_long_help().to_string();
        for variable in [
            "DATABASE_URL",
            "REDIS_URL",
            "KAFKA_BROKERS",
            "COMMERCE_TOPIC",
            "COMMERCE_TOPIC_PARTITIONS",
            "COMMERCE_DATABASE_PREFIX",
            "COMMERCE_GROUP_PREFIX",
            "COMMERCE_INVENTORY",
            "ORDER_ADDR",
            "PAYMENT_ADDR",
            "SHIPPING_ADDR",
            "NOTIFICATION_ADDR",
            "ORDER_RESERVATION_TTL_MS",
            "ORDER_EXPIRY_INTERVAL_MS",
            "PAYMENT_LIMIT",
            "COMMERCE_SESSION_TIMEOUT_MS",
            "ORDER_DEFAULT_SKU_STOCK",
        ] {
            assert!(
                help.contains(&format!("env: {variable}=")),
                "{variable} missing:\n{help}"
            );
        }
        assert!(help.contains("[default: 600000]"), "{help}");
    }

    #[test]
    fn options_parse_into_typed_settings_and_bad_values_name_the_option() {
        let settings = Settings::try_parse_from([
            "commerce",
            "--reservation-ttl-ms",
            "1500",
            "--database-prefix",
            "run7_",
        ])
        .unwrap();
        assert_eq!(settings.reservation_ttl, Duration::from_millis(1500));
        assert_eq!(settings.database_name("order"), "run7_order_service");
        let error = Settings::try_parse_from(["commerce", "--database-prefix", "Bad-Prefix"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("COMMERCE_DATABASE_PREFIX"), "{error}");
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        // Only this test touches the variable; the others ignore its value.
        std::env::set_var("COMMERCE_GROUP_PREFIX", "");
        let settings = Settings::from_env().unwrap();
        std::env::remove_var("COMMERCE_GROUP_PREFIX");
        assert_eq!(settings.group_prefix, "commerce");
    }
}
