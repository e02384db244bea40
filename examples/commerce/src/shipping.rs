//! The shipping service: starts one shipment per paid order.

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
use crate::events::{self, OrderEvent, ShippingEvent};
use crate::http::ApiError;
use crate::service::ServiceBase;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/shipping");

/// Starts the shipping service's tasks on `tasks`.
pub async fn start(
    settings: &Settings,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    cancel: &CancellationToken,
) -> anyhow::Result<ServiceBase> {
    let base = ServiceBase::prepare("shipping", settings, &MIGRATOR).await?;
    base.spawn_relay(tasks, cancel)?;
    let consumer = base.consumer().handler(
        events::ORDER_PAID,
        eventful_saga::participant(base.outbox.clone(), StartShipment(base.clone())),
    );
    base.spawn_consumer(consumer, tasks, cancel)?;
    let routes = Router::new()
        .route("/shipments/{order_id}", get(get_shipment))
        .with_state(base.clone());
    base.spawn_http(&settings.shipping_addr, routes, tasks, cancel)
        .await?;
    Ok(base)
}

/// `ORDER_PAID`: one shipment per order (the primary key says so), then `SHIPPING_STARTED`.
struct StartShipment(ServiceBase);

#[async_trait::async_trait]
impl Participant for StartShipment {
    type Event = OrderEvent;

    async fn handle(&self, cx: &mut Emitter<'_>, order: OrderEvent) -> Result<(), HandlerError> {
        let shipment = ShippingEvent {
            order_id: order.order_id,
            user_id: order.user_id,
            shipment_id: Uuid::now_v7(),
        };
        let inserted = sqlx::query(
            "INSERT INTO shipments (order_id, id, user_id, status) VALUES ($1, $2, $3, 'STARTED') \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(shipment.order_id)
        .bind(shipment.shipment_id)
        .bind(shipment.user_id)
        .execute(cx.conn())
        .await?
        .rows_affected();
        if inserted == 1 {
            let event = NewEvent::json(
                &self.0.settings.topic,
                shipment.order_id.to_string(),
                events::SHIPPING_STARTED,
                &shipment,
            )
            .map_err(HandlerError::permanent)?;
            cx.emit(event).await?;
        }
        Ok(())
    }
}

/// A shipment as `GET /shipments/{orderId}` shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct ShipmentView {
    /// Order shipped.
    pub order_id: Uuid,
    /// Shipment id.
    pub id: Uuid,
    /// `STARTED`.
    pub status: String,
}

async fn get_shipment(
    State(base): State<ServiceBase>,
    Path(order_id): Path<String>,
) -> Result<Json<ShipmentView>, ApiError> {
    let order_id = Uuid::parse_str(&order_id)
        .map_err(|_| ApiError::bad_request(format!("{order_id:?} is not an order id")))?;
    sqlx::query_as("SELECT order_id, id, status FROM shipments WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&base.pool)
        .await
        .map_err(ApiError::internal)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no shipment for order {order_id}")))
}
