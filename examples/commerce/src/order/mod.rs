//! The order service: takes orders over HTTP, holds their stock in Redis, owns the order
//! state (optimistic locking on a version column), and expires unpaid reservations.

pub mod api;
pub mod domain;
pub mod expiry;
pub mod flow;
pub mod request;
pub mod store;

use std::sync::Arc;

use anyhow::Context;
use eventful_reservation::{Reaper, RedisReservations, ReservationStore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::events;
use crate::service::ServiceBase;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/order");

/// The order service's state, shared by its HTTP handlers, event handlers and scheduler.
#[derive(Clone)]
pub struct OrderService {
    /// Database, outbox, settings.
    pub base: ServiceBase,
    /// Stock holds in Redis.
    pub reservations: Arc<dyn ReservationStore>,
    /// Limits on `POST /orders`.
    pub limits: request::RequestLimits,
}

/// Starts the order service's tasks on `tasks`.
pub async fn start(
    settings: &Settings,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    cancel: &CancellationToken,
) -> anyhow::Result<OrderService> {
    let base = ServiceBase::prepare("order", settings, &MIGRATOR).await?;
    let reservations: Arc<dyn ReservationStore> = Arc::new(
        RedisReservations::builder(settings.redis_url.as_str())
            .namespace(&settings.inventory)
            .connect()
            .await
            .context("connecting to Redis")?,
    );
    let service = OrderService {
        base,
        reservations,
        limits: request::RequestLimits::default(),
    };

    service.base.spawn_relay(tasks, cancel)?;
    let consumer = service
        .base
        .consumer()
        .handler(
            events::PAYMENT_APPROVED,
            flow::participant(&service, flow::PaymentApproved(service.clone())),
        )
        .handler(
            events::PAYMENT_FAILED,
            flow::participant(&service, flow::PaymentFailed(service.clone())),
        )
        .handler(
            events::SHIPPING_STARTED,
            flow::participant(&service, flow::ShippingStarted(service.clone())),
        );
    service.base.spawn_consumer(consumer, tasks, cancel)?;

    // Holds nobody releases (a crash between reserve and commit) still give their stock back.
    let reaper = Reaper::new(service.reservations.clone());
    let reaper_cancel = cancel.clone();
    tasks.spawn(async move {
        reaper.run(reaper_cancel).await;
        Ok(())
    });
    let scheduler = expiry::ExpiryScheduler::new(service.clone());
    let scheduler_cancel = cancel.clone();
    tasks.spawn(async move { scheduler.run(scheduler_cancel).await });

    // The order service holds stock in Redis: it is not ready without it.
    let readiness = service.base.readiness()?.with_redis(&settings.redis_url)?;
    service
        .base
        .spawn_http_with(
            &settings.order_addr,
            api::routes(service.clone()),
            readiness,
            tasks,
            cancel,
        )
        .await?;
    Ok(service)
}
