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
use std::time::Duration;

use uuid::Uuid;

use super::flow::OrderIds;
use super::request::{is_valid_sku, parse_orders};
use super::{store, OrderService};
use crate::http::{ApiError, REQUEST_TIMEOUT};

/// `POST /orders`, `GET /orders/{id}`, `PUT|GET /stock/{sku}`.
pub fn routes(service: OrderService) -> Router {
    // A client that retries `POST /orders` with the same `Idempotency-Key` gets the first
    // answer back instead of a second set of orders. A try that died mid-flight (the
    // process was killed) may run again: its ids and holds derive from the key and the
    // request, so a second run finds what the first placed. A live request ends within
    // REQUEST_TIMEOUT, so a key in flight for longer belongs to a dead one.
    let idempotency = IdempotencyLayer::new(service.base.pool.clone())
        .rerun_abandoned(true)
        .in_flight_timeout(REQUEST_TIMEOUT + Duration::from_secs(5));
    Router::new()
        .route("/orders", post(create_orders).route_layer(idempotency))
        .route("/orders/{id}", get(get_order))
        .route("/stock/{sku}", get(get_stock).put(set_stock))
        .with_state(service)
}

/// Creates the orders whose stock can be held; answers `201` with their ids.
///
/// All or nothing but for stock: the orders are recorded in one transaction, an order whose
/// stock is short is left out of the answer, and an error answer (`4xx`/`500`) means nothing
/// was placed and no stock is held. With an `Idempotency-Key` the ids derive from the key
/// *and* the request's content (users, amounts, items), so a retry of the same request finds
/// the orders an earlier try placed, while the same key with another body (another user,
/// or after the key's record expired) places its own orders and never answers with someone
/// else's.
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
    let ids = match headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|value| value.to_str().ok())
    {
        Some(key) => OrderIds::keyed(key, &orders),
        None => OrderIds::Fresh,
    };
    let created: Vec<Uuid> = service
        .place_orders(&ids, &orders)
        .await?
        .iter()
        .map(|order| order.id)
        .collect();
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
            ReservationError::InvalidQuantity { .. }
            | ReservationError::InvalidId(_)
            | ReservationError::StockLimit { .. } => {
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
