//! Start-up chores shared by the services: their database and the topic (logging and
//! tracing are [`telemetry`](crate::telemetry)'s).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::Settings;

/// Creates the service's database when missing, connects, and returns the pool.
pub async fn service_database(settings: &Settings, service: &str) -> anyhow::Result<PgPool> {
    let name = settings.database_name(service);
    let admin_options = PgConnectOptions::from_str(&settings.database_url)
        .context("DATABASE_URL is not a PostgreSQL URL")?;
    let mut admin = admin_options
        .clone()
        .connect()
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", settings.database_url))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let created = sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await;
        // Two services starting together may race to create it: "already exists" is success.
        if let Err(error) = created {
            let code = error
                .as_database_error()
                .and_then(|e| e.code())
                .map(|c| c.into_owned());
            if !matches!(code.as_deref(), Some("42P04") | Some("23505")) {
                return Err(error).with_context(|| format!("creating database {name}"));
            }
        }
    }
    let _ = admin.close().await;
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(admin_options.database(&name))
        .await
        .with_context(|| format!("connecting to database {name}"))
}

/// Creates the event topic when missing (a local broker may not auto-create topics).
pub async fn ensure_topic(settings: &Settings) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .create()
        .context("Kafka admin client")?;
    let topic = NewTopic::new(
        &settings.topic,
        settings.topic_partitions,
        TopicReplication::Fixed(1),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .create_topics([&topic], &options)
        .await
        .with_context(|| format!("creating topic {}", settings.topic))?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}
