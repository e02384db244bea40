//! The scheduler that expires unpaid reservations (the reference design's TTL job).

use std::time::Duration;

use eventful_reservation::{Error as ReservationError, ReservationState};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::domain::OrderStatus;
use super::{store, OrderService};
use crate::events;

/// How far ahead of PostgreSQL's clock the scheduler looks for candidates by default: the
/// largest PostgreSQL-behind-Redis clock difference that delays no expiry.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(2);

/// Every `expiry_interval`, settles unpaid (`ORDER_RESERVED`) orders whose reservation Redis
/// no longer holds: released or expired (or gone) → `ORDER_EXPIRED`, confirmed by a racing
/// payment → `PAID`.
///
/// **Redis's clock decides.** A reservation's deadline lives in Redis and is checked there
/// against Redis's own time (the reservation scripts call `TIME`), so the order service's and
/// PostgreSQL's clocks never decide whether a hold is over:
///
/// - `orders.expires_at` is a copy of Redis's deadline. It only *nominates* candidates, read
///   [`clock_skew`](Self::clock_skew) ahead of PostgreSQL's `now()`;
/// - each candidate's reservation is then read from Redis: an order whose hold is still live
///   (`Held` by Redis's clock) is left alone, however late PostgreSQL thinks it is, and is
///   looked at again on the next round;
/// - an order Redis has expired is expired even when PostgreSQL's clock is up to `clock_skew`
///   behind; beyond that the order's state follows late by the excess, but never its stock:
///   the reaper returns the stock on Redis's clock, and a payment arriving meanwhile is refused
///   by Redis (the order then expires and the payment is refunded).
///
/// Each order gets its own short transaction, claimed with `FOR UPDATE SKIP LOCKED`, so
/// several order-service instances can run it, one failing order does not hold back the
/// others, and no lock is held across more than two Redis calls.
pub struct ExpiryScheduler {
    service: OrderService,
    batch_size: i64,
    clock_skew: Duration,
}

/// What the scheduler did with one candidate order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Its stock was released (or already gone): now `ORDER_EXPIRED`.
    Expired,
    /// A payment confirmed it first: now `PAID`.
    Paid,
    /// Redis still holds its stock (its deadline has not passed on Redis's clock): left as is.
    StillHeld,
    /// Someone else settled it meanwhile.
    Skipped,
}

impl ExpiryScheduler {
    /// A scheduler looking at up to 100 candidates per round, [`DEFAULT_CLOCK_SKEW`] ahead.
    pub fn new(service: OrderService) -> Self {
        Self {
            service,
            batch_size: 100,
            clock_skew: DEFAULT_CLOCK_SKEW,
        }
    }

    /// How far ahead of PostgreSQL's `now()` an order's `expires_at` makes it a candidate
    /// (default [`DEFAULT_CLOCK_SKEW`]): the PostgreSQL-behind-Redis clock difference
    /// tolerated without delay. Larger costs a Redis read per round for each unpaid order that
    /// close to its deadline.
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
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

    /// Settles the orders whose reservation Redis no longer holds; returns how many it expired.
    #[tracing::instrument(skip(self))]
    pub async fn settle_due(&self) -> anyhow::Result<usize> {
        let skew_ms = i64::try_from(self.clock_skew.as_millis()).unwrap_or(i64::MAX);
        let mut expired = 0;
        loop {
            let due: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM orders WHERE status = 'ORDER_RESERVED' \
                 AND expires_at <= now() + $2 * interval '1 millisecond' \
                 ORDER BY expires_at LIMIT $1",
            )
            .bind(self.batch_size)
            .bind(skew_ms)
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
                    Ok(Settled::StillHeld | Settled::Skipped) => {}
                    // One order's trouble (Redis down, say) must not stall the others.
                    Err(error) => tracing::warn!(%id, %error, "could not settle an expired order"),
                }
            }
            if (due.len() as i64) < self.batch_size || progressed == 0 {
                return Ok(expired);
            }
        }
    }

    /// Settles one candidate order in its own transaction, as Redis has settled its
    /// reservation.
    pub async fn settle(&self, id: Uuid) -> anyhow::Result<Settled> {
        let service = &self.service;
        let mut tx = service.base.pool.begin().await?;
        // Bounded wait: a payment handler holding the row finishes quickly, or we try later.
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        let Some(order) = store::find_reserved_for_update(&mut tx, id).await? else {
            return Ok(Settled::Skipped);
        };
        // Redis's clock decides whether the hold is over; PostgreSQL's only nominated it.
        let reservation = service.reservations.reservation(&id.to_string()).await?;
        if reservation.is_some_and(|r| r.state == ReservationState::Held) {
            return Ok(Settled::StillHeld);
        }
        // Not held any more, so this release cannot cut a live hold short: it returns the
        // stock of an expired hold the reaper has not reached yet, or reports the outcome.
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
