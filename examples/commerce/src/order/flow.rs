//! The order side of the flow: placing orders and reacting to payment and shipping events.
//!
//! Redis decides between a payment and an expiry: `confirm` and `release` of one reservation
//! are atomic and exclusive, so exactly one of them wins; the order row then follows the
//! winner, guarded by its version column.

use eventful_idempotency::HandlerError;
use eventful_outbox::NewEvent;
use eventful_reservation::{Error as ReservationError, ReservationState};
use eventful_saga::{Emitter, Participant, ParticipantHandler};
use sqlx::PgConnection;
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

/// Namespace of order ids derived from an `Idempotency-Key` (UUIDv5).
const ORDER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_7a52_2a4e_4a39_9c1e_0b3d_55e4_7a10);

/// How many ids one keyed order may try before the key is refused as spent: each try of a
/// request that failed after holding stock spends one (see [`OrderIds`]).
pub const MAX_ID_ATTEMPTS: u32 = 16;

/// How the orders of one `POST /orders` get their ids (which are also their reservation ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderIds {
    /// No `Idempotency-Key`: a fresh UUIDv7 per order.
    Fresh,
    /// Derived (UUIDv5) from the key, the request's [`fingerprint`](super::request::fingerprint),
    /// the order's index and an attempt number. The fingerprint covers every order's user,
    /// amount and items, so the same key sent by another user or for other orders (e.g. after
    /// the key's record expired) derives other ids and never finds someone else's order.
    Keyed {
        /// The `Idempotency-Key`.
        key: String,
        /// Fingerprint of the whole validated request.
        fingerprint: Uuid,
    },
}

impl OrderIds {
    /// The ids of `orders` placed under `Idempotency-Key` `key`.
    pub fn keyed(key: &str, orders: &[NewOrder]) -> Self {
        Self::Keyed {
            key: key.to_owned(),
            fingerprint: super::request::fingerprint(orders),
        }
    }

    /// The id of order `index` at try `attempt`.
    ///
    /// A keyed id whose reservation is spent (released or expired by an earlier try that then
    /// failed, with no order recorded) can never hold stock again, so the next attempt derives
    /// the next id; retries walk the same sequence and so find what an earlier try placed.
    pub fn id(&self, index: usize, attempt: u32) -> Uuid {
        match self {
            Self::Fresh => Uuid::now_v7(),
            // The key goes last: the fields before it contain no `/`, so the string is
            // unambiguous whatever the key holds.
            Self::Keyed { key, fingerprint } => Uuid::new_v5(
                &ORDER_ID_NAMESPACE,
                format!("{fingerprint}/{index}/{attempt}/{key}").as_bytes(),
            ),
        }
    }
}

/// Where one order of a request stands before the batch is recorded.
enum Claim {
    /// Stock short: the order is left out.
    Short,
    /// An earlier try of the same request placed it.
    Placed(Order),
    /// Its stock is held under `id`, until `expires_at` (Redis's clock).
    Held {
        id: Uuid,
        expires_at: chrono::DateTime<chrono::Utc>,
    },
}

impl OrderService {
    /// Places `orders`: holds each one's stock in Redis, then records them all with their
    /// `ORDER_RESERVED` events in **one** transaction.
    ///
    /// Returns the orders placed, in request order; an order whose stock is short is left out
    /// (the only partial outcome). On any error nothing is placed: the transaction rolls back
    /// and every hold this call took is released, so an error answer means no order and no
    /// held stock. A retry with the same keyed [`OrderIds`] returns the orders an earlier try
    /// placed, and takes fresh holds for the others: an order is only ever recorded on a live
    /// (`Held`) reservation.
    pub async fn place_orders(
        &self,
        ids: &OrderIds,
        orders: &[NewOrder],
    ) -> Result<Vec<Order>, ApiError> {
        let mut held = Vec::new();
        let placed = self.place_all(ids, orders, &mut held).await;
        if placed.is_err() {
            // Give the stock back now rather than at expiry. Should Redis fail here too, the
            // reaper returns it at the hold's deadline.
            for id in &held {
                if let Err(error) = self.reservations.release(&id.to_string()).await {
                    tracing::warn!(%id, %error, "release after a failed request");
                }
            }
        }
        placed
    }

