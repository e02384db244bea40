//! The order table: inserts, reads and optimistic-locked transitions.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::domain::OrderStatus;
use crate::events::{OrderEvent, OrderItem};

/// An order as stored.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// Id (also the reservation id and the event key).
    pub id: Uuid,
    /// Customer.
    pub user_id: Uuid,
    /// Amount, minor units.
    pub total_amount: i64,
    /// Lines.
    pub items: Vec<OrderItem>,
    /// Current state.
    pub status: OrderStatus,
    /// Optimistic-lock version; +1 on every transition.
    pub version: i64,
    /// When an unpaid reservation expires.
    pub expires_at: DateTime<Utc>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

impl Order {
    /// The facts an event about this order carries.
    pub fn event(&self, reason: Option<String>) -> OrderEvent {
        OrderEvent {
            order_id: self.id,
            user_id: self.user_id,
            total_amount: self.total_amount,
            items: self.items.clone(),
            expires_at: (self.status == OrderStatus::OrderReserved).then_some(self.expires_at),
            reason,
        }
    }
}

/// One transition in an order's history.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// Version the order reached.
    pub version: i64,
    /// State before (none for creation).
    pub from_status: Option<String>,
    /// State after.
    pub to_status: String,
    /// What caused it.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    user_id: Uuid,
    total_amount: i64,
    items: Json<Vec<OrderItem>>,
    status: String,
    version: i64,
    expires_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<OrderRow> for Order {
    type Error = sqlx::Error;

    fn try_from(row: OrderRow) -> Result<Self, Self::Error> {
        let status = OrderStatus::parse(&row.status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {}", row.status).into()))?;
        Ok(Self {
            id: row.id,
            user_id: row.user_id,
            total_amount: row.total_amount,
            items: row.items.0,
            status,
            version: row.version,
            expires_at: row.expires_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

const SELECT_ORDER: &str = "SELECT id, user_id, total_amount, items, status, version, \
     expires_at, created_at, updated_at FROM orders";

/// Inserts a new `ORDER_RESERVED` order at version 1, with its first history row; `None` when
/// an order with this id exists already.
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    user_id: Uuid,
    total_amount: i64,
    items: &[OrderItem],
    expires_at: DateTime<Utc>,
) -> sqlx::Result<Option<Order>> {
    let row: Option<OrderRow> = sqlx::query_as(
        "INSERT INTO orders (id, user_id, total_amount, items, status, version, expires_at) \
         VALUES ($1, $2, $3, $4, $5, 1, $6) ON CONFLICT (id) DO NOTHING \
         RETURNING id, user_id, total_amount, items, status, version, expires_at, created_at, updated_at",
    )
    .bind(id)
    .bind(user_id)
    .bind(total_amount)
    .bind(Json(items))
    .bind(OrderStatus::OrderReserved.as_str())
    .bind(expires_at)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    record_history(conn, id, 1, None, OrderStatus::OrderReserved, "created").await?;
    row.try_into().map(Some)
}

/// Reads one order.
pub async fn find(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Order>> {
    let row: Option<OrderRow> = sqlx::query_as(&format!("{SELECT_ORDER} WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(Order::try_from).transpose()
}

/// The history of one order, oldest first.
pub async fn history(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Vec<Transition>> {
    sqlx::query_as(
        "SELECT version, from_status, to_status, reason, at FROM order_history \
         WHERE order_id = $1 ORDER BY version",
    )
    .bind(id)
    .fetch_all(conn)
    .await
}

/// Order `id` if it is still `ORDER_RESERVED`, locked for the caller's transaction; `None`
/// when it was settled meanwhile or another scheduler holds it. Whether it is due is not
/// asked here: Redis's clock decides that (see [`ExpiryScheduler`](super::expiry::ExpiryScheduler)).
pub async fn find_reserved_for_update(
    conn: &mut PgConnection,
    id: Uuid,
) -> sqlx::Result<Option<Order>> {
    let row: Option<OrderRow> = sqlx::query_as(&format!(
        "{SELECT_ORDER} WHERE id = $1 AND status = 'ORDER_RESERVED' FOR UPDATE SKIP LOCKED"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(Order::try_from).transpose()
}

/// Moves `order` to `next` if nobody changed it since it was read (`version` unchanged).
///
/// Returns the updated order, or `None` when the version moved on: the caller lost the race
/// and must re-read before deciding anything.
pub async fn transition(
    conn: &mut PgConnection,
    order: &Order,
    next: OrderStatus,
    reason: &str,
) -> sqlx::Result<Option<Order>> {
    if !order.status.can_become(next) {
        return Err(sqlx::Error::Protocol(format!(
            "order {}: {} cannot become {next}",
            order.id, order.status
        )));
    }
    let row: Option<OrderRow> = sqlx::query_as(
        "UPDATE orders SET status = $3, version = version + 1, updated_at = now() \
         WHERE id = $1 AND version = $2 AND status = $4 \
         RETURNING id, user_id, total_amount, items, status, version, expires_at, created_at, updated_at",
    )
    .bind(order.id)
    .bind(order.version)
    .bind(next.as_str())
    .bind(order.status.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let updated = Order::try_from(row)?;
    record_history(
        conn,
        order.id,
        updated.version,
        Some(order.status),
        next,
        reason,
    )
    .await?;
    Ok(Some(updated))
}

async fn record_history(
    conn: &mut PgConnection,
    order_id: Uuid,
    version: i64,
    from: Option<OrderStatus>,
    to: OrderStatus,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO order_history (order_id, version, from_status, to_status, reason) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind(version)
    .bind(from.map(OrderStatus::as_str))
    .bind(to.as_str())
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}
