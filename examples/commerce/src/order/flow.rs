//! The order side of the flow: placing orders and reacting to payment and shipping events.
//!
//! Redis decides between a payment and an expiry: `confirm` and `release` of one reservation
//! are atomic and exclusive, so exactly one of them wins; the order row then follows the
//! winner, guarded by its version column.

use eventful_idempotency::HandlerError;
use eventful_outbox::NewEvent;
use eventful_reservation::Error as ReservationError;
use eventful_saga::{Emitter, Participant, ParticipantHandler};
use uuid::Uuid;

use super::domain::OrderStatus;
use super::request::NewOrder;
use super::store::{self, Order};
use super::OrderService;
use crate::events::{self, PaymentEvent, ShippingEvent};
use crate::http::ApiError;

/// Wraps a handler for the inbox consumer (guard + outbox in one transaction).
pub fn participant<P: Participant>(service: &OrderService, handler: P) -> ParticipantHandler<P> {
    eventful_saga::participant(service.base.outbox.clone(), handler)
}

impl OrderService {
    /// Holds stock for `order` under id `id` and records it with its `ORDER_RESERVED` event.
    ///
    /// `Ok(None)` when the stock is short: the order is left out, nothing is written. Placing
    /// the same id again returns the order placed the first time (both steps are idempotent),
    /// which is what makes a retried `POST /orders` with an `Idempotency-Key` safe.
    pub async fn place(&self, id: Uuid, order: &NewOrder) -> Result<Option<Order>, ApiError> {
        let items: Vec<(&str, u64)> = order
            .items
            .iter()
            .map(|item| (item.sku.as_str(), u64::from(item.quantity)))
            .collect();
        let ttl = self.base.settings.reservation_ttl;
        let reservation = match self
            .reservations
            .reserve(&id.to_string(), &items, ttl)
            .await
        {
            Ok(reservation) => reservation,
            Err(ReservationError::InsufficientStock { .. }) => return Ok(None),
            Err(ReservationError::IdConflict { .. }) => {
                return Err(ApiError::unprocessable(
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for different orders",
                ))
            }
            Err(ReservationError::UnknownSku { sku, .. }) => {
                return Err(ApiError::unprocessable(
                    "unknown_sku",
                    format!("unknown sku {sku}"),
                ))
            }
            Err(error) => return Err(ApiError::internal(error)),
        };
        let expires_at = chrono::DateTime::<chrono::Utc>::from(reservation.expires_at);
        match self.record_new_order(id, order, expires_at).await {
            Ok(created) => Ok(Some(created)),
            Err(error) => {
                // Give the stock back now rather than at expiry.
                if let Err(release) = self.reservations.release(&id.to_string()).await {
                    tracing::warn!(%id, %release, "release after a failed insert");
                }
                Err(ApiError::internal(error))
            }
        }
    }

