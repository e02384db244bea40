//! Parsing and validating `POST /orders` before anything is written.

use serde::Deserialize;
use uuid::Uuid;

use crate::events::OrderItem;
use crate::http::ApiError;

/// Limits on one `POST /orders`.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Most orders in one request.
    pub max_orders: usize,
    /// Most lines in one order.
    pub max_items: usize,
    /// Most units of one line.
    pub max_quantity: u32,
    /// The SKU an order without `items` takes one unit of.
    pub default_sku: String,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_orders: 100,
            max_items: 20,
            max_quantity: 1_000,
            default_sku: "DEFAULT-SKU".to_owned(),
        }
    }
}

/// One validated order of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// Customer.
    pub user_id: Uuid,
    /// Amount, minor units, > 0.
    pub total_amount: i64,
    /// Lines, each SKU once.
    pub items: Vec<OrderItem>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOrder {
    user_id: String,
    total_amount: i64,
    #[serde(default)]
    items: Option<Vec<RawItem>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    sku: String,
    quantity: i64,
}

impl NewOrder {
    /// The items sorted by SKU: the same order whichever way its lines were listed.
    pub fn canonical_items(&self) -> Vec<OrderItem> {
        let mut items = self.items.clone();
        items.sort_by(|a, b| a.sku.cmp(&b.sku));
        items
    }
}

/// Namespace of request fingerprints (UUIDv5).
const FINGERPRINT_NAMESPACE: Uuid = Uuid::from_u128(0x2b9e_64d1_5c0f_4e8a_a6d3_91f4_0c7b_e215);

/// A fingerprint of a whole validated request: equal for requests asking for the same orders
/// (same users, amounts and items, in the same order of orders; lines in any order), and
/// different as soon as one of them differs. A UUIDv5 (SHA-1) of the canonical JSON form.
pub fn fingerprint(orders: &[NewOrder]) -> Uuid {
    let canonical: Vec<serde_json::Value> = orders
        .iter()
        .map(|order| {
            serde_json::json!({
                "userId": order.user_id,
                "totalAmount": order.total_amount,
                "items": order.canonical_items(),
            })
        })
        .collect();
    Uuid::new_v5(
        &FINGERPRINT_NAMESPACE,
        serde_json::Value::Array(canonical).to_string().as_bytes(),
    )
}

/// A SKU is 1 to 64 characters without white space.
pub fn is_valid_sku(sku: &str) -> bool {
    !sku.is_empty() && sku.len() <= 64 && !sku.contains(char::is_whitespace)
}

