//! The scheduler that expires unpaid reservations (the reference design's TTL job).

use eventful_reservation::Error as ReservationError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::domain::OrderStatus;
use super::{store, OrderService};
use crate::events;

/// Every `expiry_interval`, settles `ORDER_RESERVED` orders past `expiresAt` the way their
/// reservation was settled: released (or gone) → `ORDER_EXPIRED`, confirmed by a racing
/// payment → `PAID`. Each order gets its own short transaction, claimed with
/// `FOR UPDATE SKIP LOCKED`, so several order-service instances can run it, one failing order
/// does not hold back the others, and no lock is held across more than one Redis call.
pub struct ExpiryScheduler {
    service: OrderService,
    batch_size: i64,
}

/// What the scheduler did with one due order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Its stock was released (or already gone): now `ORDER_EXPIRED`.
    Expired,
    /// A payment confirmed it first: now `PAID`.
    Paid,
    /// Someone else settled it meanwhile.
    Skipped,
}

impl ExpiryScheduler {
    /// A scheduler looking at up to 100 due orders per round.
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
            if let Err(error) = self.settle_due().await {
                tracing::warn!(%error, "expiring reservations failed; will retry");
            }
        }
    }

    /// Settles the orders due now; returns how many it expired.
    #[tracing::instrument(skip(self))]
    pub async fn settle_due(&self) -> anyhow::Result<usize> {
        let mut expired = 0;
        loop {
            let due: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM orders WHERE status = 'ORDER_RESERVED' AND expires_at <= now() \
                 ORDER BY expires_at LIMIT $1",
            )
            .bind(self.batch_size)
            .fetch_all(&self.service.base.pool)
            .await?;
            let mut progressed = 0;
            for id in &due {
                match self.settle(*id).await {
                    Ok(Settled::Expired) => {
                        expired += 1;
                        progressed += 1;
                    }
                    Ok(Settled::Paid) => progressed += 1,
                    Ok(Settled::Skipped) => {}
                    // One order's trouble (Redis down, say) must not stall the others.
                    Err(error) => tracing::warn!(%id, %error, "could not settle an expired order"),
                }
            }
            if (due.len() as i64) < self.batch_size || progressed == 0 {
                return Ok(expired);
            }
        }
    }

    /// Settles one due order in its own transaction.
    pub async fn settle(&self, id: Uuid) -> anyhow::Result<Settled> {
        let service = &self.service;
        let mut tx = service.base.pool.begin().await?;
        // Bounded wait: a payment handler holding the row finishes quickly, or we try later.
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        let Some(order) = store::find_due_for_update(&mut tx, id).await? else {
            return Ok(Settled::Skipped);
        };
        let (next, reason, event_type) = match service.reservations.release(&id.to_string()).await {
            // Released now or before, or already returned by the reaper.
            Ok(_) | Err(ReservationError::ReservationNotFound { .. }) => (
                OrderStatus::OrderExpired,
                "reservation expired before payment",
                events::ORDER_EXPIRED,
            ),
            // A payment won the race: the reservation is a sale, so the order is paid.
            Err(ReservationError::AlreadyConfirmed { .. }) => (
                OrderStatus::Paid,
                "payment confirmed before the expiry",
                events::ORDER_PAID,
            ),
            Err(error) => return Err(error.into()),
        };
        let Some(updated) = store::transition(&mut tx, &order, next, reason).await? else {
            return Ok(Settled::Skipped);
        };
        let event = service.order_event(&updated, event_type, Some(reason))?;
        service.base.outbox.record(&mut tx, event).await?;
        tx.commit().await?;
        Ok(if next == OrderStatus::Paid {
            Settled::Paid
        } else {
            Settled::Expired
        })
    }
}
