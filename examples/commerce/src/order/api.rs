//! The order service's HTTP API.

use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventful_idempotency::http::IDEMPOTENCY_KEY;
use eventful_idempotency::IdempotencyLayer;
use eventful_reservation::Error as ReservationError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::request::{is_valid_sku, parse_orders};
use super::{store, OrderService};
use crate::http::ApiError;

/// Namespace of order ids derived from an `Idempotency-Key` (UUIDv5).
const ORDER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_7a52_2a4e_4a39_9c1e_0b3d_55e4_7a10);

/// `POST /orders`, `GET /orders/{id}`, `PUT|GET /stock/{sku}`.
pub fn routes(service: OrderService) -> Router {
    // A client that retries `POST /orders` with the same `Idempotency-Key` gets the first
    // answer back instead of a second set of orders.
    let idempotency = IdempotencyLayer::new(service.base.pool.clone());
    Router::new()
        .route("/orders", post(create_orders).route_layer(idempotency))
        .route("/orders/{id}", get(get_order))
        .route("/stock/{sku}", get(get_stock).put(set_stock))
        .with_state(service)
}

/// Creates the orders whose stock can be held; answers `201` with their ids.
async fn create_orders(
    State(service): State<OrderService>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Vec<Uuid>>), ApiError> {
    let orders = parse_orders(&body, &service.limits)?;
    // Unknown SKUs refuse the whole request before anything is held.
    let skus: BTreeSet<&str> = orders
        .iter()
        .flat_map(|order| order.items.iter().map(|item| item.sku.as_str()))
        .collect();
    for sku in skus {
        match service.reservations.stock(sku).await {
            Ok(_) => {}
            Err(ReservationError::UnknownSku { .. }) => {
                return Err(ApiError::unprocessable(
                    "unknown_sku",
                    format!("unknown sku {sku}: set its stock first (PUT /stock/{sku})"),
                ))
            }
            Err(error) => return Err(ApiError::internal(error)),
        }
    }
    // With an Idempotency-Key the ids derive from it, so a retry after a failure midway
    // finds the orders already placed instead of placing them twice.
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let mut created = Vec::with_capacity(orders.len());
    for (index, order) in orders.iter().enumerate() {
        let id = match &key {
            Some(key) => Uuid::new_v5(&ORDER_ID_NAMESPACE, format!("{key}/{index}").as_bytes()),
            None => Uuid::now_v7(),
        };
        if let Some(order) = service.place(id, order).await? {
            created.push(order.id);
        }
    }
    Ok((StatusCode::CREATED, Json(created)))
}

async fn get_order(
    State(service): State<OrderService>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not an order id")))?;
    let mut conn = service
        .base
        .pool
        .acquire()
        .await
        .map_err(ApiError::internal)?;
    let order = store::find(&mut conn, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("no order {id}")))?;
    let history = store::history(&mut conn, id)
        .await
        .map_err(ApiError::internal)?;
    let mut body = serde_json::to_value(&order).map_err(ApiError::internal)?;
    body["history"] = serde_json::to_value(history).map_err(ApiError::internal)?;
    Ok(Json(body))
}

/// Stock of one SKU, as `GET /stock/{sku}` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StockView {
    /// The SKU.
    pub sku: String,
    /// Free to reserve.
    pub available: u64,
    /// Held by unpaid orders.
    pub held: u64,
    /// Sold (confirmed).
    pub sold: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStock {
    available: i64,
}

async fn set_stock(
    State(service): State<OrderService>,
    Path(sku): Path<String>,
    body: Bytes,
) -> Result<Json<StockView>, ApiError> {
    let request: SetStock = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!(r#"expected {{"available": <n>}}: {e}"#)))?;
    let available = u64::try_from(request.available)
        .map_err(|_| ApiError::unprocessable("invalid_stock", "available must not be negative"))?;
    if !is_valid_sku(&sku) {
        return Err(ApiError::unprocessable(
            "invalid_sku",
            format!("bad sku {sku:?}: 1 to 64 characters, no white space"),
        ));
    }
    let level = service
        .reservations
        .set_stock(&sku, available)
        .await
        .map_err(|error| match error {
            ReservationError::InvalidQuantity { .. } | ReservationError::InvalidId(_) => {
                ApiError::unprocessable("invalid_stock", error.to_string())
            }
            other => ApiError::internal(other),
        })?;
    Ok(Json(StockView {
        sku,
        available: level.available,
        held: level.held,
        sold: level.sold,
    }))
}

async fn get_stock(
    State(service): State<OrderService>,
    Path(sku): Path<String>,
) -> Result<Json<StockView>, ApiError> {
    match service.reservations.stock(&sku).await {
        Ok(level) => Ok(Json(StockView {
            sku,
            available: level.available,
            held: level.held,
            sold: level.sold,
        })),
        Err(ReservationError::UnknownSku { .. } | ReservationError::InvalidId(_)) => {
            Err(ApiError::not_found(format!("no stock for sku {sku}")))
        }
        Err(error) => Err(ApiError::internal(error)),
    }
}