    async fn place_all(
        &self,
        ids: &OrderIds,
        orders: &[NewOrder],
        held: &mut Vec<Uuid>,
    ) -> Result<Vec<Order>, ApiError> {
        let mut claims = Vec::with_capacity(orders.len());
        for (index, order) in orders.iter().enumerate() {
            let claim = self.claim(ids, index, order).await?;
            if let Claim::Held { id, .. } = &claim {
                held.push(*id);
            }
            claims.push(claim);
        }
        let mut tx = self.base.pool.begin().await.map_err(ApiError::internal)?;
        let mut placed = Vec::with_capacity(claims.len());
        for (claim, order) in claims.into_iter().zip(orders) {
            match claim {
                Claim::Short => {}
                Claim::Placed(existing) => placed.push(existing),
                Claim::Held { id, expires_at } => {
                    let (order, created) = self
                        .record_new_order(&mut tx, id, order, expires_at)
                        .await?;
                    if !created {
                        // Another try's order owns this hold: an error here must not cut it.
                        held.retain(|held| *held != id);
                    }
                    placed.push(order);
                }
            }
        }
        tx.commit().await.map_err(ApiError::internal)?;
        Ok(placed)
    }

    /// Finds a live hold (or the order an earlier try placed) for order `index`.
    async fn claim(
        &self,
        ids: &OrderIds,
        index: usize,
        order: &NewOrder,
    ) -> Result<Claim, ApiError> {
        let items: Vec<(&str, u64)> = order
            .items
            .iter()
            .map(|item| (item.sku.as_str(), u64::from(item.quantity)))
            .collect();
        let ttl = self.base.settings.reservation_ttl;
        for attempt in 0..MAX_ID_ATTEMPTS {
            let id = ids.id(index, attempt);
            if matches!(ids, OrderIds::Keyed { .. }) {
                let mut conn = self.base.pool.acquire().await.map_err(ApiError::internal)?;
                if let Some(existing) = store::find(&mut conn, id)
                    .await
                    .map_err(ApiError::internal)?
                {
                    ensure_same(&existing, order)?;
                    return Ok(Claim::Placed(existing));
                }
            }
            match self
                .reservations
                .reserve(&id.to_string(), &items, ttl)
                .await
            {
                // New, or left live by an earlier try that died before recording the order.
                Ok(reservation) if reservation.state == ReservationState::Held => {
                    return Ok(Claim::Held {
                        id,
                        expires_at: reservation.expires_at.into(),
                    })
                }
                // Spent: released or expired with no order recorded. Never place an order on
                // it (it holds nothing); the next id takes a fresh hold.
                Ok(_) => continue,
                Err(ReservationError::InsufficientStock { .. }) => return Ok(Claim::Short),
                Err(ReservationError::IdConflict { .. }) => return Err(key_reused()),
                Err(ReservationError::UnknownSku { sku, .. }) => {
                    return Err(ApiError::unprocessable(
                        "unknown_sku",
                        format!("unknown sku {sku}"),
                    ))
                }
                Err(error) => return Err(ApiError::internal(error)),
            }
        }
        Err(ApiError::unprocessable(
            "idempotency_key_spent",
            "this Idempotency-Key failed too many times; send the request with a new key",
        ))
    }

    /// Inserts the order and its event; `false` with the order found when another try of the
    /// same request recorded it first.
    async fn record_new_order(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        order: &NewOrder,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Order, bool), ApiError> {
        let inserted = store::insert(
            tx,
            id,
            order.user_id,
            order.total_amount,
            &order.items,
            expires_at,
        )
        .await
        .map_err(ApiError::internal)?;
        let Some(created) = inserted else {
            // Placed concurrently by another try of the same request: no second event.
            let existing = store::find(tx, id)
                .await
                .map_err(ApiError::internal)?
                .ok_or_else(|| ApiError::internal(format!("order {id} vanished")))?;
            ensure_same(&existing, order)?;
            return Ok((existing, false));
        };
        let event = self
            .order_event(&created, events::ORDER_RESERVED, None)
            .map_err(ApiError::internal)?;
        self.base
            .outbox
            .record(tx, event)
            .await
            .map_err(ApiError::internal)?;
        Ok((created, true))
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

fn key_reused() -> ApiError {
    ApiError::unprocessable(
        "idempotency_key_reused",
        "this Idempotency-Key was used for different orders",
    )
}

/// An order found under a derived id must be the one asked for; anything else is a reused key.
fn ensure_same(existing: &Order, order: &NewOrder) -> Result<(), ApiError> {
    let mut items = existing.items.clone();
    items.sort_by(|a, b| a.sku.cmp(&b.sku));
    if existing.user_id == order.user_id
        && existing.total_amount == order.total_amount
        && items == order.canonical_items()
    {
        Ok(())
    } else {
        Err(key_reused())
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
