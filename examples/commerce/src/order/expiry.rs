//! The scheduler that expires unpaid reservations (the reference design's TTL job).

use eventful_reservation::Error as ReservationError;
use tokio_util::sync::CancellationToken;

use super::domain::OrderStatus;
use super::{store, OrderService};
use crate::events;

/// Every `expiry_interval`, releases the stock of `ORDER_RESERVED` orders past `expiresAt`,
/// marks them `ORDER_EXPIRED` and records `ORDER_EXPIRED`. Safe with several order-service
/// instances: rows are claimed with `FOR UPDATE SKIP LOCKED`, and a payment racing the expiry
/// is settled by the reservation (confirm and release exclude each other).
pub struct ExpiryScheduler {
    service: OrderService,
    batch_size: i64,
}

impl ExpiryScheduler {
    /// A scheduler expiring up to 100 orders per transaction.
    pub fn new(service: OrderService) -> Self {
        Self {
            service,
            batch_size: 100,
        }
    }

    /// Runs until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(self.service.base.settings.expiry_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = ticker.tick() => {}
            }
            loop {
                match self.expire_due().await {
                    Ok(expired) if expired as i64 >= self.batch_size => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "expiring reservations failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// Expires one batch of due orders; returns how many it expired.
    #[tracing::instrument(skip(self))]
    pub async fn expire_due(&self) -> anyhow::Result<usize> {
        let service = &self.service;
        let mut tx = service.base.pool.begin().await?;
        let due = store::expired(&mut tx, chrono::Utc::now(), self.batch_size).await?;
        let mut expired = 0;
        for order in due {
            // Release is idempotent and also reports a hold the reaper already expired.
            match service.reservations.release(&order.id.to_string()).await {
                Ok(_) => {}
                // The payment won the race; its handler moves the order to PAID.
                Err(ReservationError::AlreadyConfirmed { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
            let reason = "reservation expired before payment";
            if let Some(updated) =
                store::transition(&mut tx, &order, OrderStatus::OrderExpired, reason).await?
            {
                let event = service.order_event(&updated, events::ORDER_EXPIRED, Some(reason))?;
                service.base.outbox.record(&mut tx, event).await?;
                expired += 1;
            }
        }
        tx.commit().await?;
        Ok(expired)
    }
}
