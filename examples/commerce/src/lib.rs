//! The commerce example: order, payment, shipping and notification services built only from
//! the Eventful crates, over PostgreSQL, Redis and Kafka.
//!
//! Run with `cargo run -p commerce --bin commerce` (all four services in one process) after
//! `scripts/services up`, or each service as its own binary (`order`, `payment`, `shipping`,
//! `notification`). `commerce-load` drives a running system and checks its invariants;
//! `commerce-chaos` runs the services as processes under kills and server restarts and checks
//! them too.
//!
//! Flow, all events on one topic keyed by order id: `ORDER_RESERVED` (order) →
//! `PAYMENT_APPROVED` / `PAYMENT_FAILED` (payment) → `ORDER_PAID` (order) →
//! `SHIPPING_STARTED` (shipping); a declined payment → `ORDER_CANCELED` with the stock
//! released; an unpaid reservation past its TTL → `ORDER_EXPIRED` with the stock released
//! (and a payment that lost that race → `PAYMENT_REFUNDED`).

pub mod chaos;
pub mod config;
pub mod events;
pub mod http;
pub mod infra;
pub mod load;
pub mod notification;
pub mod observe;
pub mod order;
pub mod payment;
pub mod service;
pub mod shipping;
pub mod stock;
pub mod telemetry;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// HTTP orders, stock, order state, expiry.
    Order,
    /// Payments.
    Payment,
    /// Shipments.
    Shipping,
    /// Notifications.
    Notification,
}

/// Runs `services` in this process until SIGINT/SIGTERM, then shuts down gracefully. The
/// settings come from the command line and the environment (`--help` lists them).
pub async fn run(services: &[Service]) -> anyhow::Result<()> {
    let settings = config::Settings::from_args_and_env();
    let telemetry = telemetry::init(settings.trace_exporter);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for service in services {
        match service {
            Service::Order => {
                // Before the HTTP listener opens, so no request finds the default SKU unknown.
                stock::seed_default_sku(&settings).await?;
                drop(order::start(&settings, &mut tasks, &cancel).await?)
            }
            Service::Payment => drop(payment::start(&settings, &mut tasks, &cancel).await?),
            Service::Shipping => drop(shipping::start(&settings, &mut tasks, &cancel).await?),
            Service::Notification => {
                drop(notification::start(&settings, &mut tasks, &cancel).await?)
            }
        }
    }
    tracing::info!(?services, "started");
    let mut result = Ok(());
    tokio::select! {
        signal = shutdown_signal() => signal?,
        Some(ended) = tasks.join_next() => {
            // A task that stops on its own is a failure: stop the rest and say why.
            result = match ended.context("task panicked") {
                Ok(Ok(())) => Err(anyhow::anyhow!("a service task stopped unexpectedly")),
                Ok(Err(error)) | Err(error) => Err(error),
            };
        }
    }
    cancel.cancel();
    while let Some(ended) = tasks.join_next().await {
        if let Ok(Err(error)) = ended {
            tracing::warn!(%error, "task ended with an error during shutdown");
        }
    }
    telemetry.shutdown();
    result
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        ctrl_c = tokio::signal::ctrl_c() => ctrl_c?,
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}
