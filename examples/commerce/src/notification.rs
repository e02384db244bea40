//! The notification service: one notification per customer-visible event, queryable over
//! HTTP. The processed-event guard and the unique `event_id` make it exactly one.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use eventful_idempotency::{EventHandler, EventMeta, HandlerError};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;
use crate::events;
use crate::http::ApiError;
use crate::service::ServiceBase;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/notification");

/// The events a customer hears about, with what they are told.
pub const CUSTOMER_VISIBLE: [(&str, &str); 7] = [
    (
        events::ORDER_RESERVED,
        "Your order is reserved; please pay.",
    ),
    (events::PAYMENT_APPROVED, "Your payment was approved."),
    (events::PAYMENT_FAILED, "Your payment was declined."),
    (events::SHIPPING_STARTED, "Your order has shipped."),
    (events::ORDER_CANCELED, "Your order was canceled."),
    (events::ORDER_EXPIRED, "Your reservation expired."),
    (events::PAYMENT_REFUNDED, "Your payment was refunded."),
];

/// Starts the notification service's tasks on `tasks`.
pub async fn start(
    settings: &Settings,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    cancel: &CancellationToken,
) -> anyhow::Result<ServiceBase> {
    let base = ServiceBase::prepare("notification", settings, &MIGRATOR).await?;
    let mut consumer = base.consumer();
    for (event_type, message) in CUSTOMER_VISIBLE {
        consumer = consumer.handler(event_type, Notify { message });
    }
    base.spawn_consumer(consumer, tasks, cancel)?;
    let routes = Router::new()
        .route("/notifications", get(list))
        .with_state(base.clone());
    base.spawn_http(&settings.notification_addr, routes, tasks, cancel)
        .await?;
    Ok(base)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Subject {
    order_id: Uuid,
    user_id: Uuid,
}

struct Notify {
    message: &'static str,
}

#[async_trait::async_trait]
impl EventHandler for Notify {
    type Payload = Subject;

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &EventMeta,
        subject: Subject,
    ) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO notifications (id, event_id, order_id, user_id, kind, message) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(Uuid::now_v7())
        .bind(event.id)
        .bind(subject.order_id)
        .bind(subject.user_id)
        .bind(&event.event_type)
        .bind(self.message)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// A notification as `GET /notifications` lists it.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct NotificationView {
    /// Notification id.
    pub id: Uuid,
    /// The event it tells about.
    pub event_id: Uuid,
    /// Order.
    pub order_id: Uuid,
    /// Customer.
    pub user_id: Uuid,
    /// Event type.
    pub kind: String,
    /// Text.
    pub message: String,
    /// When recorded.
    pub created_at: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Filter {
    order_id: Option<String>,
    user_id: Option<String>,
}

/// `GET /notifications?orderId=…` or `?userId=…`, oldest first (at most 500).
async fn list(
    State(base): State<ServiceBase>,
    filter: Result<Query<Filter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<NotificationView>>, ApiError> {
    let Query(filter) = filter.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let parse = |name: &str, value: Option<String>| {
        value
            .map(|v| {
                Uuid::parse_str(&v)
                    .map_err(|_| ApiError::bad_request(format!("{name} {v:?} is not a UUID")))
            })
            .transpose()
    };
    let order_id = parse("orderId", filter.order_id)?;
    let user_id = parse("userId", filter.user_id)?;
    if order_id.is_none() && user_id.is_none() {
        return Err(ApiError::bad_request("give orderId or userId"));
    }
    let rows = sqlx::query_as(
        "SELECT id, event_id, order_id, user_id, kind, message, created_at FROM notifications \
         WHERE ($1::uuid IS NULL OR order_id = $1) AND ($2::uuid IS NULL OR user_id = $2) \
         ORDER BY created_at, id LIMIT 500",
    )
    .bind(order_id)
    .bind(user_id)
    .fetch_all(&base.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(rows))
}
