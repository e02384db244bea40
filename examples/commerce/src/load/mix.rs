//! The load's order mix, shared by `commerce-load` and `commerce-chaos`: the run's own SKUs
//! and their stock, and the n-th order (one unit of one SKU, every n-th above the payment
//! limit).

use anyhow::{bail, Context};
use serde_json::{json, Value};
use uuid::Uuid;

/// `count` SKU names of a new run (`LOAD-<run>-<i>`), so runs never share stock.
pub fn run_skus(count: usize) -> Vec<String> {
    let run_id = &Uuid::new_v4().simple().to_string()[..8];
    (0..count.max(1))
        .map(|i| format!("LOAD-{run_id}-{i}"))
        .collect()
}

/// Sets `sku`'s available stock through `PUT /stock/{sku}`.
pub async fn set_stock(
    http: &reqwest::Client,
    order_url: &str,
    sku: &str,
    available: u64,
) -> anyhow::Result<()> {
    let response = http
        .put(format!("{order_url}/stock/{sku}"))
        .json(&json!({ "available": available }))
        .send()
        .await
        .with_context(|| format!("setting stock at {order_url}"))?;
    if !response.status().is_success() {
        bail!("PUT /stock/{sku}: {}", response.text().await?);
    }
    Ok(())
}

/// `(available, held, sold)` of `sku` as `GET /stock/{sku}` shows it (`u64::MAX` for a
/// missing field, so a malformed answer fails every check).
pub async fn stock_of(
    http: &reqwest::Client,
    order_url: &str,
    sku: &str,
) -> anyhow::Result<(u64, u64, u64)> {
    let stock: Value = http
        .get(format!("{order_url}/stock/{sku}"))
        .send()
        .await?
        .json()
        .await?;
    let field = |name: &str| stock[name].as_u64().unwrap_or(u64::MAX);
    Ok((field("available"), field("held"), field("sold")))
}

/// The violations of stock conservation for one SKU: `stocked` units were set, `shipped`
/// units left with shipped orders; nothing may stay held.
pub fn stock_violations(
    sku: &str,
    (available, held, sold): (u64, u64, u64),
    stocked: u64,
    shipped: u64,
) -> Vec<String> {
    let mut violations = Vec::new();
    if available.saturating_add(held).saturating_add(sold) != stocked {
        violations.push(format!(
            "{sku}: available {available} + held {held} + sold {sold} != {stocked}"
        ));
    }
    if held != 0 {
        violations.push(format!("{sku}: {held} units still held"));
    }
    if sold != shipped {
        violations.push(format!("{sku}: sold {sold} but {shipped} orders shipped"));
    }
    violations
}

/// The `i`-th order of a run: its SKU (round robin over `skus`), whether its amount is above
/// `payment_limit` (every `decline_every`-th order; 0: none), and the request body.
pub fn nth_order(
    i: usize,
    decline_every: usize,
    payment_limit: i64,
    skus: &[String],
) -> (String, bool, Value) {
    let sku = skus[i % skus.len()].clone();
    let declined = decline_every > 0 && i.is_multiple_of(decline_every);
    let amount = if declined {
        payment_limit + 1
    } else {
        1 + (i as i64 % payment_limit.max(1))
    };
    let body = json!([{ "userId": Uuid::new_v4(), "totalAmount": amount,
                        "items": [{ "sku": sku, "quantity": 1 }] }]);
    (sku, declined, body)
}
