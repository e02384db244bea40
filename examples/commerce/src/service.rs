//! What every service's start-up shares: its database, outbox, relay and inbox consumer.
//!
//! The services contain no consume/dedupe/commit or publish loop of their own: the outbox
//! relay and the inbox consumer come from the Eventful crates, wired here once.

use anyhow::Context;
use eventful_idempotency::{ConsumerOptions, DeadLetter, InboxConsumer, InboxConsumerBuilder};
use eventful_outbox::{KafkaPublisher, Outbox, Relay};
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::infra;

/// A started service's shared pieces.
#[derive(Clone)]
pub struct ServiceBase {
    /// `order`, `payment`, `shipping` or `notification`.
    pub name: &'static str,
    /// Settings of the whole system.
    pub settings: Settings,
    /// The service's own database.
    pub pool: PgPool,
    /// The service's outbox (in its own database).
    pub outbox: Outbox,
}

impl ServiceBase {
    /// Creates and migrates the service's database (its tables, the outbox, the
    /// processed-event guard and dead letters) and makes sure the topic exists.
    pub async fn prepare(
        name: &'static str,
        settings: &Settings,
        migrator: &Migrator,
    ) -> anyhow::Result<Self> {
        // Before the relay, the consumer and the stores register their instruments: one
        // registered while no recorder is installed stays a no-op for good.
        let _ = crate::observe::recorder();
        let pool = infra::service_database(settings, name).await?;
        migrator
            .run(&pool)
            .await
            .with_context(|| format!("migrating {name}"))?;
        // The span recording an event names it in the event's `traceparent`, so the next
        // service's handler continues the trace (nothing without an OpenTelemetry layer).
        let outbox = Outbox::builder()
            .traceparent_source(eventful_outbox::otel::current_traceparent)
            .build()
            .context("outbox")?;
        outbox.migrate(&pool).await.context("outbox migration")?;
        eventful_idempotency::migrate(&pool)
            .await
            .context("idempotency migration")?;
        infra::ensure_topic(settings).await?;
        Ok(Self {
            name,
            settings: settings.clone(),
            pool,
            outbox,
        })
    }

    /// Starts the outbox relay that publishes this service's events to Kafka.
    pub fn spawn_relay(
        &self,
        tasks: &mut JoinSet<anyhow::Result<()>>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let publisher =
            KafkaPublisher::new(&self.settings.kafka_brokers).context("Kafka publisher")?;
        let relay = Relay::builder(self.pool.clone(), self.outbox.clone(), publisher)
            .build()
            .context("outbox relay")?;
        let cancel = cancel.clone();
        let name = self.name;
        tasks.spawn(async move {
            relay
                .run(cancel)
                .await
                .with_context(|| format!("{name}: outbox relay"))
        });
        Ok(())
    }

    /// An inbox consumer on the event topic, in this service's group; malformed events and
    /// permanent handler failures go to the `eventful_dead_letters` table.
    pub fn consumer(&self) -> InboxConsumerBuilder {
        let options = ConsumerOptions::new(
            &self.settings.kafka_brokers,
            self.settings.group(self.name),
            self.name,
        )
        // A SIGKILLed member never leaves the group: its partitions wait for the session
        // timeout (librdkafka's default is 45 s), so a shorter one hands them over sooner.
        .set(
            "session.timeout.ms",
            self.settings.session_timeout.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "1000");
        InboxConsumer::builder(options, self.pool.clone())
            .topic(&self.settings.topic)
            .max_batch(self.settings.inbox_max_batch)
            .dead_letter(DeadLetter::Table)
    }

    /// Starts `consumer` as one of the service's tasks.
    pub fn spawn_consumer(
        &self,
        consumer: InboxConsumerBuilder,
        tasks: &mut JoinSet<anyhow::Result<()>>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let consumer = consumer.build().context("inbox consumer")?;
        let cancel = cancel.clone();
        let name = self.name;
        tasks.spawn(async move {
            consumer
                .run(cancel)
                .await
                .with_context(|| format!("{name}: inbox consumer"))
        });
        Ok(())
    }

    /// What `/ready` checks for this service: its database and Kafka.
    pub fn readiness(&self) -> anyhow::Result<crate::observe::Readiness> {
        crate::observe::Readiness::new(
            self.pool.clone(),
            &self.settings.kafka_brokers,
            &self.settings.topic,
        )
    }

    /// Serves `routes` (plus `/health`, `/metrics`, `/ready` and the common layers) on
    /// `addr`.
    pub async fn spawn_http(
        &self,
        addr: &str,
        routes: axum::Router,
        tasks: &mut JoinSet<anyhow::Result<()>>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        self.spawn_http_with(addr, routes, self.readiness()?, tasks, cancel)
            .await
    }

    /// [`spawn_http`](Self::spawn_http) with `/ready` checking `readiness`.
    pub async fn spawn_http_with(
        &self,
        addr: &str,
        routes: axum::Router,
        readiness: crate::observe::Readiness,
        tasks: &mut JoinSet<anyhow::Result<()>>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let routes = routes.merge(crate::observe::routes(readiness));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("{}: binding {addr}", self.name))?;
        tracing::info!(service = self.name, %addr, "listening");
        let app = crate::http::with_common_layers(routes);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            crate::http::serve(listener, app, cancel)
                .await
                .context("HTTP server")
        });
        Ok(())
    }
}
