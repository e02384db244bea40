//! `POST /orders` as the load tools send it: once (`commerce-load`), or retried with the
//! same `Idempotency-Key` until the order service answers (`commerce-chaos`).

use std::time::Duration;

use anyhow::bail;
use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

/// One `POST /orders` of one order: its id, or `None` when it was left out for want of stock.
pub async fn post_order(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<Option<Uuid>> {
    let response = http.post(url).json(body).send().await?;
    let status = response.status();
    let ids: Value = response.json().await?;
    if status.as_u16() != 201 {
        bail!("POST /orders answered {status}: {ids}");
    }
    first_id(&ids)
}

fn first_id(ids: &Value) -> anyhow::Result<Option<Uuid>> {
    Ok(ids
        .as_array()
        .and_then(|ids| ids.first())
        .and_then(Value::as_str)
        .map(Uuid::parse_str)
        .transpose()?)
}

/// How a retried `POST /orders` ended.
#[derive(Debug)]
pub enum Placed {
    /// `201`: the order's id, or `None` when it was left out for want of stock.
    Answered(Option<Uuid>),
    /// A `4xx` other than `409` (in flight): the request itself is wrong; never retried.
    Refused(String),
    /// No answer before the deadline (the last failure says why).
    GaveUp(String),
}

/// Sends one order with `Idempotency-Key: key`, retrying with the same key while the
/// order service is unreachable, answers `5xx` or `409` (an earlier try of the key still in
/// flight, or in flight in a process that died, until the key's in-flight timeout), for up
/// to `give_up_after`. Returns the outcome and the number of tries.
pub async fn place_order(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    key: &str,
    give_up_after: Duration,
) -> (Placed, u32) {
    let deadline = Instant::now() + give_up_after;
    let mut tries = 0;
    let mut pause = Duration::from_millis(100);
    loop {
        tries += 1;
        let last = match http
            .post(url)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                if status == 201 {
                    let ids = serde_json::from_str(&text).map_err(anyhow::Error::from);
                    match ids.and_then(|ids: Value| first_id(&ids)) {
                        Ok(id) => return (Placed::Answered(id), tries),
                        Err(error) => format!("201 with an unreadable body {text:?}: {error}"),
                    }
                } else if status != 409 && (400..500).contains(&status) {
                    return (Placed::Refused(format!("{status}: {text}")), tries);
                } else {
                    format!("{status}: {text}")
                }
            }
            Err(error) => format!("{error}"),
        };
        if Instant::now() + pause > deadline {
            return (Placed::GaveUp(last), tries);
        }
        // Jittered (half to all of the pause): clients that failed together, e.g. while
        // PostgreSQL restarted, must not all come back in the same instant.
        let jitter = (Uuid::new_v4().as_u128() % 1_000) as f64 / 2_000.0;
        tokio::time::sleep(pause.mul_f64(0.5 + jitter)).await;
        // Back off to a second between tries: a service restarting takes a few seconds.
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
