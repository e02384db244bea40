//! The payment service: takes one payment per reserved order and refunds payments whose order
//! expired first.
//!
//! The decision is deterministic, so runs can be checked: a payment is **declined when the
//! order's `totalAmount` exceeds `PAYMENT_LIMIT`** (default 100000), approved otherwise.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use eventful_idempotency::HandlerError;
use eventful_outbox::NewEvent;
use eventful_saga::{Emitter, Participant};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;
use crate::events::{self, OrderEvent, PaymentEvent};
use crate::http::ApiError;
use crate::service::ServiceBase;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/payment");

/// Starts the payment service's tasks on `tasks`.
pub async fn start(
    settings: &Settings,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    cancel: &CancellationToken,
) -> anyhow::Result<ServiceBase> {
    let base = ServiceBase::prepare("payment", settings, &MIGRATOR).await?;
    base.spawn_relay(tasks, cancel)?;
    let outbox = base.outbox.clone();
    let consumer = base
        .consumer()
        .handler(
            events::ORDER_RESERVED,
            eventful_saga::participant(outbox.clone(), TakePayment(base.clone())),
        )
        .handler(
            events::ORDER_EXPIRED,
            eventful_saga::participant(outbox, RefundPayment(base.clone())),
        );
    base.spawn_consumer(consumer, tasks, cancel)?;
    let routes = Router::new()
        .route("/payments/{order_id}", get(get_payment))
        .with_state(base.clone());
    base.spawn_http(&settings.payment_addr, routes, tasks, cancel)
        .await?;
    Ok(base)
}

/// The rule: declined above the limit.
pub fn decide(total_amount: i64, limit: i64) -> Result<(), String> {
    if total_amount > limit {
        Err(format!("amount {total_amount} exceeds the limit {limit}"))
    } else {
        Ok(())
    }
}

fn payment_event(
    base: &ServiceBase,
    event_type: &str,
    payment: &PaymentEvent,
) -> Result<NewEvent, HandlerError> {
    NewEvent::json(
        &base.settings.topic,
        payment.order_id.to_string(),
        event_type,
        payment,
    )
    .map_err(HandlerError::permanent)
}

/// `ORDER_RESERVED`: one payment per order (the primary key says so), then its outcome.
struct TakePayment(ServiceBase);

#[async_trait::async_trait]
impl Participant for TakePayment {
    type Event = OrderEvent;

    async fn handle(&self, cx: &mut Emitter<'_>, order: OrderEvent) -> Result<(), HandlerError> {
        let decision = decide(order.total_amount, self.0.settings.payment_limit);
        let status = if decision.is_ok() {
            "APPROVED"
        } else {
            "DECLINED"
        };
        let payment = PaymentEvent {
            order_id: order.order_id,
            user_id: order.user_id,
            payment_id: Uuid::now_v7(),
            amount: order.total_amount,
            reason: decision.err(),
        };
        let inserted = sqlx::query(
            "INSERT INTO payments (order_id, id, user_id, amount, status, reason) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(payment.order_id)
        .bind(payment.payment_id)
        .bind(payment.user_id)
        .bind(payment.amount)
        .bind(status)
        .bind(&payment.reason)
        .execute(cx.conn())
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(()); // this order was paid for already
        }
        let event_type = if status == "APPROVED" {
            events::PAYMENT_APPROVED
        } else {
            events::PAYMENT_FAILED
        };
        cx.emit(payment_event(&self.0, event_type, &payment)?)
            .await?;
        Ok(())
    }
}

/// `ORDER_EXPIRED`: a payment approved for an order that expired first is refunded.
struct RefundPayment(ServiceBase);

#[async_trait::async_trait]
impl Participant for RefundPayment {
    type Event = OrderEvent;

    async fn handle(&self, cx: &mut Emitter<'_>, order: OrderEvent) -> Result<(), HandlerError> {
        let refunded: Option<(Uuid, i64)> = sqlx::query_as(
            "UPDATE payments SET status = 'REFUNDED', reason = 'order expired', updated_at = now() \
             WHERE order_id = $1 AND status = 'APPROVED' RETURNING id, amount",
        )
        .bind(order.order_id)
        .fetch_optional(cx.conn())
        .await?;
        if let Some((payment_id, amount)) = refunded {
            let payment = PaymentEvent {
                order_id: order.order_id,
                user_id: order.user_id,
                payment_id,
                amount,
                reason: Some("order expired before the payment arrived".to_owned()),
            };
            cx.emit(payment_event(&self.0, events::PAYMENT_REFUNDED, &payment)?)
                .await?;
        }
        Ok(())
    }
}

/// A payment as `GET /payments/{orderId}` shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct PaymentView {
    /// Order paid for.
    pub order_id: Uuid,
    /// Payment id.
    pub id: Uuid,
    /// Amount.
    pub amount: i64,
    /// `APPROVED`, `DECLINED` or `REFUNDED`.
    pub status: String,
    /// Why declined or refunded.
    pub reason: Option<String>,
}

async fn get_payment(
    State(base): State<ServiceBase>,
    Path(order_id): Path<String>,
) -> Result<Json<PaymentView>, ApiError> {
    let order_id = Uuid::parse_str(&order_id)
        .map_err(|_| ApiError::bad_request(format!("{order_id:?} is not an order id")))?;
    sqlx::query_as("SELECT order_id, id, amount, status, reason FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&base.pool)
        .await
        .map_err(ApiError::internal)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))
}

#[cfg(test)]
mod tests {
    use super::decide;

    #[test]
    fn declined_only_above_the_limit() {
        assert!(decide(100, 100).is_ok());
        assert!(decide(1, 100).is_ok());
        assert!(decide(101, 100).unwrap_err().contains("exceeds"));
    }
}
