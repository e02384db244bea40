//! The events on `order-events`, keyed by order id. Payloads are camelCase JSON, as in the
//! reference design.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An order holds its stock (order → everyone).
pub const ORDER_RESERVED: &str = "ORDER_RESERVED";
/// Payment taken (payment → order, notification).
pub const PAYMENT_APPROVED: &str = "PAYMENT_APPROVED";
/// Payment declined (payment → order, notification).
pub const PAYMENT_FAILED: &str = "PAYMENT_FAILED";
/// The reservation became a sale (order → shipping, notification).
pub const ORDER_PAID: &str = "ORDER_PAID";
/// A shipment started (shipping → order, notification).
pub const SHIPPING_STARTED: &str = "SHIPPING_STARTED";
/// Compensation of a declined payment: stock released (order → notification).
pub const ORDER_CANCELED: &str = "ORDER_CANCELED";
/// An unpaid reservation passed its TTL: stock released (order → payment, notification).
pub const ORDER_EXPIRED: &str = "ORDER_EXPIRED";
/// A payment that arrived after its order expired was given back (payment → notification).
pub const PAYMENT_REFUNDED: &str = "PAYMENT_REFUNDED";

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    /// Stock keeping unit.
    pub sku: String,
    /// Units, at least 1.
    pub quantity: u32,
}

/// The facts every order event carries, so consumers need no lookups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    /// The order.
    pub order_id: Uuid,
    /// Its customer.
    pub user_id: Uuid,
    /// Amount to pay, in minor units.
    pub total_amount: i64,
    /// Lines of the order.
    #[serde(default)]
    pub items: Vec<OrderItem>,
    /// When an unpaid reservation expires (on `ORDER_RESERVED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Why (declines, cancellations, expiries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Payment outcomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentEvent {
    /// The order paid for.
    pub order_id: Uuid,
    /// Its customer.
    pub user_id: Uuid,
    /// The payment.
    pub payment_id: Uuid,
    /// Amount, in minor units.
    pub amount: i64,
    /// Why it was declined or refunded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A shipment started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShippingEvent {
    /// The order shipped.
    pub order_id: Uuid,
    /// Its customer.
    pub user_id: Uuid,
    /// The shipment.
    pub shipment_id: Uuid,
}