/// Parses the reference API's body: a JSON array of `{"userId", "totalAmount", "items"?}`.
///
/// Malformed JSON is a 400; a well-formed body with an unacceptable value is a 422 naming the
/// order's index and the field. Whether SKUs exist is checked by the caller, against stock.
pub fn parse_orders(body: &[u8], limits: &RequestLimits) -> Result<Vec<NewOrder>, ApiError> {
    let raw: Vec<RawOrder> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("expected a JSON array of orders: {e}")))?;
    if raw.is_empty() {
        return Err(ApiError::unprocessable(
            "empty_request",
            "the array holds no orders",
        ));
    }
    if raw.len() > limits.max_orders {
        return Err(ApiError::unprocessable(
            "too_many_orders",
            format!(
                "{} orders in one request; at most {}",
                raw.len(),
                limits.max_orders
            ),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(index, order)| validate(index, order, limits))
        .collect()
}

fn validate(index: usize, raw: RawOrder, limits: &RequestLimits) -> Result<NewOrder, ApiError> {
    let invalid = |field: &str, why: String| {
        ApiError::unprocessable("invalid_order", format!("orders[{index}].{field}: {why}"))
    };
    let user_id = Uuid::parse_str(&raw.user_id)
        .map_err(|_| invalid("userId", format!("{:?} is not a UUID", raw.user_id)))?;
    if raw.total_amount <= 0 {
        return Err(invalid(
            "totalAmount",
            format!("must be positive, got {}", raw.total_amount),
        ));
    }
    let raw_items = raw.items.unwrap_or_else(|| {
        vec![RawItem {
            sku: limits.default_sku.clone(),
            quantity: 1,
        }]
    });
    if raw_items.is_empty() || raw_items.len() > limits.max_items {
        return Err(invalid(
            "items",
            format!("must hold 1 to {} lines", limits.max_items),
        ));
    }
    let mut items: Vec<OrderItem> = Vec::with_capacity(raw_items.len());
    for (line, item) in raw_items.into_iter().enumerate() {
        let field = format!("items[{line}]");
        let sku = item.sku.trim();
        if !is_valid_sku(sku) {
            return Err(invalid(&field, format!("bad sku {:?}", item.sku)));
        }
        let quantity = u32::try_from(item.quantity)
            .ok()
            .filter(|q| (1..=limits.max_quantity).contains(q))
            .ok_or_else(|| {
                invalid(
                    &field,
                    format!(
                        "quantity must be 1 to {}, got {}",
                        limits.max_quantity, item.quantity
                    ),
                )
            })?;
        if items.iter().any(|existing| existing.sku == sku) {
            return Err(invalid(&field, format!("sku {sku} appears twice")));
        }
        items.push(OrderItem {
            sku: sku.to_owned(),
            quantity,
        });
    }
    Ok(NewOrder {
        user_id,
        total_amount: raw.total_amount,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "3f0e6c2a-8a59-4a8b-9a53-3a3c3b0f7c11";

    fn parse(body: &str) -> Result<Vec<NewOrder>, ApiError> {
        parse_orders(body.as_bytes(), &RequestLimits::default())
    }

    #[test]
    fn the_reference_body_takes_one_default_unit() {
        let orders = parse(&format!(r#"[{{"userId":"{USER}","totalAmount":1200}}]"#)).unwrap();
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].total_amount, 1200);
        assert_eq!(
            orders[0].items,
            vec![OrderItem {
                sku: "DEFAULT-SKU".into(),
                quantity: 1
            }]
        );
    }

    #[test]
    fn items_are_kept() {
        let body = format!(
            r#"[{{"userId":"{USER}","totalAmount":5,"items":[{{"sku":"A","quantity":2}},{{"sku":"B","quantity":1}}]}}]"#
        );
        let orders = parse(&body).unwrap();
        assert_eq!(orders[0].items.len(), 2);
        assert_eq!(orders[0].items[0].quantity, 2);
    }

    #[test]
    fn bad_input_is_refused_with_the_right_status() {
        let cases = [
            ("not json", 400),
            (r#"{"userId":"x"}"#, 400),
            ("[]", 422),
            (r#"[{"userId":"nope","totalAmount":1}]"#, 422),
            (&format!(r#"[{{"userId":"{USER}","totalAmount":0}}]"#), 422),
            (&format!(r#"[{{"userId":"{USER}","totalAmount":-5}}]"#), 422),
            (
                &format!(r#"[{{"userId":"{USER}","totalAmount":1.5}}]"#),
                400,
            ),
            (
                &format!(r#"[{{"userId":"{USER}","totalAmount":1,"items":[]}}]"#),
                422,
            ),
            (
                &format!(
                    r#"[{{"userId":"{USER}","totalAmount":1,"items":[{{"sku":"A","quantity":0}}]}}]"#
                ),
                422,
            ),
            (
                &format!(
                    r#"[{{"userId":"{USER}","totalAmount":1,"items":[{{"sku":"A","quantity":1}},{{"sku":"A","quantity":1}}]}}]"#
                ),
                422,
            ),
        ];
        for (body, status) in cases {
            let error = parse(body).expect_err(body);
            assert_eq!(error.status.as_u16(), status, "{body}: {}", error.message);
        }
    }

    #[test]
    fn the_fingerprint_covers_users_amounts_and_items_but_not_line_order() {
        let other = "0b7d1c2e-4f5a-4b6c-8d9e-0f1a2b3c4d5e";
        let body = |user: &str, amount: i64, items: &str| {
            parse(&format!(
                r#"[{{"userId":"{user}","totalAmount":{amount},"items":{items}}}]"#
            ))
            .unwrap()
        };
        let ab = r#"[{"sku":"A","quantity":1},{"sku":"B","quantity":2}]"#;
        let ba = r#"[{"sku":"B","quantity":2},{"sku":"A","quantity":1}]"#;
        let base = fingerprint(&body(USER, 5, ab));
        assert_eq!(base, fingerprint(&body(USER, 5, ba)));
        assert_ne!(base, fingerprint(&body(other, 5, ab)));
        assert_ne!(base, fingerprint(&body(USER, 6, ab)));
        assert_ne!(
            base,
            fingerprint(&body(
                USER,
                5,
                r#"[{"sku":"A","quantity":1},{"sku":"B","quantity":3}]"#
            ))
        );
    }

    #[test]
    fn an_over_long_array_is_refused() {
        let one = format!(r#"{{"userId":"{USER}","totalAmount":1}}"#);
        let body = format!("[{}]", vec![one; 101].join(","));
        assert_eq!(parse(&body).unwrap_err().status.as_u16(), 422);
    }
}