    async fn record_new_order(
        &self,
        id: Uuid,
        order: &NewOrder,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Order> {
        let mut tx = self.base.pool.begin().await?;
        let Some(created) = store::insert(
            &mut tx,
            id,
            order.user_id,
            order.total_amount,
            &order.items,
            expires_at,
        )
        .await?
        else {
            // Placed before (a retried request): no second event.
            return store::find(&mut tx, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("order {id} vanished"));
        };
        let event = self.order_event(&created, events::ORDER_RESERVED, None)?;
        self.base.outbox.record(&mut tx, event).await?;
        tx.commit().await?;
        Ok(created)
    }

    /// The event `event_type` about `order`, keyed by its id.
    pub fn order_event(
        &self,
        order: &Order,
        event_type: &str,
        reason: Option<&str>,
    ) -> Result<NewEvent, eventful_outbox::Error> {
        NewEvent::json(
            &self.base.settings.topic,
            order.id.to_string(),
            event_type,
            &order.event(reason.map(str::to_owned)),
        )
    }
}

async fn load(cx: &mut Emitter<'_>, order_id: Uuid) -> Result<Order, HandlerError> {
    store::find(cx.conn(), order_id)
        .await?
        .ok_or_else(|| HandlerError::permanent(format!("unknown order {order_id}")))
}

/// Applies a transition decided by an event, emitting its follow-up event; a lost version race
/// is transient, so the runtime retries the event and the handler decides again on fresh state.
async fn apply(
    service: &OrderService,
    cx: &mut Emitter<'_>,
    order: &Order,
    next: OrderStatus,
    reason: &str,
    event_type: Option<&str>,
) -> Result<(), HandlerError> {
    let Some(updated) = store::transition(cx.conn(), order, next, reason).await? else {
        return Err(HandlerError::transient(format!(
            "order {} changed concurrently (version {})",
            order.id, order.version
        )));
    };
    if let Some(event_type) = event_type {
        let event = service
            .order_event(&updated, event_type, Some(reason))
            .map_err(HandlerError::permanent)?;
        cx.emit(event).await?;
    }
    Ok(())
}

fn reservation_failure(error: ReservationError) -> HandlerError {
    if error.is_retryable() {
        HandlerError::transient(error)
    } else {
        HandlerError::permanent(error)
    }
}

/// `PAYMENT_APPROVED`: confirm the hold (the sale) and become `PAID` — unless the expiry won.
pub struct PaymentApproved(pub OrderService);

#[async_trait::async_trait]
impl Participant for PaymentApproved {
    type Event = PaymentEvent;

    async fn handle(
        &self,
        cx: &mut Emitter<'_>,
        payment: PaymentEvent,
    ) -> Result<(), HandlerError> {
        let order = load(cx, payment.order_id).await?;
        if order.status != OrderStatus::OrderReserved {
            return Ok(()); // decided already (late or repeated event)
        }
        match self.0.reservations.confirm(&order.id.to_string()).await {
            Ok(_) => {
                apply(
                    &self.0,
                    cx,
                    &order,
                    OrderStatus::Paid,
                    "payment approved",
                    Some(events::ORDER_PAID),
                )
                .await
            }
            // The reservation expired (or was lost with Redis data) first: the order ends
            // expired and payment refunds.
            Err(
                ReservationError::Expired { .. }
                | ReservationError::AlreadyReleased { .. }
                | ReservationError::ReservationNotFound { .. },
            ) => {
                apply(
                    &self.0,
                    cx,
                    &order,
                    OrderStatus::OrderExpired,
                    "payment arrived after the reservation expired",
                    Some(events::ORDER_EXPIRED),
                )
                .await
            }
            Err(error) => Err(reservation_failure(error)),
        }
    }
}

/// `PAYMENT_FAILED`: the compensation — release the stock and cancel the order.
pub struct PaymentFailed(pub OrderService);

#[async_trait::async_trait]
impl Participant for PaymentFailed {
    type Event = PaymentEvent;

    async fn handle(
        &self,
        cx: &mut Emitter<'_>,
        payment: PaymentEvent,
    ) -> Result<(), HandlerError> {
        let order = load(cx, payment.order_id).await?;
        if order.status != OrderStatus::OrderReserved {
            return Ok(());
        }
        // Released now, before, or returned by the reaper at expiry: the stock is back.
        if let Err(error) = self.0.reservations.release(&order.id.to_string()).await {
            return Err(reservation_failure(error));
        }
        let reason = payment
            .reason
            .unwrap_or_else(|| "payment declined".to_owned());
        apply(
            &self.0,
            cx,
            &order,
            OrderStatus::OrderCanceled,
            &reason,
            Some(events::ORDER_CANCELED),
        )
        .await
    }
}

/// `SHIPPING_STARTED`: the order is on its way.
pub struct ShippingStarted(pub OrderService);

#[async_trait::async_trait]
impl Participant for ShippingStarted {
    type Event = ShippingEvent;

    async fn handle(
        &self,
        cx: &mut Emitter<'_>,
        shipping: ShippingEvent,
    ) -> Result<(), HandlerError> {
        let order = load(cx, shipping.order_id).await?;
        if order.status != OrderStatus::Paid {
            return Ok(());
        }
        apply(
            &self.0,
            cx,
            &order,
            OrderStatus::Shipping,
            "shipping started",
            None,
        )
        .await
    }
}
